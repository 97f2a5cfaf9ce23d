"""Training-free mapping of a converted model onto the chip's static converters.

Off-the-shelf LLMs collapse on an analogue chip not because of their weights but because of their
activations: a few outlier channels and tokens set every static DAC range, so the bulk of each input
vector is tiny next to the output noise and the ADC step (SmolLM2-135M on the pcm profile: perplexity
~1e8 with abs-max ranges). :func:`map_` fixes the mapping, each step switchable (``AnalogConfig.mapping``)
and reported:

1. ``rotate``: rotate the residual stream and the value heads by orthogonal (Hadamard) matrices folded
   exactly into the weights (:mod:`.rotate`; pre-norm RMSNorm transformers);
2. ``rescale``: per-input-channel rescaling chosen by the expected chip error, folded into the producing
   norm or linear where exact, else a digital scale in front of the DAC (:mod:`.rescale`);
3. ``online_rotation``: an online fast Hadamard transform in front of layers whose input a nonlinearity
   makes (the MLP down projection), the weight absorbing its inverse (:mod:`analogllm.nn.transform`);
4. ``ranges`` / ``adc``: DAC and ADC ranges that minimise the expected error (:mod:`.ranges`);
5. ``clip``: every tile column's weights clipped at the bound that minimises the expected error under
   the device noise (:mod:`.clip`), then the ranges of step 4 calibrated again for the clipped weights.

Steps 1–4 leave the model's function unchanged in exact arithmetic; step 5 trades a small exact-
arithmetic error for less device noise, and keeps every weight on the ideal profile, so there the
mapped model reproduces the digital logits. On a noisy chip each step lowers the output error.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from analogllm.chip.correct import correction_macs
from analogllm.config.analog import MappingConfig
from analogllm.mapping.capture import capture_inputs
from analogllm.mapping.clip import ClipChoice, clip_weights_
from analogllm.mapping.families import rescale_groups
from analogllm.mapping.ranges import RangeChoice, calibrate_ranges_, dac_inputs
from analogllm.mapping.rescale import ScaleChoice, rescale_
from analogllm.mapping.rotate import ResidualRotation, supports_rotation
from analogllm.nn.convert import analog_matrices
from analogllm.nn.matrix import AnalogMatrix
from analogllm.nn.weight import AnalogWeight
from analogllm.ops.hadamard import Rotation


@dataclass
class MappingReport:
    """What :func:`map_` did: the residual rotation, per-group rescaling, per-layer online rotations,
    converter ranges and weight clipping with their predicted relative errors, and the digital work it
    added."""

    rotation: dict | None = None
    rescaled: dict[str, ScaleChoice] = field(default_factory=dict)
    online: list[str] = field(default_factory=list)
    ranges: dict[str, RangeChoice] = field(default_factory=dict)
    clipped: dict[str, ClipChoice] = field(default_factory=dict)
    compensated: list[str] = field(default_factory=list)
    dac_headroom: float = 1.0
    correction_rank: int = 0
    digital_macs_per_token: int = 0
    kv_prefix: tuple[int, int] | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the conversion report."""
        lines = [f"mapping ({self.seconds:.1f} s):"]
        if self.rotation:
            lines.append(f"  residual stream rotated (d = {self.rotation['residual']}, value heads d = "
                         f"{self.rotation['value_heads']}{', LM head untied' if self.rotation['untied_lm_head'] else ''}"
                         f"{'; tied LM head kept: rotated online at the embedding and the head' if self.rotation.get('online_tied_head') else ''})")
        if self.rescaled:
            chosen = [c for c in self.rescaled.values() if c.alpha is not None]
            folded = sum(c.folded for c in chosen)
            lines.append(f"  rescaled {len(chosen)}/{len(self.rescaled)} input groups ({folded} folded exactly, "
                         f"{len(chosen) - folded} as a digital scale)")
        if self.online:
            lines.append(f"  online Hadamard in front of {len(self.online)} layers (where it lowers the predicted error)")
        if self.ranges:
            errs = [c.errors.total for c in self.ranges.values()]
            lines.append(f"  converter ranges of {len(self.ranges)} matrices: predicted relative output error "
                         f"mean {sum(errs) / len(errs):.2e}, worst {max(errs):.2e}"
                         + (f"; DAC ranges {self.dac_headroom:g}x the error model's (mapping.dac_headroom)"
                            if self.dac_headroom != 1.0 else ""))
        if self.clipped:
            cs = list(self.clipped.values())
            before, after = sum(c.error_unclipped for c in cs), sum(c.error for c in cs)
            lines.append(f"  weights of {len(cs)} matrices clipped per tile column: mean bound "
                         f"{sum(c.mean_fraction for c in cs) / len(cs):.2f} of the column max, "
                         f"{100 * sum(c.clipped for c in cs) / len(cs):.2f} % of weights changed, predicted "
                         f"weight + output noise error {after / max(before, 1e-30):.2f}x of unclipped")
        if self.compensated:
            lines.append(f"  closed-loop programming of {len(self.compensated)} matrices (input moments stored for "
                         "the programmer)")
        if self.correction_rank:
            lines.append(f"  measured rank-{self.correction_rank} correction after the ADCs of every matrix, "
                         "recomputed from a read of the devices at every age (mapping.correction_rank)")
        lines.append(f"  digital work added per token: {self.digital_macs_per_token:,} operations")
        if self.kv_prefix:
            lines.append(f"  digital KV prefix of {self.kv_prefix[0]} token(s): {self.kv_prefix[1]:,} keys and values "
                         "computed from the exact weights, stored for every sequence (kv_prefix)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def table(self) -> list[tuple[str, ...]]:
        """One row per calibrated matrix: name, DAC range (in RMS), ADC ranges, predicted error parts."""
        rows = []
        for name, c in self.ranges.items():
            adc = "-" if c.adc_ranges is None else "/".join(f"{b:.2f}" for b in c.adc_ranges)
            e = c.errors
            rows.append((name, f"{c.dac_k:.1f}" if c.dac_k else "-", adc, f"{e.dac:.1e}", f"{e.weights:.1e}",
                         f"{e.output:.1e}", f"{e.adc:.1e}", f"{e.total:.1e}"))
        return rows


def _rotation_seed(base: int, name: str) -> int:
    return (base * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(name))) % (2**31)


@torch.no_grad()
def map_(model: nn.Module, blocks: torch.Tensor, spec: MappingConfig | None = None,
         progress: bool = False) -> MappingReport:
    """Map the converted ``model`` onto its chip with calibration text ``blocks`` (LongTensor [n, L])."""
    spec = spec or model.analog_config.mapping
    start = time.perf_counter()
    report = MappingReport()
    rotation = begin_rotation(model, spec, report)
    if rotation is not None:
        for layer in model.model.layers:
            rotation.rotate_layer_(layer)
    inputs = capture_inputs(model, blocks, spec.tokens, seed=spec.seed, progress=progress)
    map_layers_(model, inputs, spec, report, progress=progress)
    report.seconds = time.perf_counter() - start
    return report


def begin_rotation(model: nn.Module, spec: MappingConfig, report: MappingReport) -> ResidualRotation | None:
    """Step 1 outside the decoder layers, as ``spec.rotate`` says, recorded in ``report``: the residual
    rotation, whose :meth:`~ResidualRotation.rotate_layer_` the caller applies to every decoder layer
    (all at once, or each as it is read), or None when there is none."""
    if not spec.rotate:
        return None
    if not supports_rotation(model):
        report.notes.append("residual rotation skipped: the family is not a pre-norm RMSNorm transformer")
        return None
    rotation = ResidualRotation(model, spec.seed)
    report.rotation = rotation.rotate_outside_()
    report.digital_macs_per_token += report.rotation.get("digital_macs_per_token", 0)
    return rotation


@torch.no_grad()
def map_layers_(model: nn.Module, inputs: dict, spec: MappingConfig, report: MappingReport,
                names: set[str] | None = None, progress: bool = False) -> None:
    """The per-layer steps of :func:`map_` (rescaling, online rotations, converter ranges, weight
    clipping) for the analogue matrices called ``names`` (default: all), from their captured ``inputs``;
    adds to ``report``. Every
    step reads and writes only the layers of one decoder block, so a model mapped block by block
    (:mod:`analogllm.hf.streaming`) gets the same result as one mapped whole."""
    weight_side = {id(p.analog) for p in model.modules() if isinstance(p, AnalogWeight)}
    layers = {n: (m, w) for n, m, w in analog_matrices(model)
              if id(m) not in weight_side and (names is None or n in names)}
    patterns = [re.compile(p) for p in spec.online_rotation]
    rotations = {n: Rotation(m.in_features, _rotation_seed(spec.seed, n)) for n, (m, _) in layers.items()
                 if m.experts is None and any(p.search(n) for p in patterns)}
    online: list[str] = []
    if spec.rescale or rotations:
        choices = rescale_(rescale_groups(model, set(layers)), layers, inputs, rotations,
                           spec.alphas if spec.rescale else (), spec.seconds, spec.adc, progress)
        if spec.rescale:
            report.rescaled.update(choices)
        online = sorted(r for c in choices.values() for r in c.rotated)
    for name in online:
        add_rotation(layers[name][0], layers[name][1], rotations[name])
    report.online = sorted(report.online + online)
    if spec.ranges == "error":
        report.dac_headroom = spec.dac_headroom

    def ranges() -> None:
        if spec.ranges != "none":
            report.ranges.update(calibrate_ranges_(model, inputs, spec.ranges, spec.adc, spec.std_alpha,
                                                   spec.seconds, progress, names=set(layers),
                                                   headroom=spec.dac_headroom))

    ranges()
    if spec.clip:
        report.clipped.update(clip_weights_(layers, inputs, spec.clip_fractions, spec.seconds, progress))
        ranges()  # the clipped weights' outputs are larger in normalised units: the ADC follows
    if spec.compensate:
        report.compensated += fit_moments_(layers, inputs, spec.compensate_rank)
    report.digital_macs_per_token += sum(m.transform.macs_per_token() for m, _ in layers.values()
                                         if m.transform is not None)
    if spec.correction_rank:
        report.correction_rank = spec.correction_rank
        report.digital_macs_per_token += sum(
            correction_macs(spec.correction_rank, m.in_features, w.shape[-2]) * (m.experts or 1)
            for m, w in layers.values())


def fit_moments_(layers: dict[str, tuple[AnalogMatrix, torch.Tensor]], inputs: dict, rank: int) -> list[str]:
    """Give every matrix of ``layers`` whose device can be programmed in closed loop the second moment of
    its DAC-side calibration inputs (:class:`~analogllm.chip.compensate.InputMoment`); the names done.
    Expert stacks keep open-loop programming (one moment per expert is not stored)."""
    done, last = [], None
    for name, (matrix, weight) in layers.items():
        x = inputs.get((name, None))
        if x is None or matrix.experts is not None or not matrix.config.device.closed_loop:
            continue
        x = dac_inputs(matrix, x, weight.device)
        moment = matrix.set_moment(min(rank, matrix.in_features))
        if last is not None and last[1].rank == moment.rank and torch.equal(last[0], x):
            moment.load_state_dict(last[1].state_dict())  # q/k/v, gate/up: one input, one eigendecomposition
        else:
            moment.fit_(x)
        last = (x, moment)
        matrix.chip.clear()  # a chip realised before it was open loop
        done.append(name)
    return done


def _saved_matrices(model: nn.Module, specs: dict, what: str) -> dict[str, AnalogMatrix]:
    """The model's analogue matrices by name, refusing saved ``specs`` that name one it does not have."""
    matrices = {n: m for n, m, _ in analog_matrices(model)}
    unknown = [n for n in specs if n not in matrices]
    if unknown:
        raise ValueError(f"saved {what} name layers this model does not have: {unknown[:3]}")
    return matrices


def moment_specs(model: nn.Module) -> dict[str, int]:
    """Every analogue matrix's input-moment rank (to save beside a checkpoint and rebuild on load)."""
    return {n: m.moment.rank for n, m, _ in analog_matrices(model) if m.moment is not None}


def restore_moments_(model: nn.Module, specs: dict[str, int]) -> None:
    """Rebuild the input moments of :func:`moment_specs` (their buffers are loaded afterwards)."""
    matrices = _saved_matrices(model, specs, "input moments")
    for name, rank in specs.items():
        matrices[name].set_moment(int(rank))


def add_rotation(matrix: AnalogMatrix, weight: torch.Tensor, rotation: Rotation) -> None:
    """Give ``matrix`` an online rotation (keeping a digital scale it may already have) and fold the
    rotation's inverse into its weight."""
    old = matrix.transform
    scaled = old is not None and old.inv_scale is not None
    transform = matrix.set_transform(scale=scaled, rotation_seed=None)
    if scaled:
        transform.inv_scale.copy_(old.inv_scale)
    transform.rotation = rotation.to(weight.device)
    transform.rotation_seed = rotation.seed
    rotation.to(weight.device).exact(weight, out=weight)


def transform_specs(model: nn.Module) -> dict[str, dict]:
    """Every analogue matrix's input transform (to save beside a checkpoint and rebuild on load)."""
    return {n: m.transform.spec() for n, m, _ in analog_matrices(model) if m.transform is not None}


def restore_transforms_(model: nn.Module, specs: dict[str, dict]) -> None:
    """Rebuild the input transforms of :func:`transform_specs` (their buffers are loaded afterwards)."""
    matrices = _saved_matrices(model, specs, "input transforms")
    for name, spec in specs.items():
        matrices[name].set_transform(scale=bool(spec.get("scale")), rotation_seed=spec.get("rotation_seed"))


__all__ = ["MappingReport", "add_rotation", "begin_rotation", "fit_moments_", "map_", "map_layers_", "moment_specs", "restore_moments_",
           "restore_transforms_", "transform_specs"]
