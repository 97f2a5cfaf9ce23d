"""Generation on a programmed chip: ``model.generate`` with the KV cache, every new token one read of
every analogue layer (fresh read noise), timed, under a seed of its own."""

from __future__ import annotations

import time
from typing import Any


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, sample: bool = False,
             seed: int = 0) -> tuple[str, int, float]:
    """(continuation, tokens generated, seconds) of ``model.generate`` with the KV cache, under ``seed``
    (read noise and sampling), the caller's random streams left as they were."""
    import torch

    from analogllm.ops.noise import seeded

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with seeded(seed), torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=sample, use_cache=True, pad_token_id=pad,
                             **({"top_k": 0, "top_p": 1.0, "temperature": 1.0} if sample else {}))
        seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds


__all__ = ["generate"]
