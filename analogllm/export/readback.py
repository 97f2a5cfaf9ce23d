"""Reading a chip back: what a programmed chip really holds, as the chip a model runs on.

A map (:mod:`analogllm.export`) holds *targets*. Once a lab has programmed a real chip from it, the
chip holds something else: programming errors, drift, stuck devices, phase errors. Fine-tuning
adapters for *that* chip needs its state, not a fresh simulation. This module closes the loop:

* :func:`load_measured` reads a *measurement* folder — the measured conductances G+ and G− of every
  device (crossbar, µS) or the phases and transmissions every mesh really applies (photonic), in the
  map's own per-layer layout — and checks it against the map: format, units, shapes, finite values,
  signs, and that every layer looks like its target (docs/export-format.md, section 10).
* :func:`chip_from_measurement` makes a model's analogue layers hold exactly that chip: the digital
  weights become the map's targets (the physics-aware twin), the converter ranges and biases the
  map's, and each layer's :class:`~analogllm.chip.state.Chip` the measured state — normalised tiles
  (G+ − G−)/g_max with the map's column scales, the chip's gain, read noise measured or from the device
  model. The chip is marked as read back, so nothing reprograms it: ``ensure_programmed`` leaves it as
  it is, and programming, drift or merging refuse with a clear error.
* :func:`simulate_measurement` is the lab in silico (``analogllm measure``): it programs the chip
  instance ``analogllm verify`` programs from the map, ages it, and averages N noisy reads per device,
  so tests and the README can run the whole loop export → program → read back → LoRA.

Eval and LoRA (backprop, physics-aware, zeroth-order) then run on the read-back model unchanged; the
adapters go beside the map (``MAP/adapters/NAME/``, peft's format, :func:`save_readback_adapters`) with
a note naming the measurement they were trained against.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn
from tqdm.auto import tqdm

from analogllm.chip.correct import measured_correction
from analogllm.chip.state import Programmed
from analogllm.export.manifest import (
    DIGEST_KEY, LAYER_DIR, AnalogLayer, AnalogMap, MapError, analog_layers, canonical_json, check_model_fits_map,
    load_map, read_format_json, save_layer_file,
)
from analogllm.fileio import atomic_dir, atomic_write_bytes
from analogllm.hf.prefix import hold_prefix_

MEASUREMENT_FORMAT = "analogllm-measurement"
MEASUREMENT_VERSION = 1
MEASUREMENT_NAME = "measurement.json"
#: provenance of adapters trained on a read-back chip, written into their folder
READBACK_META = "readback.json"
#: where the read noise of a read-back chip comes from
READ_NOISE = ("auto", "measured", "model", "none")
#: a measured layer whose weights correlate less than this with its targets is not that layer's chip (one
#: correlating below minus this has the opposite sign); a real chip, drifted for years, stays far above it
MIN_CORRELATION = 0.5
_DTYPES = {torch.float32: "F32", torch.float64: "F64"}


class MeasurementError(MapError):
    """A measurement folder is missing, malformed or does not fit its map; the message names the file,
    the layer and what was wrong."""


@dataclass
class Measurement:
    """A validated measurement (see :func:`load_measured`).

    meta:   measurement.json as read.
    layers: layer name → its measured arrays (as stored; float32 or float64).
    digest: SHA-256 naming this measurement (its manifest's canonical JSON and every layer file's bytes).
    """

    path: Path
    meta: dict[str, Any]
    layers: dict[str, dict[str, torch.Tensor]]
    digest: str

    @property
    def seconds(self) -> float:
        """Time since programming at which the chip was read (s)."""
        return float(self.meta["seconds"])

    @property
    def reads(self) -> int | None:
        return self.meta.get("reads")


# ----- reading a measurement ------------------------------------------------------------------------------
def _as_map(amap: AnalogMap | str | os.PathLike) -> AnalogMap:
    return amap if isinstance(amap, AnalogMap) else load_map(amap)


def _read_meta(path: Path, amap: AnalogMap) -> dict[str, Any]:
    meta, file = read_format_json(path, MEASUREMENT_NAME, MEASUREMENT_FORMAT, MEASUREMENT_VERSION, MeasurementError,
                                  "a measurement", "write one with `analogllm measure` or by hand, "
                                  "docs/export-format.md section 10")
    if meta.get("target") != amap.target:
        raise MeasurementError(f"{file}: target {meta.get('target')!r} does not match the map's {amap.target!r}")
    seconds = meta.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise MeasurementError(f"{file}: seconds must be the time since programming at which the chip was read "
                               f"(a number >= 0), got {seconds!r}")
    reads = meta.get("reads")
    if reads is not None and (isinstance(reads, bool) or not isinstance(reads, int) or reads < 1):
        raise MeasurementError(f"{file}: reads must be a positive integer or null, got {reads!r}")
    expected_units = amap.target_module.MEASURED_UNITS
    units = meta.get("units")
    if not isinstance(units, dict):
        raise MeasurementError(f"{file}: units missing; this target needs {json.dumps(expected_units)}")
    for key, unit in expected_units.items():
        if units.get(key) != unit:
            raise MeasurementError(f"{file}: units.{key} is {units.get(key)!r}; measured {key}s must be given in "
                                   f"{unit!r} (convert them; wrong units)")
    wanted = amap.manifest.get(DIGEST_KEY)
    if meta.get("map_sha256") is not None and wanted is not None and meta["map_sha256"] != wanted:
        raise MeasurementError(f"{file}: map_sha256 {meta['map_sha256'][:12]}… names another map than {amap.path} "
                               f"({wanted[:12]}…); read a chip back with the map it was programmed from")
    return meta


def _layer_files(meta: dict[str, Any], amap: AnalogMap, path: Path) -> dict[str, tuple[str, str | None]]:
    """Layer name → (file relative to the measurement, sha256 or None): the measurement's own list when
    it has one, else the map's file names."""
    listed = meta.get("layers")
    if listed is None:
        return {name: (lmap.record["file"], None) for name, lmap in amap.layers.items()}
    if not isinstance(listed, list) or not all(isinstance(r, dict) and "name" in r and "file" in r for r in listed):
        raise MeasurementError(f"{path / MEASUREMENT_NAME}: layers must be a list of {{name, file, sha256?}}")
    files = {r["name"]: (r["file"], r.get("sha256")) for r in listed}
    unknown = [n for n in files if n not in amap.layers]
    if unknown:
        raise MeasurementError(f"{path / MEASUREMENT_NAME}: layer {unknown[0]!r} is not a layer of the map")
    return files


def _read_layer(file: Path, where: str) -> tuple[dict[str, torch.Tensor], str]:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise MeasurementError(f"{where}: cannot read the file ({exc})") from None
    try:
        arrays = load_safetensors(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise MeasurementError(f"{where}: not a readable safetensors file ({exc})") from None
    return arrays, hashlib.sha256(data).hexdigest()


def _check_layer(arrays: dict[str, torch.Tensor], record: dict[str, Any], amap: AnalogMap, where: str) -> None:
    """Names, dtypes, shapes and finite values of one measured layer; then the target's own checks."""
    module = amap.target_module
    specs = module.measured_specs(record, amap.device_record)
    unknown = sorted(set(arrays) - set(specs))
    if unknown:
        raise MeasurementError(f"{where}: unexpected array(s) {', '.join(unknown)}; a measured {amap.target} layer "
                               f"holds {', '.join(specs)}")
    for name, (shape, required) in specs.items():
        if name not in arrays:
            if required:
                raise MeasurementError(f"{where}: array {name!r} is missing")
            continue
        a = arrays[name]
        if a.dtype not in _DTYPES:
            raise MeasurementError(f"{where}: array {name!r} has dtype {a.dtype}; measured values are F32 or F64")
        if list(a.shape) != shape:
            raise MeasurementError(f"{where}: array {name!r} has shape {list(a.shape)}, expected {shape} "
                                   f"(the map's layout for this layer; wrong shape)")
        if not torch.isfinite(a).all():
            bad = int((~torch.isfinite(a)).sum())
            raise MeasurementError(f"{where}: array {name!r} has {bad} non-finite value(s) (NaN or inf)")
    for group in module.MEASURED_PAIRS:
        present = [n for n in group if n in arrays]
        if present and len(present) != len(group):
            raise MeasurementError(f"{where}: {' and '.join(group)} go together; only {present[0]} is present")
    with _as_measurement_error():
        module.check_measured(arrays, amap.layers[record["name"]].arrays(), record, amap.device_record, where)


@contextmanager
def _as_measurement_error() -> Iterator[None]:
    """The target modules' checks raise MapError; for a measurement they are MeasurementErrors."""
    try:
        yield
    except MeasurementError:
        raise
    except MapError as exc:
        raise MeasurementError(str(exc)) from None


def load_measured(amap: AnalogMap | str | os.PathLike, measured_dir: str | os.PathLike,
                  progress: bool = False) -> Measurement:
    """Open the measurement folder ``measured_dir`` of the chip programmed from ``amap`` and check it.

    Checked: measurement.json (format, version, target, units, time, the map it belongs to), one file
    per layer of the map with exactly the documented arrays, dtypes and shapes, finite values, the
    target's unit and sign checks, and any listed checksums. Raises :class:`MeasurementError` (a
    ``ValueError``) naming the file, the layer and the problem; nothing is built from a bad measurement.
    """
    amap = _as_map(amap)
    path = Path(measured_dir)
    meta = _read_meta(path, amap)
    files = _layer_files(meta, amap, path)
    digest = hashlib.sha256(canonical_json(meta))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, lmap in tqdm(amap.layers.items(), desc="read measurement", unit="layer", disable=not progress):
        if name not in files:
            raise MeasurementError(f"{path / MEASUREMENT_NAME}: layer {name!r} of the map is not in the measurement "
                                   "(missing layer); every analogue layer must be measured")
        rel, sha = files[name]
        file = path / rel
        where = f"{file} (layer {name})"
        if not file.is_file():
            raise MeasurementError(f"{where}: file is missing (missing layer); every analogue layer must be measured")
        arrays, file_sha = _read_layer(file, where)
        if sha is not None and sha != file_sha:
            raise MeasurementError(f"{where}: checksum mismatch (SHA-256 differs from {MEASUREMENT_NAME})")
        _check_layer(arrays, lmap.record, amap, where)
        digest.update(f"{name}:{file_sha}".encode())
        layers[name] = arrays
    return Measurement(path=path, meta=meta, layers=layers, digest=digest.hexdigest())


# ----- the read-back chip -----------------------------------------------------------------------------------
def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 1.0


def measured_states(amap: AnalogMap, measured: Measurement, config: Any,
                    read_noise: str = "auto") -> dict[str, Programmed]:
    """Layer name → the chip state its measurement describes, every layer checked to resemble its target
    (a measurement of another layer, another map or with a flipped sign is refused)."""
    if read_noise not in READ_NOISE:
        raise ValueError(f"read_noise must be one of {', '.join(READ_NOISE)}, got {read_noise!r}")
    module = amap.target_module
    states = {}
    for name, lmap in amap.layers.items():
        record = lmap.record
        where = f"{measured.path} (layer {name})"
        map_arrays = lmap.arrays()
        with _as_measurement_error():
            state = module.measured_state(measured.layers[name], map_arrays, record, amap.device_record, config,
                                          measured.seconds, read_noise, where)
        target = module.target_weight(map_arrays, record, amap.device_record)
        c = _correlation(state.dense(record["shape"][-1]), target)
        if c <= -MIN_CORRELATION:
            raise MeasurementError(f"{where}: the measured weights anti-correlate with the map's targets "
                                   f"(correlation {c:.3f}): {module.SIGN_HINT} (wrong sign)")
        if c < MIN_CORRELATION:
            raise MeasurementError(f"{where}: the measured weights do not resemble the map's targets (correlation "
                                   f"{c:.3f}, |c| < {MIN_CORRELATION}): a file of another layer or another map?")
        states[name] = state
    return states


def _install(layer: AnalogLayer, record: dict[str, Any], map_arrays: dict[str, torch.Tensor], target: torch.Tensor,
             state: Programmed, info: dict[str, Any], seconds: float) -> None:
    """The layer's digital side from the map (target weight, converter ranges, bias) and its chip from the
    measurement, marked as read back."""
    matrix = layer.matrix
    with torch.no_grad():
        layer.weight.copy_(target.reshape(layer.weight.shape).to(layer.weight.dtype))
        for key, attr in (("dac_range", "input_range"), ("adc_range", "output_range")):
            if record.get(key) is not None and hasattr(matrix, attr):
                tensor = getattr(matrix, attr)
                tensor.copy_(torch.tensor(record[key], dtype=tensor.dtype).reshape(tensor.shape))
        if layer.bias is not None:
            layer.bias.copy_(map_arrays["bias"].reshape(layer.bias.shape).to(layer.bias.dtype))
    if record.get("dac_range") is not None:
        matrix.mark_range_set()
    weight = layer.weight
    if matrix.config.mapping.correction_rank:
        # the measurement is the device read the correction needs; it aims at the map's targets, since a
        # map does not hold the model's weights (after closed-loop programming they differ)
        state.correct_in, state.correct_out = measured_correction(matrix.config, weight, state, matrix.moment,
                                                                  record["seed"], matrix.uid, seconds, read=False)
    matrix.chip.store(state, weight, record["seed"], seconds, (weight._version, weight.data_ptr()))
    matrix.chip.read_back = dict(info)


def chip_from_measurement(model: nn.Module, amap: AnalogMap | str | os.PathLike,
                          measured: Measurement | str | os.PathLike, *, read_noise: str = "auto",
                          progress: bool = False) -> nn.Module:
    """Make ``model`` run on the chip that ``measured`` describes, in place, and return it.

    ``model`` is the analogue model the map was exported from or one rebuilt from its source with the
    map's profile (:func:`load_source_model`): the same analogue layers (names, shapes) and config.
    Every layer gets the map's targets as digital weights (what the chip was asked to hold: the twin of
    physics-aware training), the map's DAC/ADC ranges and biases, and the measured chip state, marked as
    read back (``chip.read_back``). Everything is checked before the model is touched.

    read_noise: ``auto`` (the measured per-device spread when the files have one, else the device
    model's), ``measured``, ``model`` or ``none``.
    """
    amap = _as_map(amap)
    if not isinstance(measured, Measurement):
        measured = load_measured(amap, measured, progress=progress)
    layers = {layer.name: layer for layer in check_model_fits_map(
        model, amap, "read the chip back into the model the map was exported from (or one rebuilt with the map's "
        "profile)", "model is not analogue: rebuild it with analogllm.export.readback.load_source_model(map)")}
    config = model.analog_config
    for name, layer in layers.items():
        if tuple(amap.layers[name].record["shape"]) != layer.shape:
            raise MapError(f"{amap.layers[name].file}: layer {name} has shape {amap.layers[name].record['shape']} in "
                           f"the map but {list(layer.shape)} in the model (wrong shape)")
        if layer.matrix.chip.deployed:
            raise ValueError(f"{name}: deployed with analogllm.deploy_ (its digital weights were freed); read the chip "
                             "back into a freshly loaded model")
        if layer.matrix.uid != amap.layers[name].record["layer_id"]:
            raise MapError(f"{amap.path}: layer {name} has another layer_id in the map than in the model")
    states = measured_states(amap, measured, config, read_noise)
    info = {"map_sha256": amap.manifest.get(DIGEST_KEY), "measurement_sha256": measured.digest,
            "measured": str(measured.path), "seconds": measured.seconds, "reads": measured.reads,
            "read_noise": read_noise}
    module = amap.target_module
    hold_prefix_(model)  # from the source's weights, before the map's targets replace them
    for name, layer in layers.items():
        lmap = amap.layers[name]
        map_arrays = lmap.arrays()
        target = module.target_weight(map_arrays, lmap.record, amap.device_record)
        _install(layer, lmap.record, map_arrays, target, states[name], info, measured.seconds)
    return model


def read_back(model: nn.Module) -> dict[str, Any] | None:
    """What the model's chip was read back from (``chip.read_back`` of its first base analogue layer), or
    None for a simulated chip."""
    from analogllm.nn.convert import analog_matrices

    for name, matrix, _ in analog_matrices(model):
        if ".lora_" not in name:
            return matrix.chip.read_back
    return None


def deviation(model: nn.Module, amap: AnalogMap) -> dict[str, float]:
    """Layer name → ‖W_chip − W_target‖ / ‖W_target‖: how far each read-back (or programmed) layer's
    realised matrix, gain included, lies from the map's target."""
    out = {}
    for layer in analog_layers(model):
        lmap = amap.layers[layer.name]
        target = lmap.target_weight().double()
        real = layer.matrix.realised_weight(layer.weight).double()
        out[layer.name] = float((real - target.reshape(real.shape)).norm() / target.norm().clamp(min=1e-30))
    return out


# ----- the model of a map ---------------------------------------------------------------------------------
def load_source_model(amap: AnalogMap | str | os.PathLike, source: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) the map was exported from: an analogue checkpoint folder as saved, otherwise
    ``source`` (default: the manifest's model source, e.g. a built-in name) converted with the map's
    profile. Its digital parts (embeddings, norms, LM head) are the source's; its analogue layers are
    then set from the map and a measurement by :func:`chip_from_measurement`."""
    from analogllm.hf.checkpoint import load_analog_model

    amap = _as_map(amap)
    source = source or amap.manifest["model"].get("source")
    if not source:
        raise ValueError(f"{amap.path}: the manifest records no model source; pass the model (--model)")
    model, tokenizer, _ = load_analog_model(str(source), amap.config)
    return model, tokenizer


def readback_model(amap: AnalogMap | str | os.PathLike, measured: Measurement | str | os.PathLike, *,
                   source: str | None = None, read_noise: str = "auto",
                   progress: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) running on the chip ``measured`` describes: the map's source model
    (:func:`load_source_model`) with :func:`chip_from_measurement` applied, in eval mode."""
    amap = _as_map(amap)
    if not isinstance(measured, Measurement):
        measured = load_measured(amap, measured, progress=progress)  # a bad measurement fails before loading
    model, tokenizer = load_source_model(amap, source)
    chip_from_measurement(model, amap, measured, read_noise=read_noise, progress=progress)
    return model.eval(), tokenizer


# ----- a simulated measurement --------------------------------------------------------------------------
def _check_destination(out: Path) -> None:
    if out.is_file():
        raise ValueError(f"{out} is a file; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / MEASUREMENT_NAME).read_text()).get("format") == MEASUREMENT_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(f"{out} exists and is not a measurement; choose another output folder or remove it")


def simulate_measurement(amap: AnalogMap | str | os.PathLike, out_dir: str | os.PathLike, *,
                         seed: int | None = None, seconds: float | None = None, reads: int | None = 16,
                         phase_read_std: float = 0.005, noise_seed: int = 0, progress: bool = False) -> Path:
    """Program chip instance ``seed`` (default: the map's) from the map, age it to ``seconds`` (default:
    the map's time) and write what a lab would measure to ``out_dir`` (atomically): per device the
    average of ``reads`` noisy reads and their spread (crossbar; ``reads=None`` is noise-free), or per
    mesh the phases and transmissions it really applies, estimated ``reads`` times with an error of
    ``phase_read_std`` rad (photonic). Measurement noise is seeded by ``noise_seed`` and the layer.
    Needs only the map: the chip is the one ``analogllm verify`` programs from the files."""
    amap = _as_map(amap)
    if reads is not None and reads < 1:
        raise ValueError(f"reads must be >= 1 (or None for noise-free reads), got {reads}")
    if phase_read_std < 0:
        raise ValueError(f"phase_read_std must be >= 0, got {phase_read_std}")
    chip = amap.manifest["chip"]
    seed = int(chip["seed"] if seed is None else seed)
    seconds = float(chip["seconds"] if seconds is None else seconds)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    config, module = amap.config, amap.target_module
    out = Path(out_dir)
    _check_destination(out)
    with atomic_dir(out) as tmp:
        (tmp / LAYER_DIR).mkdir()
        listed = []
        for name, lmap in tqdm(amap.layers.items(), desc="measure", unit="layer", disable=not progress):
            record = lmap.record
            noise = torch.Generator().manual_seed((noise_seed * 1_000_003 + record["layer_id"]) % (2**63 - 1))
            arrays = module.simulate_measurement(lmap.arrays(), record, amap.device_record, config, seed, seconds,
                                                 reads, noise, phase_read_std=phase_read_std)
            file = tmp / record["file"]
            save_layer_file(arrays, file, {"format": MEASUREMENT_FORMAT, "layer": name})
            listed.append({"name": name, "file": record["file"],
                           "sha256": hashlib.sha256(file.read_bytes()).hexdigest()})
        meta = {
            "format": MEASUREMENT_FORMAT,
            "format_version": MEASUREMENT_VERSION,
            "target": amap.target,
            "map_sha256": amap.manifest.get(DIGEST_KEY),
            "seconds": seconds,
            "reads": reads,
            "units": module.MEASURED_UNITS,
            "source": {"kind": "simulated", "seed": seed, "noise_seed": noise_seed,
                       "phase_read_std": phase_read_std if amap.target == "photonic" else None,
                       "device": config.device.kind},
            "layers": listed,
        }
        (tmp / MEASUREMENT_NAME).write_text(json.dumps(meta, indent=1))
    return out


# ----- adapters of a read-back chip ----------------------------------------------------------------------
def _base_read_back(model: nn.Module) -> dict[str, Any]:
    from analogllm.nn.convert import analog_matrices

    infos = [m.chip.read_back for n, m, _ in analog_matrices(model) if ".lora_" not in n]
    if not infos or any(i is None for i in infos):
        raise ValueError("the model's chip was not read back from a measurement (analogllm.export.readback."
                         "chip_from_measurement); save its adapters with analogllm.tuners.lora.save_adapters")
    return infos[0]


def save_readback_adapters(model: nn.Module, path: str | os.PathLike, results: dict[str, Any] | None = None) -> Path:
    """Write the adapters of a LoRA model on a read-back chip to ``path`` (peft's format, atomically),
    with ``readback.json`` naming the map and the measurement they compensate (and ``results``)."""
    from analogllm.tuners.lora import save_adapters

    info = {"format": "analogllm-readback-adapters", "format_version": 1, **_base_read_back(model),
            "results": results}
    return save_adapters(model, path, extra={READBACK_META: info})


def load_readback_adapters(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                           trainable: bool = False) -> nn.Module:
    """Put adapters saved by :func:`save_readback_adapters` beside a read-back ``model``. With ``strict``
    the model's chip must be the one they were trained on (same map and measurement checksums): adapters
    compensate one chip's errors, so on another chip (or a later measurement) they need ``strict=False``."""
    from analogllm.tuners.lora import load_adapters

    path = Path(path)
    meta_file = path / READBACK_META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: no {READBACK_META}; not adapters of a read-back chip (load them with "
                                "analogllm.tuners.lora.load_adapters)")
    meta = json.loads(meta_file.read_text())
    chip = _base_read_back(model)
    if strict:
        for key in ("map_sha256", "measurement_sha256"):
            if meta.get(key) != chip.get(key):
                raise ValueError(f"{path}: these adapters were trained on another chip ({key} "
                                 f"{str(meta.get(key))[:12]}… vs the model's {str(chip.get(key))[:12]}…); "
                                 "pass strict=False to use them anyway")
    return load_adapters(model, path, trainable=trainable)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as JSON at ``path``, atomically."""
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())


__all__ = [
    "MEASUREMENT_FORMAT", "MEASUREMENT_NAME", "MEASUREMENT_VERSION", "READBACK_META", "READ_NOISE", "Measurement",
    "MeasurementError", "chip_from_measurement", "deviation", "load_measured", "load_readback_adapters",
    "load_source_model", "measured_states", "read_back", "readback_model", "save_readback_adapters",
    "simulate_measurement",
]
