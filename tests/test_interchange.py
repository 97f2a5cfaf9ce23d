"""Tests for the interchange formats: Fusion CSV + sidecar (round trip), CrossSim per-array files, the CLI."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import analogllm as al
from analogllm.cli import main
from analogllm.data import token_blocks
from analogllm.export import MapError, export_map, load_map
from analogllm.export.crosssim import INDEX_NAME, export_crosssim, read_crosssim_layer
from analogllm.export.fusion import CSV_NAME, SIDECAR_NAME, export_fusion, import_fusion
from analogllm.hf.models import load_model


def exported(tmp_path: Path, name: str, profile: str, zeros: bool = False, **overrides) -> Path:
    model, tok = load_model(name)
    if zeros:  # exact +0 and -0 weights (quantised checkpoints have them): they leave -0.0 conductance targets
        with torch.no_grad():
            weight = next(m.weight for m in model.modules() if isinstance(m, torch.nn.Linear))
            weight[0, :5] = 0.0
            weight[1, :3] = -0.0
    al.analogize_(model, al.AnalogConfig.from_profile(profile, **overrides))
    al.program_(model, 1)
    with torch.no_grad():
        model.eval()(input_ids=token_blocks(tok, split="train", max_blocks=1))
    return export_map(model, tmp_path / f"map-{name}-{profile}", progress=False)


CASES = [("tiny-llama", "pcm", {"tiling.rows": 48, "tiling.cols": 40}),   # partial tiles on both axes
         ("tiny-gpt2", "rram", {"tiling.rows": 48}),                         # Conv1D with biases, 32 levels
         ("tiny-qwen3-moe", "pcm", {"tiling.rows": 48})]                     # 3-D expert weights


@pytest.mark.parametrize("name,profile,overrides", CASES)
def test_fusion_round_trip_is_exact(tmp_path, name, profile, overrides):
    path = exported(tmp_path, name, profile, zeros=True, **overrides)
    fusion = export_fusion(path, tmp_path / "fusion")
    assert sorted(p.name for p in fusion.iterdir()) == [CSV_NAME, SIDECAR_NAME]
    back = import_fusion(fusion, tmp_path / "back")
    original, rebuilt = load_map(path), load_map(back)
    assert list(rebuilt.layers) == list(original.layers)
    for layer_name, lmap in original.layers.items():
        a, b = lmap.arrays(), rebuilt.layers[layer_name].arrays()
        assert a.keys() == b.keys()
        for key in a:  # bit for bit: conductances, levels, scales, biases
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (layer_name, key)
        assert torch.equal(lmap.target_weight(), rebuilt.layers[layer_name].target_weight())
        for key in ("g_plus", "g_minus"):  # signed zeros too, so the files are identical
            assert torch.equal(torch.signbit(a[key]), torch.signbit(b[key])), (layer_name, key)
    negative_zeros = sum(int(torch.signbit(lmap.arrays()["g_minus"]).sum()) for lmap in original.layers.values())
    if name != "tiny-gpt2":  # (GPT-2's projections are Conv1D, not the nn.Linear zeroed above)
        assert negative_zeros > 0
    # identical files, so identical manifests and manifest checksums
    assert rebuilt.manifest == original.manifest
    assert rebuilt.manifest["manifest_sha256"] == original.manifest["manifest_sha256"]


def test_fusion_csv_has_aihwkit_layout_and_the_sidecar_the_signs(tmp_path):
    path = exported(tmp_path, "tiny-llama", "pcm", **{"tiling.rows": 48, "tiling.cols": 40})
    fusion = export_fusion(path, tmp_path / "fusion")
    lines = (fusion / CSV_NAME).read_text().split("\n")
    amap = load_map(path)
    records = amap.manifest["layers"]
    assert lines[1].split(",") == ["AnalogLinear"] * len(records)
    assert [int(x) for x in lines[2].split(",")] == [r["shape"][0] * r["shape"][1] for r in records]  # num_weights
    assert [int(x) for x in lines[3].split(",")] == [r["shape"][0] for r in records]  # height = outputs
    assert [int(x) for x in lines[4].split(",")] == [r["shape"][1] for r in records]  # width = inputs
    assert lines[5].split(",") == [r["name"] for r in records]
    q = np.array(lines[6].split(","), dtype=np.float64)  # q_proj: 64 × 64 on 2 input tiles of 32 × 2 blocks (40, 24)
    assert q.size == 64 * 64
    arrays = amap.layers[records[0]["name"]].arrays()
    magnitude = (arrays["g_plus"] + arrays["g_minus"])[0].double().numpy()  # (in, out)
    first = q[: 40 * 32].reshape(40, 32)  # tile (input tile 0, column block 0): 40 outputs × 32 inputs
    second = q[40 * 32: 40 * 32 + 24 * 32].reshape(24, 32)  # tile (0, 1): outputs 40..63
    assert np.array_equal(first, magnitude[0:32, 0:40].T) and np.array_equal(second, magnitude[0:32, 40:64].T)
    assert q.max() <= 25.0 and q.min() >= 0.0  # one device per weight, within g_max
    sidecar = json.loads((fusion / SIDECAR_NAME).read_text())
    meta = sidecar["layers"][0]
    assert [t["shape"] for t in meta["tiles"]] == [[40, 32], [24, 32], [40, 32], [24, 32]]
    assert "sign bit 1 means the weight is negative" in sidecar["sign_convention"]
    assert sidecar["g_max_uS"] == 25.0 and sidecar["dac"]["bits"] == 8
    # weight = sign · conductance / g_max · scale, from the CSV and the sidecar alone
    bits = np.unpackbits(np.frombuffer(base64.b64decode(meta["signs"]), np.uint8))[: 64 * 64]
    sign = np.where(bits.reshape(64, 64) == 1, -1.0, 1.0)  # (in, out)
    scale = np.array(meta["scale"])[0]  # (T, out)
    weight = (sign * magnitude / 25.0 * scale[np.arange(64) // 32]).T
    assert np.allclose(weight, amap.layers[records[0]["name"]].target_weight().numpy(), rtol=0, atol=1e-7)


def test_fusion_import_takes_chip_readback_and_rejects_bad_files(tmp_path):
    path = exported(tmp_path, "tiny-llama", "rram", **{"tiling.rows": 48})
    fusion = export_fusion(path, tmp_path / "fusion")
    lines = (fusion / CSV_NAME).read_text().split("\n")
    values = lines[6].split(",")
    level = 40.0 / 31
    target = next(i for i, v in enumerate(values) if float(v) > 2 * level)
    values[target] = repr(float(values[target]) - level)  # the chip read one device a level lower
    lines[6] = ",".join(values)
    (fusion / CSV_NAME).write_text("\n".join(lines))
    back = load_map(import_fusion(fusion, tmp_path / "back"))
    original = load_map(path)
    name = original.manifest["layers"][0]["name"]
    diff = (back.layers[name].target_weight() - original.layers[name].target_weight()).abs()
    assert (diff > 0).sum() == 1  # exactly that weight changed; the map is still valid
    assert back.manifest["manifest_sha256"] != original.manifest["manifest_sha256"]
    values[target] = "41.5"  # above g_max = 40 µS
    lines[6] = ",".join(values)
    (fusion / CSV_NAME).write_text("\n".join(lines))
    with pytest.raises(MapError, match="conductances outside"):
        import_fusion(fusion, tmp_path / "bad")
    lines[5] = lines[5].replace("q_proj", "query")
    (fusion / CSV_NAME).write_text("\n".join(lines))
    with pytest.raises(MapError, match="layer names do not match"):
        import_fusion(fusion, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_fusion_refuses_photonic_maps_and_out_of_range_g_max(tmp_path):
    photonic = exported(tmp_path, "tiny-llama", "photonic")
    with pytest.raises(ValueError, match="Fusion takes crossbar"):
        export_fusion(photonic, tmp_path / "f")
    low = exported(tmp_path, "tiny-gpt2", "pcm", **{"device.g_max": 5.0, "device.prog_noise_gmax": 5.0})
    with pytest.raises(ValueError, match="outside the 10-40 uS"):
        export_fusion(low, tmp_path / "f")
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("name,profile,overrides", CASES)
def test_crosssim_tiles_reassemble_to_the_map(tmp_path, name, profile, overrides):
    path = exported(tmp_path, name, profile, **overrides)
    out = export_crosssim(path, tmp_path / "crosssim")
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["core"]["balanced.style"] == "ONE_SIDED" and index["core"]["Gmin_norm"] == 0.0
    amap = load_map(path)
    g_max = amap.device_record["g_max_uS"]
    assert index["core"]["Gmax_uS"] == g_max and index["source"]["manifest_sha256"] == amap.manifest["manifest_sha256"]
    for entry, record in zip(index["layers"], amap.manifest["layers"]):
        arrays = amap.layers[record["name"]].arrays()
        gp, gm = read_crosssim_layer(out, record["name"])
        assert np.array_equal(gp, arrays["g_plus"].numpy()) and np.array_equal(gm, arrays["g_minus"].numpy())
        assert len(entry["tiles"]) == np.prod(record["tiles"]["grid"]) and entry["rows_max"] == record["tiles"]["rows"]
        tile = entry["tiles"][-1]
        pair = np.load(out / tile["file"])
        (i0, ni), (o0, no) = tile["inputs"], tile["outputs"]
        assert pair.dtype == np.float32 and pair.shape == (2, no, ni)  # CrossSim orientation: outputs × inputs
        assert ((pair[0] == 0) | (pair[1] == 0)).all() and pair.max() <= g_max
        # the normalised matrix CrossSim is programmed with, times the scale, is the map's weight block
        scale = np.load(out / entry["scale"])[tile["expert"], tile["input_tile"], o0:o0 + no]
        w = amap.layers[record["name"]].target_weight().numpy().reshape(-1, *record["shape"][-2:])[tile["expert"]]
        assert np.allclose((pair[0] - pair[1]) / g_max * scale[:, None], w[o0:o0 + no, i0:i0 + ni], rtol=0, atol=1e-7)
        if record["bias"]:
            assert np.array_equal(np.load(out / entry["bias"]), arrays["bias"].numpy())


def test_cli_convert_map_round_trip_and_errors(tmp_path, capsys):
    path = exported(tmp_path, "tiny-llama", "pcm")
    assert main(["convert-map", str(path), "--to", "fusion", "--out", str(tmp_path / "f")]) == 0
    assert main(["convert-map", str(tmp_path / "f"), "--to", "analogllm", "--out", str(tmp_path / "m")]) == 0
    assert main(["convert-map", str(path), "--to", "crosssim", "--out", str(tmp_path / "c")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_map(tmp_path / "m").manifest == load_map(path).manifest
    for f in (path / "layers").iterdir():  # the re-imported map is the exported one, file for file
        assert (tmp_path / "m" / "layers" / f.name).read_bytes() == f.read_bytes()
    assert main(["convert-map", str(path), "--to", "analogllm", "--out", str(tmp_path / "x")]) == 2
    assert "not a Fusion export" in capsys.readouterr().err
    assert main(["convert-map", str(tmp_path / "c"), "--to", "fusion", "--out", str(tmp_path / "x")]) == 2
    assert "not an analogllm map" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("keep")
    for fmt in ("fusion", "crosssim"):
        assert main(["convert-map", str(path), "--to", fmt, "--out", str(tmp_path / "mine")]) == 2
        assert "exists and is not" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["a.txt"]
    photonic = exported(tmp_path, "tiny-llama", "photonic")
    assert main(["convert-map", str(photonic), "--to", "crosssim", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()
