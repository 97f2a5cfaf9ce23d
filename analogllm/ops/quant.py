"""Converters (DAC, ADC) with straight-through gradients, and weight clipping.

Each rounding step passes its gradient straight through (the STE); each clipping step passes it only
inside the range, so gradients still reach weights and learned input ranges through every quantiser.
They are written as custom autograd functions so that forward keeps only a boolean mask for backward
instead of the chain of intermediate tensors that the naive ``x + (q − x).detach()`` would save.
"""

from __future__ import annotations

import torch


class _ClampRound(torch.autograd.Function):
    """q = round(clamp(x, −b, b) / step) · step, gradient 1 inside [−b, b] and 0 outside."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: float, step: float | None) -> torch.Tensor:  # type: ignore[override]
        inside = x.abs() <= bound
        ctx.save_for_backward(inside)
        y = x.clamp(-bound, bound)
        if step is not None:
            y = torch.round(y / step).mul_(step)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def clamp_round(x: torch.Tensor, bound: float, step: float | None) -> torch.Tensor:
    """Saturate at ±bound and round to multiples of ``step`` (no rounding when ``step`` is None)."""
    if step is None and not x.requires_grad:
        return x.clamp(-bound, bound)
    return _ClampRound.apply(x, bound, step)


def dac_levels(bits: int | None) -> float | None:
    """Step of a signed DAC on [−1, 1]: 2^(bits−1) − 1 levels per sign, zero included."""
    return None if bits is None else 1.0 / (2 ** (bits - 1) - 1)


def adc_step(bits: int | None, bound: float) -> float | None:
    """Step of an ADC spanning [−bound, bound] with 2^bits − 2 intervals (aihwkit's convention)."""
    return None if bits is None else 2.0 * bound / (2**bits - 2)


def clip_bound(weight: torch.Tensor, sigma: float | None) -> torch.Tensor | None:
    """Per-output-channel clipping bound sigma·std(W_row), (…, out, 1), without gradient; None when off.

    The std comes from the first two moments (one fused reduction each) rather than ``Tensor.std``,
    which is ten times slower on CPU; weights are near zero-mean, so the cancellation is harmless."""
    if sigma is None:
        return None
    w = weight.detach()
    n = w.shape[-1]
    mean = w.mean(-1, keepdim=True)
    mean_sq = torch.linalg.vector_norm(w, dim=-1, keepdim=True).square_().div_(n)
    var = mean_sq.sub_(mean.square()).clamp_(min=0.0).mul_(n / max(n - 1, 1))
    return var.sqrt_().mul_(sigma)
