"""CrossSim export: one conductance file per crossbar array, in the layout CrossSim's cores program.

CrossSim (Sandia, ``simulator.cores``) models a signed matrix on a BALANCED core as two arrays, a
positive and a negative one, with conductances normalised to the device range: in its ONE_SIDED
style (``core.balanced.style``) a weight w ∈ [−1, 1] becomes G+ = Gmin + (Gmax − Gmin)·w on the positive
array where w > 0 (Gmin elsewhere) and the mirror image on the negative array — exactly analogllm's
differential pair with Gmin = 0 µS. Its matrices are oriented like the MVM it computes, y = W·x: rows
are outputs, columns are inputs (``AnalogCore(matrix)`` with ``matrix.shape == (outputs, inputs)``), and
a large matrix is partitioned over arrays of at most ``core.rows_max`` inputs × ``core.cols_max`` outputs.

Written per map::

    DIR/crosssim.json                  conventions, device range, per layer its tiles and files
    DIR/layers/NNNN/e{E}_t{T}_c{C}.npy  float32 (2, outputs, inputs): [G+, G−] in µS of one array
    DIR/layers/NNNN/scale.npy          float32 (E, T, out): the tile-column scales (weight = w · scale)
    DIR/layers/NNNN/bias.npy           float32 (E, out), when the layer has a bias (added digitally)

To program CrossSim with a tile: ``matrix = (G[0] − G[1]) / g_max`` (the normalised weight, in [−1, 1]),
``params.xbar.device.Gmin_norm = 0`` and ``Rmin = 1 / g_max`` (Ω, g_max in S), ``core.balanced.style =
ONE_SIDED``, ``core.rows_max`` = the tile's inputs and ``core.cols_max`` = the tile's outputs.
CrossSim partitions evenly when a dimension divides, and analogllm's input tiles are an even split
(``ceil(in / T)`` rows each), so handing CrossSim the whole layer with ``rows_max = tiles.rows`` gives the
same partition whenever T divides the inputs; the per-tile files are exact in every case.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from analogllm.export.manifest import MapError, load_map
from analogllm.fileio import atomic_dir

INDEX_NAME = "crosssim.json"
INDEX_FORMAT = "analogllm-crosssim"
INDEX_VERSION = 1


def export_crosssim(map_dir: str | Path, out_dir: str | Path) -> Path:
    """Write every array of a crossbar map as a CrossSim [G+, G−] conductance file (atomically)."""
    amap = load_map(map_dir)
    if amap.target != "crossbar":
        raise ValueError(f"{map_dir}: a {amap.target} map has no conductances; CrossSim takes crossbar (pcm/rram) maps")
    out = Path(out_dir)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / INDEX_NAME).is_file()):
        raise ValueError(f"{out} exists and is not a CrossSim export; choose another output folder or remove it")
    g_max = float(amap.device_record["g_max_uS"])
    layers: list[dict[str, Any]] = []
    with atomic_dir(out) as tmp:
        for index, record in enumerate(amap.manifest["layers"]):
            arrays = amap.layers[record["name"]].arrays()
            gp, gm = arrays["g_plus"].numpy(), arrays["g_minus"].numpy()  # (E, in, out), crossbar orientation
            folder = Path("layers") / f"{index:04d}"
            (tmp / folder).mkdir(parents=True)
            tiles = []
            e, t, to = record["tiles"]["grid"]
            for ei in range(e):
                for a in range(t):
                    for b in range(to):
                        (i0, ni), (o0, no) = record["tiles"]["inputs"][a], record["tiles"]["outputs"][b]
                        pair = np.stack([gp[ei, i0:i0 + ni, o0:o0 + no].T, gm[ei, i0:i0 + ni, o0:o0 + no].T])
                        name = folder / f"e{ei}_t{a}_c{b}.npy"
                        np.save(tmp / name, np.ascontiguousarray(pair, dtype=np.float32))
                        tiles.append({"file": name.as_posix(), "expert": ei, "input_tile": a, "column_block": b,
                                      "inputs": [i0, ni], "outputs": [o0, no], "shape": [2, no, ni]})
            np.save(tmp / folder / "scale.npy", arrays["scale"].numpy())
            entry = {"name": record["name"], "kind": record["kind"], "shape": record["shape"],
                     "rows_max": record["tiles"]["rows"], "cols_max": record["tiles"]["cols"],
                     "scale": (folder / "scale.npy").as_posix(), "bias": None, "dac_range": record["dac_range"],
                     "gain": record["gain"], "tiles": tiles}
            if "bias" in arrays:
                np.save(tmp / folder / "bias.npy", arrays["bias"].numpy())
                entry["bias"] = (folder / "bias.npy").as_posix()
            layers.append(entry)
        index_data = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_VERSION,
            "source": {"format": amap.manifest["format"], "manifest_sha256": amap.manifest.get("manifest_sha256"),
                       "model": amap.manifest.get("model")},
            "core": {"style": "BALANCED", "balanced.style": "ONE_SIDED", "Gmin_uS": 0.0, "Gmax_uS": g_max,
                     "Gmin_norm": 0.0, "Rmin_ohm": 1e6 / g_max,
                     "matrix": "normalised weight (G+ - G-) / Gmax of each tile, shape (outputs, inputs)"},
            "tile_file": "float32 array (2, outputs, inputs): [0] = G+ (positive array), [1] = G- (negative array), uS",
            "weight": "W[e, o, i] = (G+ - G-)[o, i] / Gmax * scale[e, input_tile, o]; + bias digitally",
            "converters": amap.manifest["converters"],
            "layers": layers,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index_data, indent=1, allow_nan=False))
    return out


def read_crosssim_layer(export_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Reassemble one layer's (E, in, out) G+ and G− (the map's crossbar orientation) from its tile files."""
    root = Path(export_dir)
    index = json.loads((root / INDEX_NAME).read_text())
    entry = next((layer for layer in index["layers"] if layer["name"] == name), None)
    if entry is None:
        raise MapError(f"{root}: no layer {name!r} in {INDEX_NAME}")
    shape = entry["shape"]
    e, out, inp = (shape[0] if len(shape) == 3 else 1), shape[-2], shape[-1]
    gp, gm = np.full((e, inp, out), np.nan, np.float32), np.full((e, inp, out), np.nan, np.float32)
    for tile in entry["tiles"]:
        pair = np.load(root / tile["file"])
        (i0, ni), (o0, no) = tile["inputs"], tile["outputs"]
        if pair.shape != (2, no, ni):
            raise MapError(f"{root / tile['file']}: shape {pair.shape}, expected {(2, no, ni)}")
        gp[tile["expert"], i0:i0 + ni, o0:o0 + no] = pair[0].T
        gm[tile["expert"], i0:i0 + ni, o0:o0 + no] = pair[1].T
    if np.isnan(gp).any() or np.isnan(gm).any():
        raise MapError(f"{root}: the tiles of {name} do not cover the layer")
    return gp, gm


__all__ = ["INDEX_NAME", "export_crosssim", "read_crosssim_layer"]
