"""Shared crossbar arithmetic: differential conductance pairs and noise curves given as points.

Both resistive devices (PCM, RRAM) encode a normalised weight w ∈ [-1, 1] as G+ − G− with one device
of the pair at zero conductance (aihwkit SinglePairConductanceConverter, CrossSim BALANCED), so the
mapping lives here once.
"""

from __future__ import annotations

import torch

from analogllm.ops.noise import gaussian


def weight_to_pair(weight: torch.Tensor, g_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target conductances (µS) of the differential pair: w>0 on G+, w<0 on G−, the other at 0."""
    g_plus = weight.clamp(min=0) * g_max
    g_minus = (-weight).clamp(min=0) * g_max
    return g_plus, g_minus


def polyval(coeffs: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """c0 + c1·x + c2·x² + … (Horner), the form aihwkit uses for PCM noise curves."""
    out = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def interp(x: torch.Tensor, xs: tuple[float, ...], ys: tuple[float, ...]) -> torch.Tensor:
    """Piecewise-linear curve through (xs, ys), flat beyond the ends (a measured noise curve)."""
    xs_t = torch.tensor(xs, dtype=x.dtype, device=x.device)
    ys_t = torch.tensor(ys, dtype=x.dtype, device=x.device)
    xc = x.clamp(xs_t[0], xs_t[-1])
    idx = torch.bucketize(xc.contiguous(), xs_t).clamp(1, len(xs) - 1)
    x0, x1 = xs_t[idx - 1], xs_t[idx]
    y0, y1 = ys_t[idx - 1], ys_t[idx]
    return y0 + (y1 - y0) * (xc - x0) / (x1 - x0)


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` drawn from ``generator`` (reproducible chip instances),
    on parallel streams for large tensors (:func:`analogllm.ops.noise.gaussian`)."""
    return gaussian(x.shape, x, generator).wait()
