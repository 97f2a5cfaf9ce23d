"""Resistive RAM (RRAM) crossbar with multi-level cells.

RRAM cells are programmed to one of a finite number of conductance levels (program-and-verify), with
a programming error that peaks at low-to-mid conductance (Wan et al., Nature 2022, as fitted in
aihwkit ``ReRamWan2022``), a fixed device-to-device gain variation, and read noise. Its I–V curve and
sense amplifier saturate: profiles pair this device with ``output.nonlinearity: tanh``. RRAM filaments
are taken as stable over the times analogllm sweeps, so ``drift_`` leaves an RRAM chip unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analogllm.devices.base import Device, Realisation
from analogllm.devices.conductance import interp, randn_like, weight_to_pair
from analogllm.config.schema import check


@dataclass(frozen=True)
class RRAM(Device):
    """RRAM device parameters (x = G / g_max).

    g_max:         maximum conductance, µS (≈ 40 µS, NeuRRAM fit).
    levels:        programmable conductance levels per device, 0 and g_max included.
    prog_noise_x / prog_noise_us: measured programming-noise curve σ(x) in µS, linear between points.
    d2d_std:       device-to-device relative gain spread, fixed per chip instance.
    read_noise:    read noise std relative to g_max, fresh at every read.
    """

    kind = "rram"

    g_max: float = 40.0
    levels: int = 32
    prog_noise_x: tuple[float, ...] = (0.0, 0.25, 1.0)
    prog_noise_us: tuple[float, ...] = (0.35, 2.3, 1.1)
    d2d_std: float = 0.02
    read_noise: float = 0.01

    def __post_init__(self) -> None:
        check(self.g_max > 0, "device.g_max", f"must be > 0 µS, got {self.g_max}")
        check(self.levels >= 2, "device.levels", f"must be >= 2, got {self.levels}")
        check(len(self.prog_noise_x) == len(self.prog_noise_us) >= 2, "device.prog_noise_x",
              "prog_noise_x and prog_noise_us need the same number (>= 2) of points")
        check(list(self.prog_noise_x) == sorted(self.prog_noise_x), "device.prog_noise_x", "must be increasing")
        check(self.d2d_std >= 0 and self.read_noise >= 0, "device.d2d_std", "d2d_std and read_noise must be >= 0")

    def summary(self) -> str:
        return f"g_max {self.g_max} µS, {self.levels} levels, d2d {self.d2d_std}, read {self.read_noise}"

    def quantize_levels(self, g: torch.Tensor) -> torch.Tensor:
        """Nearest programmable level (µS)."""
        step = self.g_max / (self.levels - 1)
        return torch.round(g / step) * step

    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        gs = []
        for g_target in weight_to_pair(weight, self.g_max):
            g_level = self.quantize_levels(g_target)
            std = interp(g_level / self.g_max, self.prog_noise_x, self.prog_noise_us)
            std = torch.where(g_level > 0, std, torch.zeros_like(std))
            g = g_level + std * randn_like(g_level, generator)
            g = g * (1 + self.d2d_std * randn_like(g, generator))
            gs.append(g.clamp(0, self.g_max * 1.2))
        read = None
        if self.read_noise > 0:
            read = torch.full_like(weight, self.read_noise * 2**0.5)  # both devices of the pair read
        return Realisation(weight=(gs[0] - gs[1]) / self.g_max, read_std=read)
