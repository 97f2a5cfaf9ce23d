"""Resistive RAM (RRAM) crossbar with multi-level cells and conductance relaxation.

RRAM cells are programmed (program-and-verify) to one of a finite number of conductance levels. The
deviation of a programmed device from its level follows aihwkit's ``ReRamWan2022NoiseModel``, fitted to
the NeuRRAM chip (Wan et al., Nature 2022): Gaussian, with a standard deviation that is a 4th-order
polynomial of x = G_level/g_max, one polynomial 1 s after programming and larger ones 1 day and 2
days after (relaxation). Both devices of a pair are programmed, so the idle (RESET, 0 µS) device
carries σ(0) = 0.348 µS at 1 s; conductances are clamped at 0 µS as in the source.

Time dependence. The source gives the distribution at the anchor times only (1 s, 1 day, 2 days). A
chip instance must be one chip at every time, so each device draws two numbers once: z0 (its
programming error) and z1 (its relaxation direction), and at time t

    G(t) = max(G_level + σ₁(x)·z0 + √(σ²(x, t) − σ₁²(x))·z1, 0),

which has exactly the source's distribution at every anchor time. Between anchors σ²(x, t) is
interpolated linearly in ln t; before 1 s it is σ₁² (a chip is first read 1 s after programming);
beyond the last anchor (2 days) the 2-day distribution is held, since the source has no data there.
Where a later polynomial lies below an earlier one (2 days vs 1 day for 0.06 < x < 0.95, by ≤ 2 %) the
relaxation term shrinks a little: the source's fit, reproduced. The relaxation is symmetric about the
level (no mean shift apart from the clamp at 0), so global drift compensation stays close to 1.

Stuck devices (drawn once per chip, after all noise) sit at 0 µS (stuck low) or g_max (stuck high)
and do not relax. Read noise (≈ 1 % of the weight range, fresh at every read) is the source's advice
for the short-term read noise it does not model. Its I–V curve and sense amplifier saturate: profiles
pair this device with ``output.nonlinearity: tanh``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from analogllm.devices.base import Device, Realisation
from analogllm.devices.conductance import (
    PairState, apply_stuck, pair_target, polyval, randn_like, stuck_devices, weight_to_pair,
)
from analogllm.config.schema import check

#: aihwkit ReRamWan2022NoiseModel polynomials (µS at g_max 40 µS), ascending powers of x
WAN2022_1S = (0.348, 16.030, -43.853, 45.393, -16.815)
WAN2022_1D = (0.701, 22.086, -50.773, 47.095, -16.458)
WAN2022_2D = (0.782, 20.274, -43.507, 37.062, -11.934)


@dataclass(frozen=True)
class RRAM(Device):
    """RRAM device parameters (x = G / g_max).

    g_max:           maximum conductance, µS (≈ 40 µS, NeuRRAM fit).
    levels:          programmable conductance levels per device, 0 and g_max included.
    prog_noise:      σ(x) in µS at ``prog_noise_time`` seconds after programming, c0 + c1·x + … (ascending),
                     fitted at ``prog_noise_gmax`` µS and rescaled proportionally to ``g_max``.
    relax_times:     later anchor times (s), increasing, with one polynomial each in ``relax_noise``.
    relax_noise:     σ(x) polynomials (µS, same form) at ``relax_times``.
    prog_noise_scale: scales every σ (aihwkit ``noise_scale``).
    relax_scale:     scales the relaxation term (0: the 1-s distribution at every time).
    d2d_std:         extra device-to-device relative gain spread, fixed per chip instance.
    read_noise:      read noise std of one weight (pair), relative to g_max, fresh at every read.
    stuck_low / stuck_high: fraction of devices stuck at 0 µS / at g_max, drawn once per chip instance.
    """

    kind = "rram"

    g_max: float = 40.0
    levels: int = 32
    prog_noise: tuple[float, ...] = WAN2022_1S
    prog_noise_time: float = 1.0
    prog_noise_gmax: float = 40.0
    relax_times: tuple[float, ...] = (86400.0, 172800.0)
    relax_noise: tuple[tuple[float, ...], ...] = (WAN2022_1D, WAN2022_2D)
    prog_noise_scale: float = 1.0
    relax_scale: float = 1.0
    d2d_std: float = 0.0
    read_noise: float = 0.01
    stuck_low: float = 0.0
    stuck_high: float = 0.0

    def __post_init__(self) -> None:
        check(self.g_max > 0, "device.g_max", f"must be > 0 µS, got {self.g_max}")
        check(self.levels >= 2, "device.levels", f"must be >= 2, got {self.levels}")
        check(len(self.prog_noise) >= 1 and all(len(c) >= 1 for c in self.relax_noise), "device.prog_noise",
              "every noise polynomial needs at least one coefficient")
        check(len(self.relax_times) == len(self.relax_noise), "device.relax_times",
              "needs one polynomial in relax_noise per time")
        times = (self.prog_noise_time, *self.relax_times)
        check(self.prog_noise_time > 0 and all(a < b for a, b in zip(times, times[1:])), "device.relax_times",
              "prog_noise_time and relax_times must be > 0 and increasing")
        for name in ("prog_noise_scale", "relax_scale", "d2d_std", "read_noise", "stuck_low", "stuck_high"):
            check(getattr(self, name) >= 0, f"device.{name}", "must be >= 0")
        check(self.stuck_low + self.stuck_high <= 1, "device.stuck_low", "stuck_low + stuck_high must be <= 1")

    @property
    def drifts(self) -> bool:
        return self.relax_scale > 0 and len(self.relax_times) > 0

    def summary(self) -> str:
        text = (f"g_max {self.g_max} µS, {self.levels} levels, σ(x) Wan 2022 at 1 s/1 d/2 d, "
                f"read {self.read_noise}")
        if self.stuck_low or self.stuck_high:
            text += f", stuck {self.stuck_low:g}/{self.stuck_high:g}"
        return text

    def quantize_levels(self, g: torch.Tensor) -> torch.Tensor:
        """Nearest programmable level (µS)."""
        step = self.g_max / (self.levels - 1)
        return torch.round(g / step) * step

    def _sigma(self, coeffs: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
        return polyval(coeffs, x).clamp(min=0) * (self.g_max / self.prog_noise_gmax) * self.prog_noise_scale

    def noise_std(self, g_level: torch.Tensor, seconds: float) -> torch.Tensor:
        """σ(x, t) in µS of devices at level ``g_level`` read ``seconds`` after programming: the source's
        polynomial at an anchor time, variance interpolated linearly in ln t between anchors, held before
        the first and after the last (module docstring); ``relax_scale`` scales the part beyond σ₁."""
        x = g_level / self.g_max
        first = self._sigma(self.prog_noise, x)
        times = (self.prog_noise_time, *self.relax_times)
        if seconds <= times[0] or not self.drifts:
            return first
        polys = (self.prog_noise, *self.relax_noise)
        k = next((i for i, t in enumerate(times) if seconds <= t), len(times) - 1)
        hi = self._sigma(polys[k], x).square()
        if seconds >= times[k]:
            var = hi
        else:
            lo = self._sigma(polys[k - 1], x).square()
            f = math.log(seconds / times[k - 1]) / math.log(times[k] / times[k - 1])
            var = lo + (hi - lo) * f
        extra = (var - first.square()).clamp(min=0).sqrt() * self.relax_scale
        return (first.square() + extra.square()).sqrt()

    def _device(self, g_level: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor, seconds: float) -> torch.Tensor:
        first = self._sigma(self.prog_noise, g_level / self.g_max)
        relax = (self.noise_std(g_level, seconds).square() - first.square()).clamp(min=0).sqrt()
        return (g_level + first * z0 + relax * z1).clamp(min=0)

    def pair_read_std(self, g_plus: torch.Tensor, g_minus: torch.Tensor, t_plus: torch.Tensor,
                      t_minus: torch.Tensor, seconds: float) -> torch.Tensor | None:
        """Std of one read of the pairs' normalised weight (``read_noise``, the same for every pair), or
        None without read noise; the conductances do not matter in this model."""
        return torch.full_like(g_plus, self.read_noise) if self.read_noise > 0 else None

    def programming_draws(self, numel: int, generator: torch.Generator) -> tuple[torch.Tensor, ...] | None:
        """G+'s and G−'s (z0, d2d gain) as :meth:`pair_state` draws them (z1 drawn to keep the order: it
        only moves a device after programming); None with stuck devices."""
        if self.stuck_low or self.stuck_high:
            return None
        like, out = torch.empty(numel), []
        for _ in range(2):
            z0 = randn_like(like, generator)
            randn_like(like, generator)  # z1
            d2d = 1 + self.d2d_std * randn_like(like, generator) if self.d2d_std > 0 else torch.ones(numel)
            out += [z0, d2d]
        return tuple(out)

    def programmed(self, weight: torch.Tensor, draws: tuple[torch.Tensor, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The nearest levels with their programming error at ``prog_noise_time`` (relaxation has not
        begun), as :meth:`pair_state` programs; expected: the levels; read variance: ``read_noise``²."""
        held, levels, prog = [], [], 0.0
        for side, z0, d2d in ((1, draws[0], draws[1]), (-1, draws[2], draws[3])):
            level = self.quantize_levels(pair_target(weight, self.g_max, side))
            std = self._sigma(self.prog_noise, level / self.g_max)
            held.append((level + std * z0).clamp_(min=0).mul_(d2d))
            levels.append(level)
            prog = prog + std.square()
        g2 = self.g_max ** 2
        return ((held[0] - held[1]) / self.g_max, (levels[0] - levels[1]) / self.g_max, prog / g2,
                torch.full_like(weight, self.read_noise ** 2))

    def pair_state(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> PairState:
        """Both devices of every pair of this chip instance (module docstring for the draws' order). The
        pair's read noise ``read_noise`` is split evenly over its two devices (std ``read_noise·g_max/√2``
        each), so a measurement of both reproduces it."""
        levels = [self.quantize_levels(g) for g in weight_to_pair(weight, self.g_max)]
        draws = []
        for g_level in levels:  # G+ then G−: programming error z0, relaxation direction z1, then d2d
            z0, z1 = randn_like(g_level, generator), randn_like(g_level, generator)
            d2d = 1 + self.d2d_std * randn_like(g_level, generator) if self.d2d_std > 0 else None
            draws.append((z0, z1, d2d))
        stuck = [stuck_devices(g, self.stuck_low, self.stuck_high, generator) for g in levels]

        def devices_at(t: float) -> list[torch.Tensor]:
            gs = []
            for g_level, (z0, z1, d2d), faults in zip(levels, draws, stuck):
                g = self._device(g_level, z0, z1, t)
                gs.append(apply_stuck(g if d2d is None else g * d2d, faults, self.g_max))
            return gs

        gp, gm = devices_at(seconds)
        later = seconds > self.prog_noise_time and self.drifts
        p0, m0 = devices_at(0.0) if later else (None, None)
        device_read = torch.full_like(weight, self.read_noise * self.g_max / math.sqrt(2)) if self.read_noise > 0 else None
        return PairState(g_plus=gp, g_minus=gm, ref_plus=p0, ref_minus=m0, read_plus=device_read,
                         read_minus=device_read, read_std=self.pair_read_std(weight, weight, weight, weight, seconds))

    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        s = self.pair_state(weight, seconds, generator)
        return Realisation(
            weight=(s.g_plus - s.g_minus) / self.g_max, read_std=s.read_std,
            reference=None if s.ref_plus is None else (s.ref_plus - s.ref_minus) / self.g_max,
        )
