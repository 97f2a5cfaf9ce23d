"""Phase-change memory (PCM) crossbar, with the statistical model IBM fitted to its devices.

Weights are differential pairs G+ − G− (one device of the pair RESET at 0 µS). One chip instance
draws, in this order and from one generator: programming noise of every device, then its drift
exponent ν. Drift then scales each conductance by ((t + t0)/t0)^(−ν), and 1/f read noise grows with
log time. All defaults are aihwkit's ``PCMLikeNoiseModel`` (Nandakumar et al. 2019, Le Gallo et al.
2023); ``configs/pcm.yaml`` cites them field by field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from analogllm.devices.base import Device, Realisation
from analogllm.devices.conductance import polyval, randn_like, weight_to_pair
from analogllm.config.schema import check


@dataclass(frozen=True)
class PCM(Device):
    """PCM device parameters (x = G / g_max).

    g_max:                 maximum conductance of one device, µS.
    prog_noise:            σ_prog(x) = c0 + c1·x + c2·x² in µS, fitted at ``prog_noise_gmax`` µS
                           (rescaled proportionally to ``g_max``); × ``prog_noise_scale``.
    read_noise_qs, read_noise_exp, read_noise_qs_max: 1/f read noise
                           σ = G·min(qs / x^exp, qs_max)·√ln((t + t_read)/(2·t_read)); × ``read_noise_scale``.
    drift_t0:              seconds after programming at which the reference is read.
    drift_mu / drift_sigma: (slope, intercept, low, high) of μν, σν = clip(slope·ln x + intercept, low, high).
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

    def __post_init__(self) -> None:
        check(self.g_max > 0, "device.g_max", f"must be > 0 µS, got {self.g_max}")
        check(len(self.prog_noise) >= 1, "device.prog_noise", "needs at least one coefficient")
        for name in ("prog_noise_scale", "read_noise_scale", "drift_scale", "read_noise_qs"):
            check(getattr(self, name) >= 0, f"device.{name}", "must be >= 0")
        check(self.drift_t0 > 0 and self.t_read > 0, "device.drift_t0", "drift_t0 and t_read must be > 0")
        check(len(self.drift_mu) == 4 and len(self.drift_sigma) == 4, "device.drift_mu",
              "drift_mu and drift_sigma are (slope, intercept, low, high)")

    @property
    def drifts(self) -> bool:
        return self.drift_scale > 0

    def summary(self) -> str:
        return f"g_max {self.g_max} µS, σ_prog {self.prog_noise[0]:.2f}–{max(self.prog_noise[0], sum(self.prog_noise)):.2f} µS, drift ν≈0.05"

    # ----- the statistical model, one function per effect so tests and exports can use them ----------------
    def prog_std(self, g_target: torch.Tensor) -> torch.Tensor:
        """Programming noise std (µS) for target conductances (µS); RESET devices (G = 0) get none."""
        x = g_target / self.g_max
        std = polyval(self.prog_noise, x).clamp(min=0) * (self.g_max / self.prog_noise_gmax) * self.prog_noise_scale
        return torch.where(g_target > 0, std, torch.zeros_like(std))

    def drift_nu(self, g_prog: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Drift exponents ν = |N(μν(x), σν(x))|, device-to-device spread included."""
        log_x = torch.log((g_prog / self.g_max).clamp(min=1e-6))
        a, b, lo, hi = self.drift_mu
        mu = (a * log_x + b).clamp(lo, hi)
        a, b, lo, hi = self.drift_sigma
        sigma = (a * log_x + b).clamp(lo, hi)
        return (mu + sigma * randn_like(g_prog, generator)).abs() * self.drift_scale

    def read_std(self, g: torch.Tensor, seconds: float) -> torch.Tensor:
        """1/f read noise std (µS) of devices at conductance ``g`` read ``seconds`` after programming."""
        x = (g / self.g_max).clamp(min=1e-6)
        qs = (self.read_noise_qs / x.pow(self.read_noise_exp)).clamp(max=self.read_noise_qs_max)
        t = seconds + self.drift_t0
        return g * qs * math.sqrt(math.log((t + self.t_read) / (2 * self.t_read))) * self.read_noise_scale

    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        pair = []
        for g_target in weight_to_pair(weight, self.g_max):
            g_prog = (g_target + self.prog_std(g_target) * randn_like(g_target, generator)).clamp(min=0)
            nu = self.drift_nu(g_prog, generator)
            g_t = g_prog * ((seconds + self.drift_t0) / self.drift_t0) ** (-nu) if seconds > 0 else g_prog
            pair.append((g_prog, g_t, self.read_std(g_t, seconds)))
        (p0, gp, sp), (m0, gm, sm) = pair
        read = torch.sqrt(sp.square() + sm.square()) / self.g_max
        return Realisation(
            weight=(gp - gm) / self.g_max, read_std=read if self.read_noise_scale > 0 else None,
            reference=(p0 - m0) / self.g_max if seconds > 0 else None,
        )
