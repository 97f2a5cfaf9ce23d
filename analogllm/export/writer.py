"""Writing a map: ``export_map(model, out_dir, target)``.

The map describes the *chip instance* the analogue model runs on: its tiling and per-tile-column
scales are AnalogMatrix's, its targets are what each array or mesh is programmed with, and its chip
seed, drift time and calibrated gains are recorded so the verifier can program the same instance from
the files. Everything is written into a temporary folder beside ``out_dir`` and renamed into place
at the end, so a failed export leaves nothing behind and an existing map stays intact until the new
one is complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from analogllm.chip import chip_info
from analogllm.config import AnalogConfig
from analogllm.export import crossbar, photonic
from analogllm.export.manifest import (
    DTYPE_NAMES, FORMAT_NAME, FORMAT_VERSION, LAYER_DIR, MANIFEST_NAME, AnalogLayer, analog_layers,
    save_layer_file, seal_manifest, sha256_file,
)
from analogllm.fileio import atomic_dir
from analogllm.ops.memory import return_freed_memory
from analogllm.ops.quant import adc_step, dac_levels

#: target name → module implementing it (device_record, encode, array_specs, check_values,
#: target_weight, target_bound, install)
TARGETS = {crossbar.NAME: crossbar, photonic.NAME: photonic}


def default_target(config: AnalogConfig) -> str:
    """The target a model's device maps onto: ``photonic`` for meshes, ``crossbar`` otherwise."""
    return photonic.NAME if config.device.array == "mesh" else crossbar.NAME


def export_map(
    model: nn.Module,
    out_dir: str | Path,
    target: str | None = None,
    *,
    levels: int | None = None,
    source: str | None = None,
    calibration: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write the deployment map of an analogue ``model`` to ``out_dir`` and return its path.

    target:      ``"crossbar"`` (PCM / RRAM) or ``"photonic"``; default: the one the model's device is.
    levels:      crossbar level grid for a continuously programmed device (PCM; default 256). An RRAM
                 map always uses the device's own levels.
    source:      how to rebuild the model (a built-in name, checkpoint or Hub id), recorded for
                 ``analogllm verify``; default ``model.config.name_or_path``.
    calibration: how the learned DAC ranges were initialised, recorded so a verifier can redo it.

    Learned DAC ranges must be initialised (the model must have seen data): an uninitialised range
    would be exported as 0. Weights must be finite.
    """
    config: AnalogConfig | None = getattr(model, "analog_config", None)
    if config is None:
        raise ValueError("model is not analogue: call analogllm.analogize_(model, config) before exporting")
    target = target or default_target(config)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    module = TARGETS[target]
    device_record = module.device_record(config.device, levels)
    layers = analog_layers(model)
    if not layers:
        raise ValueError("the model has no analogue layers to export (check the config's include/exclude)")
    require_ranges(layers)
    if any(layer.matrix.chip.read_back is not None for layer in layers):
        raise ValueError("this model runs on a chip read back from measurements: its map is the one it was read "
                         "back with (a map holds targets, which reading back does not change); export the model "
                         "the map came from instead")
    out = Path(out_dir)
    _check_destination(out)
    with atomic_dir(out) as tmp:
        (tmp / LAYER_DIR).mkdir()
        records = [
            _write_layer(tmp, index, layer, module, target, device_record)
            for index, layer in enumerate(tqdm(layers, desc=f"export {target}", unit="layer", disable=not progress))
        ]
        manifest = seal_manifest(_manifest(model, config, target, device_record, records, source, calibration))
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return out


def require_ranges(layers: list[AnalogLayer]) -> None:
    """Raise unless every learned DAC range is initialised (an uninitialised one would read as 0)."""
    for layer in layers:
        m = layer.matrix
        if layer.placement == "analog" and m.config.dac.range == "learned" and not m.range_set:
            raise ValueError(
                f"layer {layer.name}: its learned DAC input range was never initialised (the model has not "
                "seen data); run a forward pass on representative text first (the range initialises from "
                "it) or train the model. `analogllm export` does this with built-in corpus blocks."
            )


def _check_destination(out: Path) -> None:
    if out.is_file():
        raise ValueError(f"{out} is a file; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        manifest = out / MANIFEST_NAME
        try:
            is_map = json.loads(manifest.read_text()).get("format") == FORMAT_NAME
        except (OSError, ValueError, AttributeError):
            is_map = False
        if not is_map:
            raise ValueError(f"{out} exists and is not an analogllm map; choose another output folder or remove it")


def _write_layer(tmp: Path, index: int, layer: AnalogLayer, module: Any, target: str,
                 device_record: dict[str, Any]) -> dict[str, Any]:
    """Encode one layer, write its safetensors file, return its manifest record."""
    weight = layer.stacked_weight()
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer {layer.name}: the weight has NaN or infinite values; nothing can be programmed")
    matrix = layer.matrix
    chip = matrix.chip
    seed = matrix.config.seed if chip.seed is None else chip.seed
    if chip.programmed:  # the instance the model runs on (programmed again if the weight changed)
        matrix.ensure_programmed(layer.weight)
        gain = float(chip.compensation[0])
    else:  # a chip the model does not hold is not realised for its gain alone
        gain = float(matrix.calibrated_gain(layer.weight, seed)[0])
        return_freed_memory()  # the calibration's blocks go back to the OS before the encoding's arrays come
    record = {
        "name": layer.name,
        "kind": layer.kind,
        "placement": layer.placement,
        "layer_id": matrix.uid,
        "shape": list(layer.shape),
        "experts": matrix.experts,
        "bias": layer.bias is not None,
        "dac_range": None if layer.placement != "analog" or matrix.config.dac.range == "dynamic"
        else matrix.input_range.detach().abs().float().tolist(),
        "gain": gain,
        "adc_range": None if layer.placement != "analog" or not hasattr(matrix, "output_range")
        else matrix.output_range.detach().float().reshape(-1).tolist(),
        "seed": seed,
        "seconds": chip.seconds,
    }
    wn, scale = matrix.normalised_tiles(weight, seed)  # this instance's targets (closed loop moves them)
    arrays, tiles = module.encode(layer, wn, scale.squeeze(-1), matrix.config.device, device_record)
    del wn, scale  # the encoder keeps what it needs: its arrays are made one at a time as they are written
    if layer.bias is not None:
        arrays["bias"] = layer.bias.detach().float().reshape(layer.experts, -1)
    name = f"{LAYER_DIR}/{index:04d}.safetensors"
    file = tmp / name
    save_layer_file(arrays, file, {"format": FORMAT_NAME, "target": target, "layer": layer.name})
    record.update(tiles=tiles, file=name, sha256=sha256_file(file), bytes=file.stat().st_size,
                  arrays={k: {"dtype": DTYPE_NAMES[v.dtype], "shape": list(v.shape)} for k, v in arrays.items()})
    del arrays
    return_freed_memory()  # the layer's pages go back to the OS before the next one is encoded
    return record


def _converters(config: AnalogConfig) -> dict[str, Any]:
    """DAC/ADC/output settings with the derived quantities a chip needs (steps, code counts)."""
    dac, adc, output = config.dac, config.adc, config.output
    return {
        "dac": {"bits": dac.bits, "range": dac.range,
                "codes_per_sign": None if dac.bits is None else 2 ** (dac.bits - 1) - 1,
                "step": dac_levels(dac.bits), "unit": "fraction of the layer's dac_range"},
        "adc": {"bits": adc.bits, "bound": adc.bound, "step": adc_step(adc.bits, adc.bound),
                "unit": "normalised output (inputs in [-1, 1], weights in [-1, 1] per tile column)"},
        "output": {"noise": output.noise, "nonlinearity": output.nonlinearity, "saturation": output.saturation},
        "drift_compensation": config.drift.compensation,
        "drift_compensation_at": config.drift.compensation_at,
        "correction_rank": config.mapping.correction_rank,
        "correction_reads": config.mapping.correction_reads,
    }


def _manifest(model: nn.Module, config: AnalogConfig, target: str, device_record: dict[str, Any],
              records: list[dict[str, Any]], source: str | None, calibration: dict[str, Any] | None) -> dict[str, Any]:
    import analogllm  # at call time: the package imports this module while it initialises
    from analogllm.hf.models import model_family

    hf_config = getattr(model, "config", None)
    params = list(model.parameters())
    digital = [{"name": r[0], "type": r[1], "shape": r[2], "reason": r[4]}
               for r in getattr(model, "analog_report").rows if r[3] == "digital"]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "target": target,
        "created_by": f"analogllm {analogllm.__version__}",
        "model": {
            "source": source if source is not None else getattr(hf_config, "name_or_path", None) or None,
            "model_type": getattr(hf_config, "model_type", None),
            "family": model_family(model),
            "dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
            "parameters": sum(p.numel() for p in params),
        },
        "profile": config.to_dict(),
        "chip": chip_info(model),
        "calibration": calibration,
        "units": {"conductance": "uS", "phase": "rad", "dac_range": "model activation units",
                  "gain": "dimensionless", "scale": "weight units per normalised weight"},
        "converters": _converters(config),
        "device": device_record,
        "totals": {"layers": len(records), "tiles": sum(math.prod(r["tiles"]["grid"]) for r in records),
                   "weights": sum(math.prod(r["shape"]) for r in records),
                   "bytes": sum(r["bytes"] for r in records)},
        "layers": records,
        "digital": digital,
    }
