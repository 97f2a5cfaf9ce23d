"""Error-optimal weight clipping: the bound of every tile column chosen by the chip's expected error.

A crossbar column stores its weights as conductances scaled so that the column's largest weight sits at
g_max (the tile-column scale M). Programming noise, drift spread and read noise are fractions of g_max,
so one outlier weight sets the noise of every other weight in its column, as one outlier activation sets
the DAC step of every other input. Clipping the column at a fraction f of its abs-max trades the two:
the clipped weights' error against a noise floor (and an output-noise term) that shrinks by f². With
the normalised weight a = |w|/M, the per-token power weights p_i of input i (the token weighting of
:mod:`analogllm.mapping.error`) and the layer's DAC range r, the column's expected squared error is

    M² [ Σ_i p_i ((a_i − f)₊² + f² v(min(a_i / f, 1))) + f² r² σ_out² Σ_n w_n ]

(``v`` the device's variance table at the deployment time). Each tile column takes the f of a grid that
minimises it. The DAC step and the ADC terms do not depend on f to first order (the normalised outputs
grow by 1/f and the recalibrated ADC range with them), so the converter ranges are calibrated again
after clipping rather than modelled here.

Unlike the other mapping steps this one changes the model's function: it is lossy in exact arithmetic
and pays only on a noisy chip. On the ideal profile (no device variance, no output noise) every column
keeps f = 1, so the step is the identity there. Measured on SmolLM2-135M on pcm (docs/mapping.md): the
chosen bounds are mostly 0.8–0.9 of the column max, and the chip's perplexity drops by about a sixth at
0 s and a fifth at 1 day.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from analogllm.chip.state import tile_scales
from analogllm.chip.statistics import output_variance
from analogllm.mapping.capture import Key
from analogllm.mapping.error import device_variance, token_weights
from analogllm.mapping.ranges import dac_inputs
from analogllm.nn.matrix import AnalogMatrix


@dataclass
class ClipChoice:
    """What one matrix (or expert) got: the mean chosen bound as a fraction of the tile column's
    abs-max, the fraction of its weights that clipping changed, and the predicted relative error of the
    weight and output noise terms with and without clipping."""

    mean_fraction: float
    clipped: float
    error: float
    error_unclipped: float


def _dac_range(matrix: AnalogMatrix, expert: int | None, x: torch.Tensor) -> float:
    """The DAC range the clip trades against, in the units of the DAC-side inputs ``x``: the calibrated
    static range, 1 for per-token dynamic ranges (``x`` is then normalised per token), else the inputs'
    abs-max (an unset static range clips nothing)."""
    if matrix.config.dac.range == "dynamic":
        return 1.0
    if hasattr(matrix, "input_range") and matrix.range_set:
        r = matrix.input_range if expert is None else matrix.input_range[expert]
        return float(r.reshape(-1)[0])
    return float(x.abs().max().clamp(min=1e-12))


def clip_columns_(matrix: AnalogMatrix, weight: torch.Tensor, x: torch.Tensor, fractions: tuple[float, ...],
                  seconds: float, expert: int | None = None) -> ClipChoice:
    """Clip ``weight`` (out, in; written in place) column by column on ``matrix``'s tiles at the bound
    of ``fractions`` (1, no clipping, is always a candidate) that minimises the expected error for the
    raw calibration inputs ``x``."""
    xd = dac_inputs(matrix, x, weight.device)
    w = weight.detach().float().cpu()
    var = device_variance(matrix.config, seconds)
    out_var = output_variance(matrix.config)
    wn = token_weights(xd, w)
    power = wn @ xd.square()  # (in,): Σ_n w_n x_n,i²
    r = _dac_range(matrix, expert, xd)
    out_term = r * r * out_var * float(wn.sum())
    fr = sorted(set(fractions) | {1.0}, reverse=True)
    scales = tile_scales(w, matrix.tiles, matrix.rows).squeeze(-1)  # (T, out), what programming divides by
    chosen, changed, err, err1 = [], 0, 0.0, 0.0
    for t in range(matrix.tiles):
        cols = slice(t * matrix.rows, min((t + 1) * matrix.rows, w.shape[1]))
        wt, p, m = w[:, cols], power[cols], scales[t]
        a = wt.abs() / m[:, None]
        # (F, out), one candidate at a time: each is a tile-sized temporary
        cost = torch.stack([((a - f).clamp(min=0).square() + f * f * var.lookup(a / f)) @ p + f * f * out_term
                            for f in fr])
        best = cost.min(0)
        chosen.append(torch.tensor(fr)[best.indices])
        err += float(best.values @ m.square())
        err1 += float(cost[0] @ m.square())
        bound = (chosen[-1] * m)[:, None].to(weight.dtype).to(weight.device)
        block = weight[:, cols]
        changed += int((block.abs() > bound).sum())
        block.copy_(torch.maximum(torch.minimum(block, bound), -bound))
    n = xd.shape[0]
    frac = torch.cat(chosen)
    return ClipChoice(mean_fraction=float(frac.mean()), clipped=changed / w.numel(),
                      error=err / n, error_unclipped=err1 / n)


@torch.no_grad()
def clip_weights_(layers: dict[str, tuple[AnalogMatrix, torch.Tensor]], inputs: dict[Key, torch.Tensor],
                  fractions: tuple[float, ...], seconds: float = 0.0,
                  progress: bool = False) -> dict[str, ClipChoice]:
    """Clip every matrix of ``layers`` (name → (matrix, weight view)) that ``inputs`` has samples for."""
    out: dict[str, ClipChoice] = {}
    for name, (matrix, weight) in tqdm(layers.items(), desc="clipping weights", disable=not progress, leave=False):
        experts = [None] if matrix.experts is None else list(range(matrix.experts))
        for e in experts:
            x = inputs.get((name, e))
            if x is None or x.shape[0] == 0:
                continue  # a layer (or expert) the calibration text never reached is left as it is
            w = weight if e is None else weight[e]
            out[name if e is None else f"{name}[{e}]"] = clip_columns_(matrix, w, x, fractions, seconds, e)
    return out


__all__ = ["ClipChoice", "clip_columns_", "clip_weights_"]
