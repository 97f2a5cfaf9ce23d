"""Per-input-channel rescaling (SmoothQuant / NORA style), chosen by the chip's expected error.

Dividing input channel j by s_j and multiplying the weight's column j by s_j leaves ``x Wᵀ`` unchanged
but moves dynamic range between the two sides: ``s_j = max|x_j|^α / max|W_:,j|^(1−α)`` flattens the
activations (α → 1, what static DACs need) or the weights (α → 0, what programming noise prefers, since
small conductances are relatively noisier). Which α is best depends on the chip, so every candidate
(and no rescaling at all) is scored with the layer error model of :mod:`analogllm.mapping.error`, each
reader at its own best converter ranges, and the group takes the lowest total.

The chosen s is folded into the activation's producer when the family allows it exactly
(:mod:`analogllm.mapping.families`), at no cost; otherwise the reader gets a digital per-channel
multiply in front of its DAC (one multiply per input per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from analogllm.mapping.capture import Key
from analogllm.mapping.families import Group
from analogllm.mapping.ranges import _candidates
from analogllm.mapping.error import LayerModel, device_variance
from analogllm.nn.matrix import AnalogMatrix
from analogllm.ops.hadamard import Rotation


@dataclass
class ScaleChoice:
    """What a group got: α (None = no rescaling won), folded or digital, the readers that take their
    online rotation (it is kept only where it lowers the predicted error), and the predicted errors."""

    alpha: float | None
    folded: bool
    rotated: tuple[str, ...]
    error: float
    error_unscaled: float


def _score(x: torch.Tensor, w: torch.Tensor, matrix: AnalogMatrix, rotation: Rotation | None, seconds: float,
           adc: str) -> float:
    """A reader's expected relative error at its best DAC range (coarse search) and ADC ranges."""
    if rotation is not None:
        x, w = rotation(x), rotation.exact(w, out=torch.empty_like(w))
    lm = LayerModel(x, w, matrix.tiles, matrix.rows, matrix.config, device_variance(matrix.config, seconds))
    best = float("inf")
    for r in _candidates(lm, 10):
        b = None
        if matrix.config.adc.bits is not None:
            b = (torch.full((lm.m2.shape[0],), float(matrix.config.adc.bound)) if adc == "none"
                 else lm.best_adc(r, matrix.config.adc.bound, per_tile=adc == "tile", grid=12))
        best = min(best, lm.errors(r, b).total)
    return best


@torch.no_grad()
def rescale_(groups: list[Group], layers: dict[str, tuple[AnalogMatrix, torch.Tensor]],
             inputs: dict[Key, torch.Tensor], rotations: dict[str, Rotation], alphas: tuple[float, ...],
             seconds: float = 0.0, adc: str = "tile", progress: bool = False) -> dict[str, ScaleChoice]:
    """Choose and apply a rescaling per group (``alphas`` empty: none, only the rotation choice).
    ``layers``: name → (matrix, weight (out, in) view); ``rotations``: candidate online rotations, each
    scored with and without, per reader. Captured inputs of folded readers are divided by s in
    ``inputs``, so later steps see what the layers now receive."""
    out: dict[str, ScaleChoice] = {}
    for g in tqdm(groups, desc="rescaling", disable=not progress, leave=False):
        if any(layers[r][0].experts for r in g.readers) or any((r, None) not in inputs for r in g.readers):
            continue  # MoE expert stacks and layers the calibration text never reached are not rescaled
        xs = {r: inputs[(r, None)] for r in g.readers}
        ws = {r: layers[r][1].detach().float().cpu() for r in g.readers}
        xa = g.reduce(torch.stack([x.abs().amax(0) for x in xs.values()]).amax(0)).clamp(min=1e-6)
        wa = g.reduce(torch.stack([w.abs().amax(0) for w in ws.values()]).amax(0)).clamp(min=1e-6)

        def total(s: torch.Tensor | None) -> tuple[float, tuple[str, ...]]:
            err, rotated = 0.0, []
            for r in g.readers:
                se = None if s is None else g.expand(s)
                x = xs[r] if se is None else xs[r] / se
                w = ws[r] if se is None else ws[r] * se
                plain = _score(x, w, layers[r][0], None, seconds, adc)
                turned = _score(x, w, layers[r][0], rotations[r], seconds, adc) if r in rotations else plain
                err += min(plain, turned)
                if turned < plain:
                    rotated.append(r)
            return err, tuple(rotated)

        base, rotated = total(None)
        best = (base, None, None, rotated)
        for alpha in alphas:
            s = xa.pow(alpha) / wa.pow(1 - alpha)
            s = s / s.log().mean().exp()  # geometric mean 1: the weights' overall scale is left alone
            e, rot = total(s)
            if e < best[0]:
                best = (e, alpha, s, rot)
        err, alpha, s, rotated = best
        if s is not None:
            apply_scale(g, s, layers, inputs)
        out[g.name] = ScaleChoice(alpha=alpha, folded=s is not None and g.fold is not None, rotated=rotated,
                                  error=err, error_unscaled=base)
    return out


def apply_scale(g: Group, s: torch.Tensor, layers: dict[str, tuple[AnalogMatrix, torch.Tensor]],
           inputs: dict[Key, torch.Tensor]) -> None:
    se = g.expand(s)
    if g.fold is not None:
        g.fold(s)
        for r in g.readers:
            matrix, w = layers[r]
            w.mul_(se.to(w.dtype).to(w.device))
            inputs[(r, None)] = inputs[(r, None)] / se
        return
    (r,) = g.readers
    matrix, w = layers[r]
    transform = matrix.set_transform(scale=True)
    transform.inv_scale.copy_(1.0 / se)
    w.copy_(transform.absorb(w))


__all__ = ["ScaleChoice", "apply_scale", "rescale_"]
