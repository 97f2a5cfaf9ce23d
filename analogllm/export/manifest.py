"""The analogllm map format: what a map folder holds, and reading one back with every check.

A map is what a chip team programs, not a PyTorch model::

    DIR/manifest.json              format + version, model, profile, converters, every layer's tiles
    DIR/layers/NNNN.safetensors    one file per analogue layer: the arrays its tiles are set to

The manifest is the root of trust: it names every file with its SHA-256 and every array with its
dtype and shape, it carries the SHA-256 of its own canonical content (``manifest_sha256``, so a hand
edit such as a changed chip seed is caught), and the loader checks all of them (and that the shapes follow from the layer's
tile grid) before any number is used, so a truncated copy, a tampered file or a map from a newer
format fails loudly with the file and the fix named. ``docs/export-format.md`` is the field-by-field
specification; the target-specific parts live in :mod:`crossbar` and :mod:`photonic`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from analogllm.config import AnalogConfig
from analogllm.nn.convert import analog_matrices
from analogllm.nn.linear import AnalogConv1D
from analogllm.nn.matrix import AnalogMatrix
from analogllm.nn.weight import AnalogWeight

FORMAT_NAME = "analogllm-map"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LAYER_DIR = "layers"
#: the manifest's own checksum: SHA-256 of its canonical JSON without this field (see manifest_digest)
DIGEST_KEY = "manifest_sha256"

#: safetensors dtype names, as the file header spells them
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.int16: "I16", torch.uint8: "U8",
}


class MapError(ValueError):
    """A map folder is missing, corrupt or inconsistent; the message names the file and what to do."""


# ----- the analogue layers of a model -------------------------------------------------------------------
@dataclass
class AnalogLayer:
    """One analogue matrix of a model, with what an export needs to know about its owner.

    weight: the matrix the chip computes with, (out, in) or (E, out, in) — for GPT-2 ``Conv1D`` and
            transposed expert storage a view of the parameter, so writing into it writes the parameter.
    kind:   ``linear``, ``conv1d``, ``experts.up``, ``experts.down`` or ``weight-side`` (a weight the
            model reads directly: device physics only, no DAC/ADC; see analogllm.nn.weight).
    bias:   the digital bias added after read-back, (out,) or (E, out), or None.
    """

    name: str
    kind: str
    matrix: AnalogMatrix
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def placement(self) -> str:
        return "weight-side" if self.kind == "weight-side" else "analog"

    @property
    def experts(self) -> int:
        return self.matrix.experts or 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def stacked_weight(self) -> torch.Tensor:
        """(E, out, in) float32, E = 1 for an ordinary layer: the layout every map array uses."""
        w = self.weight.detach().float()
        return w if w.dim() == 3 else w.unsqueeze(0)


def analog_layers(model: nn.Module) -> list[AnalogLayer]:
    """Every analogue matrix of ``model`` in :func:`analogllm.analog_matrices` order (the map's order)."""
    weight_side = {id(m.analog) for m in model.modules() if isinstance(m, AnalogWeight)}
    layers = []
    for name, matrix, weight in analog_matrices(model):
        if id(matrix) in weight_side:
            layers.append(AnalogLayer(name, "weight-side", matrix, weight, None))
        elif matrix.experts:
            owner_name, part = name.rsplit(".", 1)
            owner = model.get_submodule(owner_name)
            bias_name = f"{owner._up_name()}_bias" if part == "up" else "down_proj_bias"
            bias = getattr(owner, bias_name) if getattr(owner, "has_bias", False) else None
            layers.append(AnalogLayer(name, f"experts.{part}", matrix, weight, bias))
        else:
            owner = model.get_submodule(name)
            kind = "conv1d" if isinstance(owner, AnalogConv1D) else "linear"
            layers.append(AnalogLayer(name, kind, matrix, weight, owner.bias))
    return layers


def spans(total: int, size: int, count: int | None = None) -> list[list[int]]:
    """[[start, used size], ...] of consecutive blocks of ``size`` covering ``total`` (last one partial)."""
    count = math.ceil(total / size) if count is None else count
    return [[i * size, max(0, min(size, total - i * size))] for i in range(count)]


def scale_per_input(scale: torch.Tensor, rows: int, in_features: int) -> torch.Tensor:
    """Scales (E, T, out) → (E, out, in): the scale of the tile each input row belongs to."""
    tile_of_input = torch.arange(in_features, device=scale.device) // rows
    return scale.index_select(1, tile_of_input).transpose(-1, -2)


def column_peaks(normalised: torch.Tensor) -> torch.Tensor:
    """(B, out, rows) → (B, out, 1) abs-max of each tile column of a map's normalised targets.

    A layer rescales every tile column to its own peak before programming. A map's peaks are 1 (up to
    float round-off, snapped to exactly 1 so the replay stays bit-exact), unless the map was made
    another way (not using a column's full range): then the replay divides by the peak to express
    what the chip computes in the layer's units.
    """
    peak = normalised.abs().amax(-1, keepdim=True)
    return torch.where(((peak - 1).abs() <= 1e-5) | (peak == 0), torch.ones_like(peak), peak)


# ----- files ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Deferred:
    """An array of a layer file made only when the file is written, so that a large layer's arrays never
    exist whole: ``pieces()`` yields consecutive pieces of it in file (row-major) order, each made,
    written and dropped in turn; the header needs only the shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: Callable[[], Iterable[torch.Tensor]]


def save_layer_file(arrays: Mapping[str, torch.Tensor | Deferred], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file whose bytes depend only on its content, one array at a time.

    The layout is safetensors' own (its order of arrays, by dtype then name, taken from the library
    itself; 8-byte aligned data), so any safetensors reader loads it. safetensors serialises the
    ``__metadata__`` table from a hash map, in an order that changes from call to call; here the
    metadata comes first with sorted keys, so identical content gives an identical file, checksum and
    manifest. Each array's bytes go straight from its tensor to the file (no image of the whole file in
    memory) and a :class:`Deferred` array exists only while it is written."""
    probe = save({k: torch.empty(0, dtype=v.dtype) for k, v in arrays.items()})
    order = list(json.loads(probe[8:8 + int.from_bytes(probe[:8], "little")]))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        shape, dtype = tuple(arrays[name].shape), arrays[name].dtype
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data stays 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            value = arrays[name]
            made = 0
            for t in value.pieces() if isinstance(value, Deferred) else (value,):
                if t.dtype != value.dtype:
                    raise RuntimeError(f"array {name} of {path.name}: made {t.dtype}, declared {value.dtype}")
                made += t.numel()
                f.write(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().data)
                del t
            if made != math.prod(value.shape):
                raise RuntimeError(f"array {name} of {path.name}: made {made} values, "
                                   f"declared {value.dtype} {tuple(value.shape)}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str | None:
    """The first dotted key at which two config dicts differ, or None when equal."""
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = config_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key} ({va!r} vs {vb!r})"
    return None


def check_model_fits_map(model: nn.Module, amap: "AnalogMap", hint: str,
                         not_analog: str) -> list[AnalogLayer]:
    """The analogue layers of ``model`` after checking that it is the model ``amap`` came from: analogue
    (else ``ValueError(not_analog)``), the same config as the map's profile (else a ``ValueError`` naming
    the first differing key, then ``hint``) and the same analogue layers (else a :class:`MapError`)."""
    config = getattr(model, "analog_config", None)
    if config is None:
        raise ValueError(not_analog)
    diff = config_difference(json.loads(json.dumps(config.to_dict())), amap.manifest["profile"])
    if diff:
        raise ValueError(f"the model's analogue config differs from the map's profile at {diff}; {hint}")
    layers = analog_layers(model)
    names = [layer.name for layer in layers]
    missing = [n for n in names if n not in amap.layers]
    extra = [n for n in amap.layers if n not in set(names)]
    if missing or extra:
        raise MapError(f"{amap.path}: the map's layers do not match the model's analogue layers "
                       f"(missing from the map: {missing[:3]}, not in the model: {extra[:3]})")
    return layers


def canonical_json(manifest: dict[str, Any]) -> bytes:
    """The bytes a manifest's checksum is taken over: the manifest without ``manifest_sha256``, as JSON
    with sorted keys, no whitespace, ASCII only and Python's round-trip float repr. Parsing the file and
    re-serialising gives the same bytes whatever the file's own layout, so the checksum covers content,
    not formatting, and identical content always has the identical checksum."""
    content = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 (hex) of :func:`canonical_json`: what ``manifest_sha256`` must hold."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with ``manifest_sha256`` set (last) to the checksum of everything else in it."""
    content = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return {**content, DIGEST_KEY: manifest_digest(content)}


def check_manifest_digest(manifest: dict[str, Any], file: Path) -> None:
    """Reject a manifest whose content does not match its own checksum (edited by hand, e.g. a changed
    chip seed, or corrupted). Maps written before the checksum existed carry none and are accepted."""
    if DIGEST_KEY not in manifest:
        return
    stored = manifest[DIGEST_KEY]
    if not isinstance(stored, str) or stored != manifest_digest(manifest):
        raise MapError(f"{file}: {DIGEST_KEY} does not match the manifest's content; the manifest was edited or "
                       "corrupted after export (every field, chip seeds included, is covered), export the map again")


# ----- reading a map back -----------------------------------------------------------------------------
@dataclass
class LayerMap:
    """One layer of a loaded map: its manifest record and (on demand) its arrays."""

    record: dict[str, Any]
    file: Path
    map: AnalogMap

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.record["shape"])

    def arrays(self) -> dict[str, torch.Tensor]:
        """The layer's arrays, as stored (already checked against the manifest by :func:`load_map`)."""
        return load_file(str(self.file))

    def target_weight(self, source: str | None = None) -> torch.Tensor:
        """The dense matrix this layer's files program, float64, shaped like the model's weight.

        ``source`` picks which arrays to rebuild it from. Crossbar: ``"conductance"`` (default,
        (G+ − G−)/g_max × scale) or ``"levels"`` (the integer level indices on the level grid).
        Photonic: ``"codes"`` (default when phases are quantized: the phase DAC codes) or ``"phases"``
        (the exact phases), composed through the meshes × mesh gain × scale. No chip noise: the target.
        """
        w = self.map.target_module.target_weight(self.arrays(), self.record, self.map.device_record, source)
        return w if self.record["experts"] else w[0]


@dataclass
class AnalogMap:
    """A validated map folder: manifest, profile and layers by name (see :func:`load_map`)."""

    path: Path
    manifest: dict[str, Any]
    layers: dict[str, LayerMap]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def device_record(self) -> dict[str, Any]:
        return self.manifest["device"]

    @cached_property
    def config(self) -> AnalogConfig:
        return AnalogConfig.from_dict(self.manifest["profile"])

    @property
    def target_module(self):
        from analogllm.export.writer import TARGETS

        return TARGETS[self.target]


_REQUIRED_KEYS = ("format", "format_version", "target", "profile", "device", "chip", "layers", "digital")
_LAYER_KEYS = ("name", "kind", "shape", "experts", "layer_id", "tiles", "file", "sha256", "arrays", "seed", "seconds")


def read_format_json(path: Path, name: str, format_name: str, version: int, error: type[ValueError],
                     kind: str, absent_hint: str) -> tuple[dict[str, Any], Path]:
    """``path/name`` parsed and checked to be version ``version`` of ``format_name``: the folder, the
    file, the JSON and the format's name and version, each failure an ``error`` naming the file (a
    missing folder a ``FileNotFoundError``). Maps and measurements share it; ``kind`` names what the
    folder should be ("an analogllm map"). Returns (record, file)."""
    what = kind.rsplit(" ", 1)[-1]
    file = path / name
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such {what} folder ({absent_hint})")
    if not file.is_file():
        raise error(f"{path}: not {kind} ({name} is missing)")
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{file}: not valid JSON ({exc}); the file is corrupt, write the {what} again") from None
    if not isinstance(record, dict) or record.get("format") != format_name:
        found = record.get("format") if isinstance(record, dict) else None
        raise error(f"{file}: format {found!r} is not {format_name!r}; this folder is not {kind}")
    found = record.get("format_version")
    if found != version:
        raise error(
            f"{file}: unknown format_version {found!r}; this analogllm reads version {version} "
            f"(a newer {what} needs a newer analogllm; an older one must be written again)"
        )
    return record, file


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse ``manifest.json`` and check the format name, version, digest and top-level fields."""
    manifest, file = read_format_json(path, MANIFEST_NAME, FORMAT_NAME, FORMAT_VERSION, MapError,
                                      "an analogllm map", "write one with `analogllm export`")
    check_manifest_digest(manifest, file)
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise MapError(f"{file}: missing field(s) {', '.join(missing)}; the manifest is incomplete")
    return manifest


def load_map(path: str | Path) -> AnalogMap:
    """Open a map folder and check everything that can be checked without a model.

    For every layer: the file exists, its SHA-256 matches the manifest, it holds exactly the arrays the
    manifest lists with the dtypes and shapes that the layer's tile grid implies, and their values lie
    in their documented ranges (conductances within [0, g_max], levels and codes within their grids,
    phases within their intervals). Raises :class:`MapError` naming the file and the problem.
    """
    from analogllm.export.writer import TARGETS

    path = Path(path)
    manifest = read_manifest(path)
    target = manifest["target"]
    if target not in TARGETS:
        raise MapError(f"{path / MANIFEST_NAME}: unknown target {target!r}; known targets: {', '.join(TARGETS)}")
    module = TARGETS[target]
    amap = AnalogMap(path=path, manifest=manifest, layers={})
    for record in manifest["layers"]:
        missing = [k for k in _LAYER_KEYS if k not in record]
        if missing:
            raise MapError(f"{path / MANIFEST_NAME}: layer {record.get('name')!r} lacks {', '.join(missing)}")
        file = path / record["file"]
        where = f"{file} (layer {record['name']})"
        if not file.is_file():
            raise MapError(f"{where}: file is missing; the map is incomplete, export it again")
        if sha256_file(file) != record["sha256"]:
            raise MapError(f"{where}: checksum mismatch (SHA-256 differs from the manifest); "
                           "the file was modified or corrupted, export the map again")
        expected = module.array_specs(record, manifest["device"])
        listed = {k: (v["dtype"], list(v["shape"])) for k, v in record["arrays"].items()}
        if listed != expected:
            raise MapError(f"{path / MANIFEST_NAME}: layer {record['name']}: the listed arrays {listed} do not "
                           f"follow from its shape and tile grid (expected {expected})")
        _check_file_arrays(file, where, expected)
        layer = LayerMap(record=record, file=file, map=amap)
        module.check_values(layer.arrays(), record, manifest["device"], where)
        amap.layers[record["name"]] = layer
    return amap


def _check_file_arrays(file: Path, where: str, expected: dict[str, tuple[str, list[int]]]) -> None:
    try:
        with safe_open(str(file), framework="pt") as f:
            stored = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise MapError(f"{where}: not a readable safetensors file ({exc})") from None
    for name, spec in expected.items():
        if name not in stored:
            raise MapError(f"{where}: array {name!r} is missing")
        if stored[name] != spec:
            raise MapError(f"{where}: array {name!r} has dtype/shape {stored[name]}, expected {spec} (wrong shape)")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise MapError(f"{where}: unexpected array(s) {', '.join(extra)}")
