"""The converter ranges of every analogue layer, calibrated from data: one calibrator for all callers.

A static DAC clips at its range r and resolves 2^(bits−1) − 1 levels below it; an ADC saturates at its
range B and steps by 2B/(2^bits − 2). Where to put them is a trade between clipping, rounding and the
analogue noise that a small signal drowns in, so the default method (``error``) picks, per layer, the
DAC range and the ADC range of each tile (or one per layer) that minimise the layer's expected relative
output error under the profile's own device statistics (:mod:`analogllm.mapping.error`). ``max`` (no
clipping) and ``std`` (``std_alpha`` standard deviations of the inputs, aihwkit's ``init_std_alpha``)
remain as simple alternatives; the ADC is still calibrated for the DAC range they set.

An ADC range can only be narrowed below the profile's full scale ``adc.bound`` (a higher gain in front
of the ADC), never widened.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from analogllm.mapping.capture import Key
from analogllm.mapping.error import LayerErrors, LayerModel, device_variance
from analogllm.nn.convert import analog_matrices
from analogllm.nn.matrix import AnalogMatrix
from analogllm.nn.weight import AnalogWeight


@dataclass
class RangeChoice:
    """What the calibrator set for one matrix (or expert)."""

    dac_range: float | None
    dac_k: float | None  # the range in input standard deviations (RMS)
    adc_ranges: list[float] | None
    errors: LayerErrors


def _candidates(lm: LayerModel, count: int = 24) -> list[float]:
    """DAC ranges from 1.5 RMS up to 4× the largest input: beyond the largest input the DAC loses
    resolution, but the outputs shrink, so a layer whose ADCs saturate at their full scale can still gain."""
    top = max(lm.amax / lm.rms * 4.0, 2.0)
    return [lm.rms * float(k) for k in torch.logspace(torch.log10(torch.tensor(1.5)), torch.log10(torch.tensor(top)), count)]


def best_ranges(lm: LayerModel, method: str, adc: str, std_alpha: float = 12.0, headroom: float = 1.0) -> RangeChoice:
    """The DAC range by ``method`` (error | max | std) and the ADC ranges by ``adc`` (tile | layer | none)
    for the layer model ``lm``; with ``error``, the chosen DAC range × ``headroom`` while the ADC ranges
    stay those chosen for the unwidened range, so every output reaches its ADC ``headroom``× below the
    range the error model would give it."""
    cfg = lm.config
    has_adc = cfg.adc.bits is not None

    def adc_for(r: float) -> torch.Tensor | None:
        if not has_adc:
            return None
        if adc == "none":
            return torch.full((lm.m2.shape[0],), float(cfg.adc.bound))
        return lm.best_adc(r, cfg.adc.bound, per_tile=adc == "tile")

    if method == "max":
        rs = [lm.amax]
    elif method == "std":
        rs = [std_alpha * float(lm.x.std())]
    else:
        rs = _candidates(lm)
    best: tuple[float, float, torch.Tensor | None, LayerErrors] | None = None
    for r in rs:
        b = adc_for(r)
        e = lm.errors(r, b)
        if best is None or e.total < best[0]:
            best = (e.total, r, b, e)
    assert best is not None
    _, r, b, e = best
    if method == "error" and headroom != 1.0:
        r = r * headroom
        e = lm.errors(r, b)
    return RangeChoice(dac_range=r, dac_k=r / lm.rms, adc_ranges=None if b is None else b.tolist(), errors=e)


def dac_inputs(matrix: AnalogMatrix, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What ``matrix``'s DACs see for raw inputs ``x`` (on the CPU): its input transform applied, and
    every row normalised by its own max where the DAC ranges are per token."""
    with torch.no_grad():
        if matrix.transform is not None:
            x = matrix.transform(x.to(device)).cpu()
        if matrix.config.dac.range == "dynamic":
            x = x / x.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    return x.float()


def layer_model(matrix: AnalogMatrix, weight: torch.Tensor, x: torch.Tensor, seconds: float) -> LayerModel:
    """The error model of ``matrix`` for raw inputs ``x`` (its input transform applied here)."""
    x = dac_inputs(matrix, x, weight.device)
    return LayerModel(x, weight.detach().float().cpu(), matrix.tiles, matrix.rows, matrix.config,
                      device_variance(matrix.config, seconds))


@torch.no_grad()
def calibrate_ranges_(model: nn.Module, inputs: dict[Key, torch.Tensor], method: str = "error", adc: str = "tile",
                      std_alpha: float = 12.0, seconds: float = 0.0, progress: bool = False,
                      names: set[str] | None = None, headroom: float = 1.0) -> dict[str, RangeChoice]:
    """Set the DAC range and ADC ranges of every analogue matrix that ``inputs`` has samples for (of
    those called ``names``, when given); ``headroom`` widens the ``error`` method's DAC ranges."""
    weight_side = {id(p.analog) for p in model.modules() if isinstance(p, AnalogWeight)}
    out: dict[str, RangeChoice] = {}
    items = [(n, m, w) for n, m, w in analog_matrices(model)
             if id(m) not in weight_side and (names is None or n in names)]
    for name, matrix, weight in tqdm(items, desc="calibrating ranges", disable=not progress, leave=False):
        experts = [None] if matrix.experts is None else list(range(matrix.experts))
        for e in experts:
            x = inputs.get((name, e))
            if x is None or x.shape[0] == 0:
                continue  # an expert no calibration token was routed to keeps its defaults
            w = weight if e is None else weight[e]
            choice = best_ranges(layer_model(matrix, w, x, seconds), method, adc, std_alpha, headroom)
            _apply(matrix, e, choice)
            out[name if e is None else f"{name}[{e}]"] = choice
    return out


def _apply(matrix: AnalogMatrix, expert: int | None, choice: RangeChoice) -> None:
    idx = () if expert is None else (expert,)
    if choice.dac_range is not None and hasattr(matrix, "input_range") and matrix.config.dac.range != "dynamic":
        matrix.input_range[idx] = choice.dac_range
        matrix.mark_range_set()
    if choice.adc_ranges is not None:
        matrix.output_range[idx] = torch.tensor(choice.adc_ranges, dtype=matrix.output_range.dtype)


__all__ = ["RangeChoice", "best_ranges", "calibrate_ranges_", "dac_inputs", "layer_model"]
