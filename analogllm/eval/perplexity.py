"""Language-model quality of a (digital or analogue) model: loss, perplexity, token accuracy.

One function serves every caller (training loops, LoRA modes, drift sweeps, export verification), so
all reported perplexities are computed the same way: mean next-token cross-entropy over every
predicted position of held-out fixed-length blocks, perplexity = exp(mean loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class LMScore:
    loss: float
    perplexity: float
    token_accuracy: float
    tokens: int


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False, desc: str = "eval"
) -> LMScore:
    """Score ``model`` on ``blocks`` (LongTensor [n, block_size]) in eval mode (the deployed chip)."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [n, block_size >= 2], got {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        total_loss += float(loss)
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    model.train(was_training)
    mean = total_loss / max(count, 1)
    return LMScore(loss=mean, perplexity=math.exp(min(mean, 700.0)), token_accuracy=correct / max(count, 1), tokens=count)
