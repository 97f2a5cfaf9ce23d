"""Calibration inputs: what every analogue layer receives on real text, from one digital pass."""

from __future__ import annotations

import math
import torch
from torch import nn
from tqdm.auto import tqdm

from analogllm.chip.program import mode
from analogllm.nn.convert import analog_matrices
from analogllm.nn.matrix import AnalogMatrix
from analogllm.ops.noise import seeded

#: key of a captured input: the matrix's name, and the expert index for MoE expert matrices
Key = tuple[str, int | None]


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: torch.Tensor, tokens: int = 256, batch_size: int = 4,
                   seed: int = 0, progress: bool = False) -> dict[Key, torch.Tensor]:
    """A seeded random sample of ``tokens`` input rows of every analogue matrix (before its input
    transform), from a digital forward over ``blocks`` (LongTensor [n, block]): every matrix and every
    analogue attention product runs exactly, so each layer sees the activations of the exact model.
    Layers that read the same activation (q/k/v) share one stored tensor."""
    names = {id(m): name for name, m, _ in analog_matrices(model)}
    n_batches = math.ceil(len(blocks) / batch_size)
    per_call = math.ceil(tokens / n_batches)
    gen = torch.Generator().manual_seed(seed)
    parts: dict[Key, list[torch.Tensor]] = {}
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: AnalogMatrix, args: tuple, kwargs: dict) -> None:
        x = args[0]
        expert = args[3] if len(args) > 3 else kwargs.get("expert")
        rows = x.detach().reshape(-1, x.shape[-1])
        if id(x) not in seen:  # one sample per activation, shared by every layer that reads it
            pick = torch.randperm(rows.shape[0], generator=gen)[:per_call].to(rows.device)
            seen[id(x)] = (x, rows[pick].float().cpu())  # holding x keeps its id from being reused
        parts.setdefault((names[id(module)], expert), []).append(seen[id(x)][1])

    matrices = [m for m in model.modules() if isinstance(m, AnalogMatrix) and id(m) in names]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in matrices]
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with mode(model, "digital"), seeded(seed, device):
            for start in tqdm(range(0, len(blocks), batch_size), desc="calibration pass", disable=not progress,
                              leave=False):
                seen.clear()
                model(input_ids=blocks[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for key, chunks in parts.items():
        x = torch.cat(chunks)
        out[key] = x[torch.randperm(x.shape[0], generator=gen)[:tokens]] if x.shape[0] > tokens else x
    return out


__all__ = ["Key", "capture_inputs"]
