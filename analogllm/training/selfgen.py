"""Training text the model writes itself: distillation without a corpus (Analog Foundation Models).

Hardware-aware training by distillation only needs inputs on which the digital teacher's outputs are
worth copying; Analog Foundation Models (Büchel et al., NeurIPS 2025) sample them from the teacher
itself, so the student learns the model's own distribution and no dataset has to be shipped or
licensed. :func:`generated_blocks` samples ``count`` sequences of ``block_size`` tokens from the digital
model (temperature sampling with the KV cache, starting from its BOS/EOS token), batched, and caches
the token ids on disk keyed by the model's weights, the tokenizer and the sampling settings, so a
recipe's train, eval and quickstart runs generate them once.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from analogllm.data import cache_dir, tokenizer_fingerprint
from analogllm.fileio import atomic_write_bytes
from analogllm.ops.noise import seeded

#: the ``data.source`` of the recipes that train on text the digital model writes itself
GENERATED = "generated"


def _fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())  # a sample: cheap, unique enough
        h.update(str(tuple(p.shape)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def sample(model: nn.Module, start: int, count: int, length: int, temperature: float = 1.0, batch_size: int = 16,
           seed: int = 0, progress: bool = False) -> torch.Tensor:
    """``count`` sequences of ``length`` tokens: the token ``start``, then ``length − 1`` tokens sampled
    from ``model`` (LongTensor [count, length]); the caller's random streams are left as they were."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    with seeded(seed, device):
        for first in tqdm(range(0, count, batch_size), desc="generating training text", disable=not progress):
            n = min(batch_size, count - first)
            ids = torch.full((n, 1), start, dtype=torch.long, device=device)
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                                 use_cache=True, pad_token_id=start)
            out.append(seq[:, :length].cpu())
    model.train(was)
    return torch.cat(out)


def generated_blocks(model: nn.Module, tokenizer, count: int, block_size: int, temperature: float = 1.0,
                     seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Training blocks written by ``model`` itself (see the module docstring), cached on disk."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start generation from")
    key = hashlib.sha256("\0".join([_fingerprint(model), tokenizer_fingerprint(tokenizer), str(count), str(block_size),
                                    repr(temperature), str(seed), "1"]).encode()).hexdigest()[:24]
    path = cache_dir() / "generated" / f"{key}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path)).long()
    blocks = sample(model, start, count, block_size, temperature, seed=seed, progress=progress)
    buffer = io.BytesIO()
    np.save(buffer, blocks.numpy().astype(np.int32))
    atomic_write_bytes(path, buffer.getvalue())
    return blocks


__all__ = ["GENERATED", "generated_blocks", "sample"]
