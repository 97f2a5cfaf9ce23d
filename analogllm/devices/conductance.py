"""Shared crossbar arithmetic: differential conductance pairs, noise polynomials and stuck devices.

Both resistive devices (PCM, RRAM) encode a normalised weight w ∈ [-1, 1] as G+ − G− with one device
of the pair targeted at zero conductance (aihwkit SinglePairConductanceConverter, CrossSim BALANCED), so
the mapping lives here once. That idle device is still a device: it is programmed (to 0 µS, with the
programming error of a 0 µS target), drifts and is read like the other one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from analogllm.ops.noise import gaussian


@dataclass
class PairState:
    """Both devices of every differential pair of one chip instance, in µS, shaped like the weight.

    The device models compute the pair's weight (G+ − G−)/g_max from this; a simulated measurement of
    the chip (:mod:`analogllm.export.readback`) reads the two devices themselves, as a lab reads a
    real chip's conductances one device at a time.

    g_plus, g_minus: conductances now (programming noise, drift or relaxation, stuck devices).
    ref_plus, ref_minus: the same devices right after programming (what global drift compensation
                     calibrates against), or None when the device did not age.
    read_plus, read_minus: std (µS) of one read of each device, or None without read noise.
    read_std:        std of one read of the pair's normalised weight, as :class:`Realisation` carries it.
    """

    g_plus: torch.Tensor
    g_minus: torch.Tensor
    ref_plus: torch.Tensor | None
    ref_minus: torch.Tensor | None
    read_plus: torch.Tensor | None
    read_minus: torch.Tensor | None
    read_std: torch.Tensor | None


def weight_to_pair(weight: torch.Tensor, g_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target conductances (µS) of the differential pair: w>0 on G+, w<0 on G−, the other at 0."""
    return pair_target(weight, g_max, 1), pair_target(weight, g_max, -1)


def pair_target(weight: torch.Tensor, g_max: float, side: int) -> torch.Tensor:
    """Target conductance (µS) of one device of every pair: G+ = max(w, 0)·g_max (``side`` 1) or
    G− = max(−w, 0)·g_max (``side`` −1); one side at a time bounds the memory of a large layer."""
    return (weight if side > 0 else -weight).clamp(min=0).mul_(g_max)


def polyval(coeffs: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """c0 + c1·x + c2·x² + … (Horner), the form aihwkit uses for its PCM and RRAM noise curves."""
    out = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` drawn from ``generator`` (reproducible chip instances),
    on parallel streams for large tensors (:func:`analogllm.ops.noise.gaussian`)."""
    return gaussian(x.shape, x, generator).wait()


def _normal_quantile(p: float) -> float:
    """Φ⁻¹(p), with ±inf at p = 0 and 1."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return NormalDist().inv_cdf(p)


def stuck_devices(like: torch.Tensor, p_low: float, p_high: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Which devices are stuck low / stuck high: two disjoint boolean masks shaped like ``like``.

    Each device is stuck low with probability ``p_low`` and stuck high with probability ``p_high``,
    independently of the others, from one standard normal draw per device (z < Φ⁻¹(p_low) → low,
    z > Φ⁻¹(1 − p_high) → high), so the faults use the same reproducible streams as the noise. None
    (and nothing drawn) when both are 0: a fault-free chip's random numbers are untouched.
    """
    if p_low == 0.0 and p_high == 0.0:
        return None
    z = randn_like(like, generator)
    return z < _normal_quantile(p_low), z > _normal_quantile(1.0 - p_high)


def apply_stuck(g: torch.Tensor, stuck: tuple[torch.Tensor, torch.Tensor] | None, g_max: float) -> torch.Tensor:
    """Conductances with stuck-low devices at 0 µS and stuck-high devices at ``g_max``."""
    if stuck is None:
        return g
    low, high = stuck
    return torch.where(low, torch.zeros_like(g), torch.where(high, torch.full_like(g, g_max), g))
