"""Phase-change memory (PCM) crossbar, with the statistical model IBM fitted to its devices.

Weights are differential pairs G+ − G−: the device on the weight's side is targeted at |w|·g_max, the
other (idle) one at 0 µS. Both are programmed, so both carry programming error, drift and read noise,
as in aihwkit's ``PCMLikeNoiseModel`` with its ``SinglePairConductanceConverter``. With ``pairs`` > 1
every weight is held by that many pairs in parallel, all aimed at the same target, whose currents add
on the column (the full scale is pairs·g_max): every device's own error is independent, so the weight's
programming error, drift spread and read noise shrink by √pairs for pairs× the devices (IBM's 14-nm
PCM inference chips hold each weight on four PCM devices, Narayanan et al., VLSI 2021). One chip instance draws, in this order and from one
generator: for every pair, for G+ then G−, the programming noise of every device and then its drift
exponent ν; then, if the profile has stuck devices, which devices are stuck (every pair's G+, G−).

* programming: G_p = max(G_T + σ_p(x_T)·z, 0), σ_p(x) = c0 + c1·x + c2·x² µS (x_T = G_T/g_max). An idle
  device (x_T = 0) gets σ_p(0) = 0.263 µS, so after the clamp it sits at +0.105 µS on average with a
  0.154 µS spread: a zero weight reads 0 ± 0.218 µS, and a non-zero weight is pulled 0.105 µS towards 0.
* drift: G(t) = G_p·((t + t0)/t0)^(−ν), ν = |N(μν(x_T), σν(x_T))|, μν and σν clipped log-linear in x_T.
* 1/f read noise, fresh at every read: σ_r = |G(t)|·Q_s(x_T)·√ln((t + t0 + t_read)/(2 t_read)),
  Q_s(x) = min(0.0088/max(x^0.65, 10⁻³), 0.2) — Q_s from the *target* conductance (Joshi et al., Nat.
  Commun. 2020; aihwkit evaluates it at the programmed one, which differs by < 2 % for x ≥ 0.1), the
  magnitude from the drifted one.
* stuck devices (drawn once per chip): stuck-low at 0 µS, stuck-high at g_max, whatever the target; a
  stuck device neither drifts nor adds read noise.

All defaults are aihwkit's ``PCMLikeNoiseModel`` (Nandakumar et al. 2019, Le Gallo et al. 2023); the
profile ``pcm.yaml`` cites them field by field and ``docs/physics.md`` writes the model out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from analogllm.devices.base import Device, Realisation
from analogllm.devices.conductance import (
    PairState, apply_stuck, pair_target, polyval, randn_like, stuck_devices, weight_to_pair,
)
from analogllm.config.schema import check
from analogllm.ops.noise import STREAM, gaussian_block, stream_seeds

#: aihwkit's floor on x = G/g_max inside ln x (PCMLikeNoiseModel's _ZERO_CLIP)
_X_FLOOR = 1e-7
#: devices realised at once when a layer is programmed block by block (a multiple of the noise streams):
#: one stream keeps a block's dozen temporaries at 1 MiB each, and realises a 2048 × 8192 layer as fast
#: as four streams (0.66 s vs 0.72 s on 2 cores)
_BLOCK = STREAM


@dataclass(frozen=True)
class PCM(Device):
    """PCM device parameters (x = G / g_max).

    g_max:                 maximum conductance of one device, µS.
    prog_noise:            σ_prog(x) = c0 + c1·x + c2·x² in µS, fitted at ``prog_noise_gmax`` µS
                           (rescaled proportionally to ``g_max``); × ``prog_noise_scale``.
    read_noise_qs, read_noise_exp, read_noise_qs_max: 1/f read noise
                           σ = |G(t)|·min(qs / x_T^exp, qs_max)·√ln((t + t_read)/(2·t_read)); × ``read_noise_scale``.
    drift_t0:              seconds after programming at which the reference is read.
    drift_mu / drift_sigma: (slope, intercept, low, high) of μν, σν = clip(slope·ln x_T + intercept, low, high).
    stuck_low / stuck_high: fraction of devices stuck at 0 µS / at g_max, drawn once per chip instance.
    pairs:                 differential pairs per weight, in parallel and aimed at the same target (1:
                           aihwkit's single pair; 2: four devices per weight).
    """

    kind = "pcm"

    g_max: float = 25.0
    prog_noise: tuple[float, ...] = (0.26348, 1.9650, -1.1731)
    prog_noise_gmax: float = 25.0
    prog_noise_scale: float = 1.0
    read_noise_qs: float = 0.0088
    read_noise_exp: float = 0.65
    read_noise_qs_max: float = 0.2
    read_noise_scale: float = 1.0
    t_read: float = 250e-9
    drift_t0: float = 20.0
    drift_mu: tuple[float, float, float, float] = (-0.0155, 0.0244, 0.049, 0.1)
    drift_sigma: tuple[float, float, float, float] = (-0.0125, -0.0059, 0.008, 0.045)
    drift_scale: float = 1.0
    stuck_low: float = 0.0
    stuck_high: float = 0.0
    pairs: int = 1

    def __post_init__(self) -> None:
        check(self.g_max > 0, "device.g_max", f"must be > 0 µS, got {self.g_max}")
        check(len(self.prog_noise) >= 1, "device.prog_noise", "needs at least one coefficient")
        for name in ("prog_noise_scale", "read_noise_scale", "drift_scale", "read_noise_qs", "stuck_low", "stuck_high"):
            check(getattr(self, name) >= 0, f"device.{name}", "must be >= 0")
        check(self.stuck_low + self.stuck_high <= 1, "device.stuck_low", "stuck_low + stuck_high must be <= 1")
        check(self.drift_t0 > 0 and self.t_read > 0, "device.drift_t0", "drift_t0 and t_read must be > 0")
        check(isinstance(self.pairs, int) and self.pairs >= 1, "device.pairs",
              f"must be a whole number of differential pairs per weight (>= 1), got {self.pairs!r}")
        check(len(self.drift_mu) == 4 and len(self.drift_sigma) == 4, "device.drift_mu",
              "drift_mu and drift_sigma are (slope, intercept, low, high)")

    @property
    def drifts(self) -> bool:
        return self.drift_scale > 0

    def summary(self) -> str:
        text = (f"g_max {self.g_max} µS, σ_prog {self.prog_noise[0]:.2f}–"
                f"{max(self.prog_noise[0], sum(self.prog_noise)):.2f} µS (both devices), drift ν≈0.05")
        if self.pairs > 1:
            text += f", {self.pairs} pairs per weight"
        if self.stuck_low or self.stuck_high:
            text += f", stuck {self.stuck_low:g}/{self.stuck_high:g}"
        return text

    # ----- the statistical model, one function per effect so tests and exports can use them ----------------
    def prog_std(self, g_target: torch.Tensor) -> torch.Tensor:
        """Programming noise std (µS) for target conductances (µS), the idle device's 0 µS included."""
        x = g_target / self.g_max
        return polyval(self.prog_noise, x).clamp(min=0) * (self.g_max / self.prog_noise_gmax) * self.prog_noise_scale

    def drift_nu(self, g_target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Drift exponents ν = |N(μν(x_T), σν(x_T))| of devices with target ``g_target``, spread included."""
        return self._nu(g_target, randn_like(g_target, generator))

    def _nu(self, g_target: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ν from the standard normals ``z`` (consumed)."""
        log_x = torch.log((g_target / self.g_max).abs().clamp(min=_X_FLOOR))
        a, b, lo, hi = self.drift_mu
        mu = (a * log_x + b).clamp(lo, hi)
        a, b, lo, hi = self.drift_sigma
        sigma = log_x.mul_(a).add_(b).clamp_(lo, hi)
        return z.mul_(sigma).add_(mu).abs_().mul_(self.drift_scale)

    def read_std(self, g: torch.Tensor, g_target: torch.Tensor, seconds: float) -> torch.Tensor:
        """1/f read noise std (µS) of devices now at conductance ``g``, programmed to ``g_target``, read
        ``seconds`` after programming: |g|·Q_s(x_T)·√ln((t + t_read)/(2 t_read)), t = seconds + t0."""
        x = (g_target / self.g_max).abs()
        qs = (self.read_noise_qs / x.pow(self.read_noise_exp).clamp(min=1e-3)).clamp(max=self.read_noise_qs_max)
        t = seconds + self.drift_t0
        return g.abs() * qs * math.sqrt(math.log((t + self.t_read) / (2 * self.t_read))) * self.read_noise_scale

    def pair_read_std(self, g_plus: torch.Tensor, g_minus: torch.Tensor, t_plus: torch.Tensor,
                      t_minus: torch.Tensor, seconds: float) -> torch.Tensor | None:
        """Std of one read of the pairs' normalised weight, for devices now at ``g_plus``/``g_minus``
        programmed to ``t_plus``/``t_minus`` (µS; with several pairs per weight, their mean, each pair's
        devices taken as alike): the read noise a read-back chip gets from this model when its
        measurement carries no measured spread. None when the profile has no read noise."""
        if self.read_noise_scale == 0:
            return None
        sp, sm = self.read_std(g_plus, t_plus, seconds), self.read_std(g_minus, t_minus, seconds)
        return torch.sqrt(sp.square() + sm.square()) / (self.g_max * math.sqrt(self.pairs))

    def pair_state(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> PairState:
        """Both devices of every pair of this chip instance (module docstring for the draws' order); with
        several pairs per weight, each side's mean over them (what reading the side's devices in
        parallel measures, per device) and the std of that mean."""
        targets = weight_to_pair(weight, self.g_max)
        drawn = []
        for _ in range(self.pairs):
            for g_target in targets:  # G+ then G−: programming noise, then ν
                g_prog = (g_target + self.prog_std(g_target) * randn_like(g_target, generator)).clamp(min=0)
                drawn.append((g_target, g_prog, self.drift_nu(g_target, generator)))
        stuck = [stuck_devices(g, self.stuck_low, self.stuck_high, generator) for _ in range(self.pairs) for g in targets]
        sums: list[list[torch.Tensor]] = [[], []]  # per side: (programmed, now, read variance) summed over the pairs
        for i, ((g_target, g_prog, nu), faults) in enumerate(zip(drawn, stuck)):
            g_t = g_prog * ((seconds + self.drift_t0) / self.drift_t0) ** (-nu) if seconds > 0 else g_prog
            read = self.read_std(g_t, g_target, seconds)
            if faults is not None:
                read = torch.where(faults[0] | faults[1], torch.zeros_like(read), read)
            part = (apply_stuck(g_prog, faults, self.g_max), apply_stuck(g_t, faults, self.g_max), read.square())
            side = sums[i % 2]
            sums[i % 2] = list(part) if not side else [a + b for a, b in zip(side, part)]
        n = self.pairs
        (p0, gp, vp), (m0, gm, vm) = ([t / n for t in side[:2]] + [side[2] / n**2] for side in sums)
        noisy = self.read_noise_scale > 0
        return PairState(
            g_plus=gp, g_minus=gm, ref_plus=p0 if seconds > 0 else None, ref_minus=m0 if seconds > 0 else None,
            read_plus=vp.sqrt() if noisy else None, read_minus=vm.sqrt() if noisy else None,
            read_std=torch.sqrt(vp + vm) / self.g_max if noisy else None,
        )

    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        if self.stuck_low or self.stuck_high:  # the stuck draws follow both devices': hold both pairs
            s = self.pair_state(weight, seconds, generator)
            return Realisation(
                weight=(s.g_plus - s.g_minus) / self.g_max, read_std=s.read_std,
                reference=None if s.ref_plus is None else (s.ref_plus - s.ref_minus) / self.g_max,
            )
        return self._realise_by_device(weight, seconds, generator)

    def realise_consuming(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        if self.stuck_low or self.stuck_high or not weight.is_contiguous():
            return self.realise(weight, seconds, generator)
        return self._realise_by_device(weight, seconds, generator, into=weight)

    def programming_draws(self, numel: int, generator: torch.Generator) -> tuple[torch.Tensor, ...] | None:
        """Every pair's G+ and G− programming normals (pair by pair), drawn as :meth:`device_blocks` draws
        them (its ν draws are taken too where they share the generator, so the order holds); None with
        stuck devices."""
        if self.stuck_low or self.stuck_high:
            return None
        seeds = [stream_seeds(numel, generator) for _ in range(4 * self.pairs)]  # per pair: G+ noise, ν, G− noise, ν
        step = _BLOCK if seeds[0] is not None else max(numel, 1)
        z = tuple(torch.empty(numel) for _ in range(2 * self.pairs))
        for start in range(0, numel, step):
            like = z[0][start:start + step]
            for k, stream in enumerate(seeds):
                if k % 2 == 0:
                    z[k // 2][start:start + like.numel()] = gaussian_block(like, stream, start, generator)
                elif stream is None:  # ν from the same generator: drawn to keep the order, not kept
                    gaussian_block(like, None, start, generator)
        return z

    def programmed(self, weight: torch.Tensor, draws: tuple[torch.Tensor, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mean over the pairs of (max(G+ + σ_p z+, 0) − max(G− + σ_p z−, 0)) / g_max, as
        :meth:`device_blocks` programs (targets are continuous), with the variance of that mean's
        programming noise and of one read of it at t0."""
        targets = weight_to_pair(weight, self.g_max)
        stds = [self.prog_std(g) for g in targets]
        held, prog, read = torch.zeros_like(weight), 0.0, 0.0
        for k, z in enumerate(draws):  # every pair's G+, then its G− (summed in device_blocks' order)
            g = (z * stds[k % 2]).add_(targets[k % 2]).clamp_(min=0)
            held.add_(g, alpha=1 if k % 2 == 0 else -1)
            prog = prog + stds[k % 2].square()
            read = read + self.read_std(g, targets[k % 2], 0.0).square()
        full = self.g_max * self.pairs
        return held.div_(full), weight, prog * full**-2, read * full**-2

    def device_blocks(self, weight: torch.Tensor, seconds: float, generator: torch.Generator,
                      normalise: bool = True) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """The realisation of ``weight`` (normalised, any shape, stuck devices off; or tiles made a range at a
        time, :class:`analogllm.chip.state.LazyTiles`) one stream-aligned block of devices at a time, as
        (flat offset, weight, reference at t = 0 or None, read-noise std or None):
        the same draws as :meth:`pair_state` (each pair's G+ programming noise and ν, then G−'s), so a caller that
        needs only sums over the layer (its drift calibration) never holds it whole. ``normalise=False``
        leaves the weight and reference in µS and the read noise as a variance in µS², which is how
        :meth:`_realise_by_device` accumulates them. A block's targets are taken before it is yielded, so
        the caller may overwrite that block of ``weight``."""
        if self.stuck_low or self.stuck_high:
            raise ValueError("device_blocks draws no stuck devices: realise a PCM with stuck devices whole")
        flat = weight.reshape(-1) if isinstance(weight, torch.Tensor) else weight  # or tiles made lazily
        seeds = [stream_seeds(flat.numel(), generator) for _ in range(4 * self.pairs)]  # per pair: G+ noise, ν, G− noise, ν
        step = _BLOCK if seeds[0] is not None else max(flat.numel(), 1)
        for start in range(0, flat.numel(), step):
            w = flat[start:start + step]
            targets = [pair_target(w, self.g_max, 1), pair_target(w, self.g_max, -1)]
            now = ref = var = None
            for k, stream in enumerate(seeds[::2]):  # every pair's G+, then its G−
                g_t, g_prog, read = self._device(targets[k % 2], w, (stream, seeds[2 * k + 1]), start, seconds, generator)
                sign = 1 if k % 2 == 0 else -1
                now = _accumulate(now, g_t, sign)
                ref = _accumulate(ref, g_prog if seconds > 0 else None, sign)
                var = _accumulate(var, read, 1)
            if normalise:
                full = self.g_max * self.pairs
                now.div_(full)
                ref = None if ref is None else ref.div_(full)
                var = None if var is None else var.sqrt_().div_(full)
            yield start, now, ref, var

    def _device(self, g_target: torch.Tensor, like: torch.Tensor, streams: tuple[list[int] | None, list[int] | None],
                start: int, seconds: float, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One block of devices aimed at ``g_target`` (µS): (now, right after programming, read-noise
        variance or None), from their programming-noise and ν streams."""
        z = gaussian_block(like, streams[0], start, generator)
        g_prog = z.mul_(self.prog_std(g_target)).add_(g_target).clamp_(min=0)
        nu = self._nu(g_target, gaussian_block(like, streams[1], start, generator))  # at t = 0 too
        g_t = g_prog * ((seconds + self.drift_t0) / self.drift_t0) ** nu.neg_() if seconds > 0 else g_prog
        read = self.read_std(g_t, g_target, seconds).square_() if self.read_noise_scale > 0 else None
        return g_t, g_prog, read

    def _realise_by_device(self, weight: torch.Tensor, seconds: float, generator: torch.Generator,
                           into: torch.Tensor | None = None) -> Realisation:
        """What :meth:`pair_state` gives without stuck devices, assembled from :meth:`device_blocks`, so the
        transient memory of programming a layer is its outputs (weight, reference, read noise) plus a few
        blocks, not a dozen copies of it. Equal to :meth:`pair_state` up to the last bit of the vectorised
        transcendental functions at block edges. With ``into`` (the weight itself) the weight is written
        over, block by block, once both targets are taken."""
        flat = weight.reshape(-1)
        out = torch.empty_like(flat) if into is None else into.view(-1)
        ref = torch.empty_like(flat) if seconds > 0 else None
        var = torch.empty_like(flat) if self.read_noise_scale > 0 else None
        for start, now, before, noise in self.device_blocks(weight, seconds, generator, normalise=False):
            for total, part in ((out, now), (ref, before), (var, noise)):
                if total is not None:
                    total[start:start + part.numel()].copy_(part)
        full = self.g_max * self.pairs
        return Realisation(weight=out.div_(full).view_as(weight),
                           read_std=None if var is None else var.sqrt_().div_(full).view_as(weight),
                           reference=None if ref is None else ref.div_(full).view_as(weight))


def _accumulate(total: torch.Tensor | None, part: torch.Tensor | None, sign: int) -> torch.Tensor | None:
    """``total`` ± ``part`` in place, or ``part`` itself when it is the first term (None stays None)."""
    if part is None or total is None:
        return part
    return total.add_(part, alpha=sign)
