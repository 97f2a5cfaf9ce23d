"""The ideal device: the chip computes exactly the programmed matrix.

Used as the reference that an analogised model must reproduce bit-for-bit (up to float rounding), and
as the base for experiments that isolate converter effects (DAC/ADC, tiling) from device physics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analogllm.devices.base import Device, Realisation


@dataclass(frozen=True)
class Ideal(Device):
    kind = "ideal"

    @property
    def is_ideal(self) -> bool:
        return True

    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        return Realisation(weight=weight)
