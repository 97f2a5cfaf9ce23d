"""What a chip does to a weight, as statistics: the mean error and the variance of a realised weight.

The device model answers "which matrix does this chip instance compute?" one instance at a time. The
mapping's error model and drift-aware training need the answer as statistics instead: for a normalised
weight of magnitude |w|, the mean of (realised − target) (``bias``: e.g. small conductances drifting
faster than large ones, left over by the global drift compensation) and its variance (``var``:
programming noise, drift spread, read noise, levels, mesh errors). Both are measured by programming a
random probe tile with the device model itself at the deployment time, and drift compensation as the
chip applies it, so they follow whatever the device models, and a new device needs nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from analogllm.config import AnalogConfig
from analogllm.devices.base import Device

#: |w| grid of the tables
LEVELS = 33


@dataclass(frozen=True, eq=False)
class Table:
    """A function of |w| ∈ [0, 1] on :data:`LEVELS` grid points, linearly interpolated."""

    values: torch.Tensor

    def lookup(self, a: torch.Tensor) -> torch.Tensor:
        # in place where autograd allows: a layer-sized lookup would otherwise hold ten copies of it
        table = self.values.to(device=a.device, dtype=a.dtype)
        pos = a.clamp(0, 1).mul_(len(table) - 1)
        lo = pos.long().clamp_(max=len(table) - 2)  # truncation is the floor: pos >= 0
        # index_select on the flat indices: a gather ~15x faster than advanced indexing (table[lo]) on CPU
        flat = lo.reshape(-1)
        base = table.index_select(0, flat).view_as(lo)
        return base.addcmul_(table.diff().index_select(0, flat).view_as(lo), pos.sub_(lo))

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """w + sign(w)·bias(|w|): the mean realised weight (for a bias table)."""
        return w + torch.sign(w) * self.lookup(w.abs())


@lru_cache(maxsize=64)
def _tables(device: Device, seconds: float, config: AnalogConfig) -> tuple[Table, Table, float]:
    from analogllm.chip.state import drift_compensation

    gen = torch.Generator().manual_seed(1234)
    w = torch.rand(8, 64, 256, generator=gen) * 2 - 1
    w = w / w.abs().amax(-1, keepdim=True)  # every column reaches full scale, as a layer's tiles do
    real = device.realise(w, seconds, torch.Generator().manual_seed(4321))
    gain = float(real.gain)
    if config.drift.compensation and device.drifts and seconds > 0:
        ref, ref_read = real.reference, None
        if ref is None:
            at0 = device.realise(w, 0.0, torch.Generator().manual_seed(4321))
            ref, ref_read = at0.weight, at0.read_std
        gain = gain * drift_compensation(config, ref, ref_read, real.weight, real.read_std, 0, 0)
    err = (real.weight * gain - w) * torch.sign(w)  # along the weight's own sign: positive = larger than the target
    # the compensation scales a read's noise with its signal (after the ADC or through longer pulses)
    read = (real.read_std * gain).square() if real.read_std is not None else torch.zeros_like(w)
    idx = (w.abs() * (LEVELS - 1)).round().long().flatten()
    count = torch.zeros(LEVELS).index_add_(0, idx, torch.ones(idx.numel())).clamp(min=1)
    mean = torch.zeros(LEVELS).index_add_(0, idx, err.flatten()) / count
    square = torch.zeros(LEVELS).index_add_(0, idx, err.square().flatten()) / count
    read_mean = torch.zeros(LEVELS).index_add_(0, idx, read.flatten()) / count
    var = (square - mean.square()).clamp(min=0) + read_mean
    return Table(mean), Table(var), gain


def output_variance(config: AnalogConfig) -> float:
    """The signal-independent variance of a tile output (normalised units): the output stage's noise and
    the device's constant detector term (the signal-dependent term a·|y| is the caller's)."""
    return config.output.noise**2 + config.device.output_var_terms()[1]


def device_statistics(config: AnalogConfig, seconds: float) -> tuple[Table, Table]:
    """(bias, var) of ``config``'s device at ``seconds`` after programming, with its drift compensation."""
    return _tables(config.device, float(seconds), config)[:2]


def compensation_gain(config: AnalogConfig, seconds: float) -> float:
    """The drift compensation α (× the device's own gain) of the probe tile at ``seconds``: how much the
    arrays' outputs have shrunk by then (1 without drift or compensation)."""
    return _tables(config.device, float(seconds), config)[2]


__all__ = ["LEVELS", "Table", "compensation_gain", "device_statistics", "output_variance"]
