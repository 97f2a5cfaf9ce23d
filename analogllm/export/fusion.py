"""IBM Fusion CSV: a crossbar map in the layout of aihwkit's ``fusion_export``, plus the sidecar it lacks.

aihwkit (``aihwkit.inference.utils.fusion_export`` / ``fusion_import``) exchanges conductances with
IBM's Fusion chip as one CSV file::

    line 1..5   one column per analogue layer: id, class, num_weights, height (outputs), width (inputs)
    line 6      the layer names
    line 7..    one line per layer: the target conductances in µS of each of its tiles in turn, every tile
                an (outputs × inputs) matrix flattened row by row

Fusion programs one device per weight (FusionConductanceConverter: |w| scaled per output row of a
tile to g_max, 10–40 µS); the sign of each weight and the scale of each tile row stay on the host, in
memory, so the CSV alone cannot be turned back into weights. ``fusion_sidecar.json`` carries them:
the sign convention and one sign bit per weight, the per-tile column scales, the tile spans, the DAC
ranges, gains and biases — in fact the whole source manifest — so that export → import reproduces the
map's conductance pairs, levels and scales exactly (float32 values are written in full float64 repr).

An analogllm crossbar map already holds each weight as a pair with one device at 0 µS and every tile
column at its own scale, which is Fusion's convention: the Fusion conductance of a weight is
G+ + G− (= |G+ − G−|), its sign bit is set where G− > 0.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analogllm.export.crossbar import level_dtype
from analogllm.export.manifest import (
    FORMAT_NAME, LAYER_DIR, MANIFEST_NAME, MapError, load_map, manifest_digest, save_layer_file, seal_manifest,
    sha256_file,
)
from analogllm.fileio import atomic_dir

CSV_NAME = "fusion.csv"
SIDECAR_NAME = "fusion_sidecar.json"
SIDECAR_FORMAT = "analogllm-fusion-sidecar"
SIDECAR_VERSION = 1
#: the conductance range FusionConductanceConverter accepts (µS)
FUSION_G_MAX = (10.0, 40.0)
SIGN_CONVENTION = ("sign-magnitude: the CSV holds |G+ - G-| = G+ + G- (one device per weight, uS); sign bit 1 "
                   "means the weight is negative (G- = value, G+ = 0), 0 that it is >= 0 (G+ = value, G- = 0); "
                   "bits packed big-endian (numpy.packbits) over the weights in (expert, input, output) order; "
                   "negative_zeros lists the flat indices where a target is -0.0 (an exactly zero weight)")
_CLASSES = {"linear": "AnalogLinear", "conv1d": "AnalogLinear", "experts.up": "AnalogExperts",
            "experts.down": "AnalogExperts", "weight-side": "AnalogWeight"}


def _tiles(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The arrays of a crossbar layer in Fusion order: expert, input tile, column block."""
    e, t, to = record["tiles"]["grid"]
    return [{"expert": ei, "input_tile": a, "column_block": b, "inputs": record["tiles"]["inputs"][a],
             "outputs": record["tiles"]["outputs"][b]}
            for ei in range(e) for a in range(t) for b in range(to)]


def _floats(values: np.ndarray) -> str:
    """float32 values as CSV fields that read back to the same float32 (full float64 repr)."""
    return ",".join(map(repr, values.astype(np.float64).tolist()))


def _csv_header(records: list[dict[str, Any]]) -> list[list[str]]:
    """The six header lines of aihwkit's layout: id, class, num_weights, height, width and name per layer."""
    return [
        [str(r["layer_id"]) for r in records],
        [_CLASSES.get(r["kind"], "AnalogLinear") for r in records],
        [str(math.prod(r["shape"])) for r in records],
        [str(math.prod(r["shape"][:-1])) for r in records],
        [str(r["shape"][-1]) for r in records],
        [r["name"] for r in records],
    ]


def _export_layer(record: dict[str, Any], arrays: dict[str, torch.Tensor]) -> tuple[np.ndarray, dict[str, Any]]:
    """One layer's Fusion conductances (its CSV line, tile after tile) and its sidecar entry: what the CSV
    cannot hold (signs, scales, bias, converter ranges) to turn them back into the map's arrays."""
    gp, gm = arrays["g_plus"].numpy(), arrays["g_minus"].numpy()  # (E, in, out)
    magnitude = gp + gm  # one of each pair is exactly 0: exact in float32
    tiles = []
    chunks = []
    for tile in _tiles(record):
        (i0, ni), (o0, no) = tile["inputs"], tile["outputs"]
        block = magnitude[tile["expert"], i0:i0 + ni, o0:o0 + no].T  # Fusion: (outputs, inputs)
        chunks.append(np.ascontiguousarray(block).reshape(-1))
        tiles.append({**tile, "shape": [no, ni]})
    meta = {
        "name": record["name"],
        "tiles": tiles,
        "signs": base64.b64encode(np.packbits((gm > 0).reshape(-1)).tobytes()).decode(),
        # an exactly-zero weight can leave -0.0 in a device's target (weight_to_pair of +0 or -0);
        # equal as numbers, but the positions are kept so the files come back bit for bit
        "negative_zeros": {k: np.flatnonzero((g == 0) & np.signbit(g)).tolist()
                           for k, g in (("g_plus", gp), ("g_minus", gm))},
        "scale": arrays["scale"].numpy().astype(np.float64).tolist(),
        "bias": arrays["bias"].numpy().astype(np.float64).tolist() if "bias" in arrays else None,
        "dac_range": record["dac_range"],
        "gain": record["gain"],
    }
    return np.concatenate(chunks), meta


def export_fusion(map_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``fusion.csv`` and ``fusion_sidecar.json`` for a crossbar map into ``out_dir`` (atomically)."""
    amap = load_map(map_dir)
    if amap.target != "crossbar":
        raise ValueError(f"{map_dir}: a {amap.target} map has no conductances; Fusion takes crossbar (pcm/rram) maps")
    g_max = float(amap.device_record["g_max_uS"])
    if not FUSION_G_MAX[0] <= g_max <= FUSION_G_MAX[1]:
        raise ValueError(f"{map_dir}: g_max {g_max} uS is outside the {FUSION_G_MAX[0]:g}-{FUSION_G_MAX[1]:g} uS the "
                         "Fusion chip accepts; convert the model with --set device.g_max=...")
    out = Path(out_dir)
    check_destination(out, {CSV_NAME, SIDECAR_NAME}, "a Fusion export")
    records = amap.manifest["layers"]
    layers_meta = []
    with atomic_dir(out) as tmp:
        with open(tmp / CSV_NAME, "w", newline="", encoding="utf-8") as f:
            for line in _csv_header(records):
                f.write(",".join(line) + "\n")
            for record in records:
                conductances, meta = _export_layer(record, amap.layers[record["name"]].arrays())
                f.write(_floats(conductances) + "\n")
                layers_meta.append(meta)
        sidecar = {
            "format": SIDECAR_FORMAT,
            "format_version": SIDECAR_VERSION,
            "csv": CSV_NAME,
            "csv_layout": "aihwkit fusion_export: 5 header lines (id, class, num_weights, height = outputs, width = "
                          "inputs), the layer names, then one line per layer: each tile's (outputs x inputs) "
                          "conductances in uS, row-major, tiles in the order listed here",
            "g_max_uS": g_max,
            "sign_convention": SIGN_CONVENTION,
            "scale": "per layer [expert][input tile][output]: weight = sign * conductance / g_max * scale "
                     "(the abs-max of the tile column; Fusion's per-output-row scaling)",
            "dac": amap.manifest["converters"]["dac"],
            "adc": amap.manifest["converters"]["adc"],
            "layers": layers_meta,
            "source_manifest": amap.manifest,
        }
        (tmp / SIDECAR_NAME).write_text(json.dumps(sidecar, allow_nan=False))
    return out


def check_destination(out: Path, files: set[str], what: str) -> None:
    """Refuse a file, or a non-empty folder holding anything but an earlier export of the same kind."""
    if out.is_file():
        raise ValueError(f"{out} is a file; choose an output folder")
    if out.is_dir() and any(out.iterdir()) and not {p.name for p in out.iterdir()} <= files:
        raise ValueError(f"{out} exists and is not {what}; choose another output folder or remove it")


def _read_csv(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if len(lines) < 6 + len(names):
        raise MapError(f"{path}: truncated ({len(lines)} lines; expected 6 header lines and {len(names)} layers)")
    if lines[5].split(",") != names:
        raise MapError(f"{path}: the layer names do not match {SIDECAR_NAME}; the two files belong to different maps")
    out = {}
    for name, line in zip(names, lines[6:6 + len(names)]):
        try:
            out[name] = np.array(line.split(","), dtype=np.float64)
        except ValueError:
            raise MapError(f"{path}: layer {name}: a value is not a number") from None
    return out


def _read_sidecar(src: Path) -> dict[str, Any]:
    """The sidecar of the Fusion export in ``src``, refused unless both files are there and it is ours."""
    sidecar_file = src / SIDECAR_NAME
    if not sidecar_file.is_file() or not (src / CSV_NAME).is_file():
        raise FileNotFoundError(f"{src}: not a Fusion export (needs {CSV_NAME} and {SIDECAR_NAME})")
    try:
        sidecar = json.loads(sidecar_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MapError(f"{sidecar_file}: not valid JSON ({exc})") from None
    if sidecar.get("format") != SIDECAR_FORMAT or sidecar.get("format_version") != SIDECAR_VERSION:
        raise MapError(f"{sidecar_file}: not an analogllm Fusion sidecar version {SIDECAR_VERSION}")
    return sidecar


def _check_conductances(csv: Path, meta: dict[str, Any], flat: np.ndarray, g_max: float) -> None:
    """A layer's CSV line may come from a chip: it must fill its tiles with conductances a device can hold."""
    expected = sum(t["shape"][0] * t["shape"][1] for t in meta["tiles"])
    if flat.size != expected:
        raise MapError(f"{csv}: layer {meta['name']} has {flat.size} values, its tiles {expected}")
    if not np.isfinite(flat).all() or (flat < 0).any() or (flat > g_max * (1 + 1e-5)).any():
        raise MapError(f"{csv}: layer {meta['name']}: conductances outside [0, g_max = {g_max} uS]")


def _layer_arrays(meta: dict[str, Any], shape: list[int], flat: np.ndarray,
                  device: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A layer's map arrays from its Fusion conductances: the tiles put back in place, each weight's device
    chosen by its sign bit, levels rounded from the conductances, scales and bias from the sidecar."""
    e, n_out, n_in = (shape[0] if len(shape) == 3 else 1), shape[-2], shape[-1]
    magnitude = np.zeros((e, n_in, n_out), dtype=np.float32)
    start = 0
    for tile in meta["tiles"]:
        (i0, ni), (o0, no) = tile["inputs"], tile["outputs"]
        block = flat[start:start + no * ni].astype(np.float32).reshape(no, ni)
        magnitude[tile["expert"], i0:i0 + ni, o0:o0 + no] = block.T
        start += no * ni
    bits = np.unpackbits(np.frombuffer(base64.b64decode(meta["signs"]), dtype=np.uint8))[: e * n_in * n_out]
    negative = bits.reshape(e, n_in, n_out).astype(bool)
    pair = {"g_plus": np.where(negative, np.float32(0), magnitude),
            "g_minus": np.where(negative, magnitude, np.float32(0))}
    for key, where in meta.get("negative_zeros", {}).items():
        flat_g, idx = pair[key].reshape(-1), np.asarray(where, dtype=np.int64)
        flat_g[idx[flat_g[idx] == 0]] = np.float32(-0.0)  # unless the CSV now holds a value there
    g_plus, g_minus = torch.from_numpy(pair["g_plus"]), torch.from_numpy(pair["g_minus"])
    step = device["level_step_uS"]
    dtype = level_dtype(device["levels"])
    arrays = {
        "g_plus": g_plus, "g_minus": g_minus,
        "level_plus": torch.round(g_plus / step).to(dtype), "level_minus": torch.round(g_minus / step).to(dtype),
        "scale": torch.tensor(meta["scale"], dtype=torch.float64).float(),
    }
    if meta["bias"] is not None:
        arrays["bias"] = torch.tensor(meta["bias"], dtype=torch.float64).float()
    return arrays


def import_fusion(fusion_dir: str | Path, out_dir: str | Path) -> Path:
    """Rebuild an analogllm map from a Fusion CSV and its sidecar (as :func:`export_fusion` wrote them, or
    with the CSV's conductances replaced by ones read from a chip). Returns the map folder, checked by
    :func:`load_map`. With unchanged conductances the map is the source map: same arrays, same files,
    same manifest checksum."""
    src = Path(fusion_dir)
    sidecar = _read_sidecar(src)
    manifest = sidecar["source_manifest"]
    records = {r["name"]: r for r in manifest["layers"]}
    metas = sidecar["layers"]
    values = _read_csv(src / CSV_NAME, [m["name"] for m in metas])
    g_max = float(sidecar["g_max_uS"])
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ValueError(f"{out} exists and is not an analogllm map; choose another output folder or remove it")
    new_records = []
    with atomic_dir(out) as tmp:
        (tmp / LAYER_DIR).mkdir()
        for meta in metas:
            if meta["name"] not in records:
                raise MapError(f"{src / SIDECAR_NAME}: layer {meta['name']!r} is not in the source manifest")
            record = dict(records[meta["name"]])
            flat = values[meta["name"]]
            _check_conductances(src / CSV_NAME, meta, flat, g_max)
            arrays = _layer_arrays(meta, record["shape"], flat, manifest["device"])
            file = tmp / record["file"]
            save_layer_file(arrays, file, {"format": FORMAT_NAME, "target": manifest["target"], "layer": record["name"]})
            record["sha256"], record["bytes"] = sha256_file(file), file.stat().st_size
            new_records.append(record)
        rebuilt = {**manifest, "layers": new_records}
        rebuilt["totals"] = {**manifest["totals"], "bytes": sum(r["bytes"] for r in new_records)}
        (tmp / MANIFEST_NAME).write_text(json.dumps(seal_manifest(rebuilt), indent=1))
    load_map(out)  # every check of a map: checksums, shapes, value ranges, levels = rounded conductances
    return out


def same_manifest(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two manifests have identical content (their checksums agree)."""
    return manifest_digest(a) == manifest_digest(b)


__all__ = ["CSV_NAME", "SIDECAR_NAME", "export_fusion", "import_fusion", "same_manifest"]
