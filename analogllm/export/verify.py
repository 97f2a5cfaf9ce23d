"""Verifying a map: does programming these files reproduce the analogue model that was exported?

A map holds *targets*, not a chip: the conductances or phases a chip is programmed to. A real chip
then adds its own programming noise, drift and phase errors. So "the map reproduces the model" is
checked in the two ways that can hold exactly:

1. **Targets.** Every layer's weight rebuilt from the files (conductances → weights; exact phases →
   meshes → matrix) equals the model's weight within the map's quantisation: float round-off for
   continuous targets, half a level for level-based devices (RRAM). The quantised representation
   (level indices, phase DAC codes) is reported as a relative error (a property of the resolution,
   see docs/export-format.md), and load_map already checked it is the rounding of the exact one.
2. **Chip.** A copy of the model is programmed *from the files* through the device model with the
   map's chip seed and drift time (crossbar: the conductance targets become the weights that get
   programmed; photonic: the meshes are set from the phase codes, see photonic.MeshMap), with the
   map's DAC ranges and biases. Its realised matrices must equal the exported model's, and so must
   its outputs: both models run the held-out built-in-corpus blocks with the same random stream, so
   read and output noise are drawn identically and any difference comes from the map. The report
   gives the relative logit error and both perplexities (analogllm.eval.perplexity.evaluate_lm).

The verifier fails (``report.passed`` False) when a layer exceeds its bound or the relative logit or
perplexity difference exceeds ``tolerance``; malformed maps raise :class:`MapError` before that.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from analogllm.data import token_blocks
from analogllm.eval.perplexity import evaluate_lm
from analogllm.export.manifest import (
    AnalogLayer, AnalogMap, MapError, analog_layers, check_model_fits_map, load_map, scale_per_input,
)
from analogllm.export.writer import require_ranges
from analogllm.hf.prefix import hold_prefix_
from analogllm.ops.noise import seeded

#: relative difference allowed between the realised matrices (and gains) of the replayed and the
#: exported chip: both come from the same targets and noise draws, so only float32 round-off remains
CHIP_TOLERANCE = 1e-4


@dataclass(frozen=True)
class LayerCheck:
    """Per-layer results. Errors of weights are relative to each tile column's scale (target) or to the
    matrix norm (quantised, chip)."""

    name: str
    target_error: float     #: max |W_map − W| / column scale, W_map from the exact representation
    bound: float            #: what target_error may reach (quantisation of the targets)
    quantized_error: float  #: ‖W_q − W‖ / ‖W‖, W_q from level indices or phase codes (informative)
    chip_error: float       #: ‖R_map − R_model‖ / ‖R_model‖ of the realised (programmed) matrices
    gain_error: float       #: relative difference of the calibrated digital gain vs the manifest's
    dac_range_error: float  #: relative difference of the DAC ranges (0 for dynamic ranges)
    bias_error: float       #: max |bias_map − bias|

    @property
    def ok(self) -> bool:
        return (self.target_error <= self.bound and self.chip_error <= CHIP_TOLERANCE
                and self.gain_error <= CHIP_TOLERANCE and self.dac_range_error <= 1e-6 and self.bias_error == 0.0)


@dataclass(frozen=True)
class VerifyReport:
    path: str
    target: str
    layers: tuple[LayerCheck, ...]
    logit_error: float         #: ‖logits_map − logits_model‖ / ‖logits_model‖ over all blocks
    logit_max_abs: float
    perplexity_model: float
    perplexity_map: float
    tokens: int
    tolerance: float

    @property
    def perplexity_error(self) -> float:
        return abs(self.perplexity_map / self.perplexity_model - 1.0)

    @property
    def failures(self) -> list[str]:
        out = [f"layer {c.name}: " + ", ".join(_layer_faults(c)) for c in self.layers if not c.ok]
        if not self.logit_error <= self.tolerance:
            out.append(f"relative logit error {self.logit_error:.3g} > tolerance {self.tolerance:g}")
        if not self.perplexity_error <= self.tolerance:
            out.append(f"perplexity {self.perplexity_map:.4f} vs {self.perplexity_model:.4f} differs by more than "
                       f"{self.tolerance:g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        worst_t = max(self.layers, key=lambda c: c.target_error / c.bound)
        worst_q = max(self.layers, key=lambda c: c.quantized_error)
        worst_c = max(self.layers, key=lambda c: c.chip_error)
        lines = [
            f"map {self.path} ({self.target}, {len(self.layers)} layers)",
            f"targets:   max |W_map - W| / scale {worst_t.target_error:.3g} "
            f"(bound {worst_t.bound:.3g}, {worst_t.name})",
            f"quantized: max ||W_q - W|| / ||W|| {worst_q.quantized_error:.3g} ({worst_q.name})",
            f"chip:      max ||R_map - R|| / ||R|| {worst_c.chip_error:.3g} ({worst_c.name})",
            f"outputs:   relative logit error {self.logit_error:.3g} (max |diff| {self.logit_max_abs:.3g}) "
            f"on {self.tokens} tokens",
            f"perplexity: model {self.perplexity_model:.4f}, map {self.perplexity_map:.4f}",
            f"{'PASS' if self.passed else 'FAIL'} (tolerance {self.tolerance:g})",
        ]
        return "\n".join(lines + [f"  - {f}" for f in self.failures])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "failures": self.failures}


def _layer_faults(c: LayerCheck) -> list[str]:
    faults = []
    if not c.target_error <= c.bound:
        faults.append(f"target error {c.target_error:.3g} > {c.bound:.3g}")
    if not c.chip_error <= CHIP_TOLERANCE:
        faults.append(f"chip error {c.chip_error:.3g}")
    if not c.gain_error <= CHIP_TOLERANCE:
        faults.append(f"gain differs by {c.gain_error:.3g}")
    if not c.dac_range_error <= 1e-6:
        faults.append(f"DAC range differs by {c.dac_range_error:.3g}")
    if c.bias_error != 0.0:
        faults.append(f"bias differs by {c.bias_error:.3g}")
    return faults


def verify_map(
    path: str | Path,
    model: nn.Module,
    tokenizer: Any = None,
    *,
    blocks: torch.Tensor | None = None,
    max_blocks: int = 8,
    block_size: int = 128,
    batch_size: int = 4,
    tolerance: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> VerifyReport:
    """Check the map at ``path`` against ``model``, the analogue model it was exported from.

    Evaluation text: ``blocks`` (LongTensor [n, block_size]) when given, else the first ``max_blocks``
    held-out validation blocks of the built-in corpus under ``tokenizer`` (for a built-in tiny model
    the built-in tokenizer is used when none is given). ``seed`` fixes the shared noise stream.
    """
    amap = load_map(path)
    layers = check_model_fits_map(model, amap, "verify against the model the map was exported from",
                                  "model is not analogue: verify against the analogue model the map was exported from")
    require_ranges(layers)
    blocks = _eval_blocks(amap.manifest, tokenizer, blocks, max_blocks, block_size)

    replica = copy.deepcopy(model)
    hold_prefix_(replica)  # from the model's own weights, before the map's targets replace them
    replica_layers = {layer.name: layer for layer in analog_layers(replica)}
    exact, quantized = amap.target_module.SOURCES
    if amap.device_record.get("phase_bits", 0) is None:
        quantized = exact
    checks = [_check_layer(amap, layer, replica_layers[layer.name], exact, quantized)
              for layer in tqdm(layers, desc="verify layers", unit="layer", disable=not progress)]

    ref_logits = _logits(model, blocks, batch_size, seed)
    map_logits = _logits(replica, blocks, batch_size, seed)
    score_model = _score(model, blocks, batch_size, seed)
    score_map = _score(replica, blocks, batch_size, seed)
    return VerifyReport(
        path=str(amap.path), target=amap.target, layers=tuple(checks),
        logit_error=_relative(map_logits, ref_logits),
        logit_max_abs=float((map_logits - ref_logits).abs().max()),
        perplexity_model=score_model.perplexity, perplexity_map=score_map.perplexity,
        tokens=score_model.tokens, tolerance=tolerance,
    )


def _check_layer(amap: AnalogMap, layer: AnalogLayer, twin: AnalogLayer, exact: str, quantized: str) -> LayerCheck:
    """Compare the weights rebuilt from one layer's files with the model's, then program ``twin`` (the
    replica's layer) from those files and compare what the two chips realise."""
    module, device_record = amap.target_module, amap.device_record
    lmap = amap.layers[layer.name]
    record = lmap.record
    if tuple(record["shape"]) != layer.shape:
        raise MapError(f"{lmap.file}: layer {layer.name} has shape {record['shape']} in the map but "
                       f"{list(layer.shape)} in the model (wrong shape)")
    arrays = lmap.arrays()
    w = layer.stacked_weight()
    scale = scale_per_input(layer.matrix.normalised_tiles(w)[1].squeeze(-1), layer.matrix.rows, w.shape[-1]).double()
    w = layer.matrix.target_weight(w, record["seed"]).double()  # closed-loop programming moves the targets
    w_map = module.target_weight(arrays, record, device_record, exact)
    w_q = w_map if quantized == exact else module.target_weight(arrays, record, device_record, quantized)
    module.install(twin, arrays, record, device_record, reference=layer.weight)  # the model's own correction
    dac_error, bias_error = _install_digital(twin, layer, arrays, record)
    real = layer.matrix.realised_weight(layer.weight).double()
    real_map = twin.matrix.realised_weight(twin.weight).double()
    gain_map = float(twin.matrix.chip.compensation[0])
    return LayerCheck(
        name=layer.name,
        target_error=float(((w_map - w).abs() / scale).max()),
        bound=module.target_bound(device_record),
        quantized_error=_relative(w_q, w),
        chip_error=_relative(real_map, real),
        gain_error=abs(gain_map / record["gain"] - 1.0) if record["gain"] else abs(gain_map),
        dac_range_error=dac_error,
        bias_error=bias_error,
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.double().norm())
    num = float((a.double() - b.double()).norm())
    return num / den if den > 0 else num


def _install_digital(twin: AnalogLayer, layer: AnalogLayer, arrays: dict[str, torch.Tensor],
                     record: dict[str, Any]) -> tuple[float, float]:
    """Give the replica the map's converter ranges (DAC, and ADC per tile) and bias; return the larger
    relative difference of the ranges from the model's, and the bias difference."""
    dac_error = 0.0
    for key, attr in (("dac_range", "input_range"), ("adc_range", "output_range")):
        if record.get(key) is None:
            continue
        stored = torch.tensor(record[key], dtype=torch.float32)
        model_range = getattr(layer.matrix, attr).detach().abs().float().cpu().reshape(-1)
        dac_error = max(dac_error, float(((stored - model_range).abs() / model_range.clamp(min=1e-12)).max()))
        with torch.no_grad():
            target = getattr(twin.matrix, attr)
            target.copy_(stored.reshape(target.shape))
    bias_error = 0.0
    if twin.bias is not None:
        stored_bias = arrays["bias"].reshape(twin.bias.shape).to(twin.bias.dtype)
        bias_error = float((stored_bias - layer.bias.detach()).abs().max())
        with torch.no_grad():
            twin.bias.copy_(stored_bias)
    return dac_error, bias_error


def _eval_blocks(manifest: dict[str, Any], tokenizer: Any, blocks: torch.Tensor | None, max_blocks: int,
                 block_size: int) -> torch.Tensor:
    if blocks is not None:
        return blocks
    if tokenizer is None:
        from analogllm.hf.models import TINY_MODELS, builtin_tokenizer

        if manifest["model"].get("source") not in TINY_MODELS:
            raise ValueError("verify needs evaluation text: pass tokenizer= (the model's) or blocks=")
        tokenizer = builtin_tokenizer()
    return token_blocks(tokenizer, split="validation", block_size=block_size, max_blocks=max_blocks)


@torch.no_grad()
def _logits(model: nn.Module, blocks: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """Logits of every block, the global random stream seeded (and restored afterwards)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with seeded(seed, device):
        for start in range(0, blocks.shape[0], batch_size):
            out.append(model(input_ids=blocks[start : start + batch_size].to(device)).logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _score(model: nn.Module, blocks: torch.Tensor, batch_size: int, seed: int):
    with seeded(seed, next(model.parameters()).device):
        score = evaluate_lm(model, blocks, batch_size=batch_size)
    if not math.isfinite(score.perplexity):
        raise ValueError("the model's perplexity is not finite; cannot compare")
    return score
