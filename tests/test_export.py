"""Tests for analogllm.export: crossbar and photonic maps, load_map's checks, verify, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import analogllm as al
from analogllm.cli import main
from analogllm.data import token_blocks
from analogllm.devices.conductance import weight_to_pair
from analogllm.export import FORMAT_VERSION, MapError, export_map, load_map, verify_map
from analogllm.export.manifest import analog_layers, manifest_digest, scale_per_input, seal_manifest, sha256_file
from analogllm.hf.models import load_model
from analogllm.hf.checkpoint import save_pretrained


def analog_model(name: str, profile: str, seed: int = 3, seconds: float = 0.0, **overrides):
    """A tiny analogue model on chip ``seed`` whose learned DAC ranges have seen data (as a deployed one)."""
    model, tok = load_model(name)
    al.analogize_(model, al.AnalogConfig.from_profile(profile, **overrides))
    al.program_(model, seed, seconds)
    with torch.no_grad():
        model.eval()(input_ids=token_blocks(tok, split="train", max_blocks=2))
    return model, tok


def model_scales(layer) -> torch.Tensor:
    """(E, out, in) scale of the tile column each weight sits in, computed from the model."""
    w = layer.stacked_weight()
    scale = layer.matrix.normalised_tiles(w)[1].squeeze(-1)
    return scale_per_input(scale, layer.matrix.rows, w.shape[-1]).double()


def rewrite(amap_dir: Path, layer_name: str, arrays: dict[str, torch.Tensor]) -> None:
    """Replace a layer's file and update its checksum and the manifest's own: a tampered map that still
    passes every checksum."""
    manifest_file = amap_dir / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    record = next(r for r in manifest["layers"] if r["name"] == layer_name)
    file = amap_dir / record["file"]
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(file))
    record["sha256"], record["bytes"] = sha256_file(file), file.stat().st_size
    manifest_file.write_text(json.dumps(seal_manifest(manifest)))


# ----- crossbar -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["pcm", "rram"])
def test_crossbar_map_reproduces_weights_within_quantization_step(tmp_path, profile):
    # 48-row / 40-column tiles on 64-wide layers: partial tiles on both axes
    model, _ = analog_model("tiny-llama", profile, **{"tiling.rows": 48, "tiling.cols": 40})
    amap = load_map(export_map(model, tmp_path / "map", progress=False))
    dev = amap.device_record
    levels = dev["levels"]
    assert levels == (32 if profile == "rram" else 256)
    assert dev["levels_from"] == ("device" if profile == "rram" else "export")
    half_step = 0.5 / (levels - 1)
    worst = 0.0
    for layer in analog_layers(model):
        lmap = amap.layers[layer.name]
        rec, arrays = lmap.record, lmap.arrays()
        w, scale = layer.stacked_weight().double(), model_scales(layer)
        # the tile spans tile the matrix exactly, with the layer's tile sizes
        out, inp = layer.shape[-2:]
        rows = layer.matrix.rows  # inputs split evenly over ceil(inp / 48) arrays of 48 rows
        assert rows <= 48 and [s for s, _ in rec["tiles"]["inputs"]] == list(range(0, inp, rows))
        assert sum(n for _, n in rec["tiles"]["inputs"]) == inp and sum(n for _, n in rec["tiles"]["outputs"]) == out
        assert rec["tiles"]["grid"] == [1, math.ceil(inp / 48), math.ceil(out / 40)]
        # conductances are the differential-pair encoding of weight / column scale (rows = inputs)
        g_plus, g_minus = weight_to_pair((w / scale).transpose(-1, -2), dev["g_max_uS"])
        assert torch.all((arrays["g_plus"] == 0) | (arrays["g_minus"] == 0))
        err_g = (arrays["g_plus"].double() - g_plus).abs().max() / dev["g_max_uS"]
        from_g = (lmap.target_weight() - w.reshape(lmap.target_weight().shape)).abs().reshape(w.shape) / scale
        from_levels = (lmap.target_weight("levels").reshape(w.shape) - w).abs() / scale
        assert from_levels.max() <= half_step + 1e-6
        if profile == "rram":  # the device holds 32 levels: conductances are on them
            assert err_g <= half_step + 1e-6 and from_g.max() <= half_step + 1e-6
            worst = max(worst, float(from_g.max()))
        else:  # PCM is programmed continuously: conductances are exact, level indices within the grid
            assert err_g < 1e-6 and from_g.max() < 1e-6
    if profile == "rram":
        assert worst > 0.5 * half_step  # quantisation is real, and the bound is tight


def test_crossbar_manifest_describes_model_chip_and_converters(tmp_path):
    model, _ = analog_model("tiny-gpt2", "pcm", seed=5, seconds=86400.0)
    path = export_map(model, tmp_path / "map", progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "analogllm-map" and manifest["format_version"] == FORMAT_VERSION
    assert al.AnalogConfig.from_dict(manifest["profile"]) == model.analog_config
    assert manifest["chip"] == {"seed": 5, "seconds": 86400.0}
    assert {d["name"] for d in manifest["digital"]} == set(model.analog_report.digital)
    assert manifest["converters"]["adc"]["step"] == pytest.approx(2 * 12.0 / 254)
    layers = {layer.name: layer for layer in analog_layers(model)}
    for rec in manifest["layers"]:
        layer = layers[rec["name"]]
        assert rec["kind"] == "conv1d" and rec["bias"]
        assert rec["dac_range"] == pytest.approx(float(layer.matrix.input_range.detach().abs()))
        # drift-compensation gain of this chip instance after a day (≠ 1), as the model computes it
        assert rec["gain"] == float(layer.matrix.chip.compensation[0]) and rec["gain"] > 1.05
        assert rec["sha256"] == sha256_file(path / rec["file"])
        assert torch.equal(load_file(str(path / rec["file"]))["bias"][0], layer.bias.detach())


# ----- photonic -------------------------------------------------------------------------------------------
def test_photonic_exact_phases_reproduce_weights_to_1e6(tmp_path):
    model, _ = analog_model("tiny-llama", "photonic", **{"device.phase_bits": None, "device.phase_noise": 0.0,
                                                         "device.loss_db_per_mzi": 0.0, "tiling.rows": 40})
    amap = load_map(export_map(model, tmp_path / "map", progress=False))
    assert amap.device_record["phase_bits"] is None
    for layer in analog_layers(model):
        lmap = amap.layers[layer.name]
        assert not any(k.endswith("_code") for k in lmap.arrays())
        rebuilt = lmap.target_weight()  # float64, from θ, φ, output phases, σ, gains and scales
        assert rebuilt.dtype == torch.float64
        w = layer.stacked_weight().double().reshape(rebuilt.shape)
        assert ((rebuilt - w).abs().max() / w.abs().max()) < 1e-6


def test_photonic_8bit_codes_cost_about_one_percent_and_match_the_phases(tmp_path):
    model, _ = analog_model("tiny-llama", "photonic")
    amap = load_map(export_map(model, tmp_path / "map", progress=False))
    dev = amap.device_record
    assert dev["phase_bits"] == 8 and dev["topology"]["name"] == "clements-rectangular"
    assert len(dev["topology"]["mzi_column"]) == dev["mzis_per_mesh"] == 16 * 15 // 2
    errors = []
    for layer in analog_layers(model):
        lmap = amap.layers[layer.name]
        arrays = lmap.arrays()
        # θ codes on [0, π/2] with both ends, φ codes on the periodic grid 2π/256
        theta = arrays["u_theta_code"].double() * (math.pi / 2) / 255
        assert (theta - arrays["u_theta"]).abs().max() <= (math.pi / 2) / 255 / 2 + 1e-12
        phi = arrays["v_phi_code"].double() * 2 * math.pi / 256
        d = torch.remainder(phi - arrays["v_phi"] + math.pi, 2 * math.pi) - math.pi
        assert d.abs().max() <= math.pi / 256 + 1e-12
        peaks = arrays["sigma"].amax(-1)[arrays["mesh_gain"] > 0]  # passive attenuators, σ_max in the gain
        assert float(arrays["sigma"].max()) <= 1.0 + 1e-12 and torch.allclose(peaks, torch.ones_like(peaks))
        w = layer.stacked_weight().double().reshape(lmap.target_weight().shape)
        errors.append(float((lmap.target_weight("codes") - w).norm() / w.norm()))
        assert float((lmap.target_weight("phases") - w).norm() / w.norm()) < 1e-6
    # docs/export-format.md: 8-bit phases on 16x16 meshes ≈ 1 % relative matrix error
    assert 0.005 < sum(errors) / len(errors) < 0.015 and max(errors) < 0.02


# ----- verify ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,profile,overrides", [
    ("tiny-gpt2", "rram", {"tiling.rows": 48}),
    ("tiny-llama", "pcm", {"tiling.rows": 48, "tiling.cols": 40}),
    ("tiny-llama", "pcm", {"drift.compensation_at": "pulse"}),
    ("tiny-mamba", "pcm", {}),
    ("tiny-qwen3-moe", "photonic", {}),
    ("tiny-rwkv", "photonic", {"tiling.rows": 40}),
    ("tiny-qwen3-next", "rram", {}),
])
def test_verify_passes_on_every_family(tmp_path, name, profile, overrides):
    model, tok = analog_model(name, profile, seconds=3600.0 if profile == "pcm" else 0.0, **overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = verify_map(export_map(model, tmp_path / "map", progress=False), model, tok, max_blocks=4)
    assert report.passed, report.summary()
    # the chip programmed from the files is the exported chip instance, bit for bit
    assert report.logit_error == 0.0 and report.perplexity_map == report.perplexity_model
    assert all(c.chip_error == 0.0 and c.gain_error == 0.0 for c in report.layers)
    assert report.tokens == 4 * 127
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched


def test_verify_fails_on_consistently_tampered_crossbar_map(tmp_path):
    model, tok = analog_model("tiny-llama", "pcm")
    path = export_map(model, tmp_path / "map", progress=False)
    name = "model.layers.1.mlp.down_proj"
    arrays = load_file(str(path / load_map(path).layers[name].record["file"]))
    g = arrays["g_plus"]
    i = int(torch.argmax(g))  # a device at g_max reprogrammed to half of it, level index made to agree
    g.view(-1)[i] = g.view(-1)[i] / 2
    arrays["level_plus"] = torch.round(g / load_map(path).device_record["level_step_uS"]).to(torch.uint8)
    rewrite(path, name, arrays)
    report = verify_map(path, model, tok, max_blocks=4)  # checksums and value ranges pass, the content does not
    assert not report.passed
    bad = [c for c in report.layers if not c.ok]
    assert [c.name for c in bad] == [name] and bad[0].target_error == pytest.approx(0.5, abs=1e-5)
    assert report.logit_error > 0 and any(name in f for f in report.failures)


def test_verify_fails_on_consistently_tampered_photonic_map(tmp_path):
    from analogllm.devices import mesh

    model, tok = analog_model("tiny-gpt2", "photonic")
    path = export_map(model, tmp_path / "map", progress=False)
    name = "transformer.h.0.mlp.c_fc"
    arrays = load_file(str(path / load_map(path).layers[name].record["file"]))
    arrays["u_phi"].view(-1)[7] = (arrays["u_phi"].view(-1)[7] + 0.3) % (2 * math.pi)  # one MZI's phase
    phases = mesh.MeshPhases(theta=arrays["u_theta"].reshape(-1, 120), phi=arrays["u_phi"].reshape(-1, 120),
                             out_phase=arrays["u_out_phase"].reshape(-1, 16), n=16)
    arrays["u_phi_code"] = mesh.quantize_phases(phases, 8)[1].phi.reshape(arrays["u_phi"].shape).to(torch.uint8)
    rewrite(path, name, arrays)
    report = verify_map(path, model, tok, max_blocks=4)
    assert not report.passed and [c.name for c in report.layers if not c.ok] == [name]
    assert report.logit_error > 0


def test_verify_rejects_a_different_model(tmp_path):
    model, tok = analog_model("tiny-llama", "pcm")
    path = export_map(model, tmp_path / "map", progress=False)
    other, _ = analog_model("tiny-llama", "rram")
    with pytest.raises(ValueError, match="config differs from the map's profile at device"):
        verify_map(path, other, tok)
    gpt2, _ = analog_model("tiny-gpt2", "pcm")
    with pytest.raises(MapError, match="do not match the model's analogue layers"):
        verify_map(path, gpt2, tok)


# ----- rejections -----------------------------------------------------------------------------------------
@pytest.fixture
def crossbar_map(tmp_path):
    model, _ = analog_model("tiny-llama", "rram")
    return export_map(model, tmp_path / "map", progress=False)


def _first_record(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())["layers"][0]


def test_load_rejects_checksum_mismatch(crossbar_map):
    file = crossbar_map / _first_record(crossbar_map)["file"]
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01  # one bit of one conductance
    file.write_bytes(bytes(data))
    with pytest.raises(MapError, match="checksum mismatch"):
        load_map(crossbar_map)
    assert main(["verify", str(crossbar_map)]) == 2


def test_load_rejects_missing_file_and_missing_array(crossbar_map):
    rec = _first_record(crossbar_map)
    arrays = load_file(str(crossbar_map / rec["file"]))
    del arrays["level_minus"]
    rewrite(crossbar_map, rec["name"], arrays)
    with pytest.raises(MapError, match="array 'level_minus' is missing"):
        load_map(crossbar_map)
    (crossbar_map / rec["file"]).unlink()
    with pytest.raises(MapError, match="file is missing"):
        load_map(crossbar_map)


def test_load_rejects_wrong_shape(crossbar_map):
    rec = _first_record(crossbar_map)
    arrays = load_file(str(crossbar_map / rec["file"]))
    arrays["scale"] = arrays["scale"][:, :, :-1]  # one output column short
    rewrite(crossbar_map, rec["name"], arrays)
    with pytest.raises(MapError, match="wrong shape"):
        load_map(crossbar_map)


def test_load_rejects_inconsistent_values(crossbar_map):
    rec = _first_record(crossbar_map)
    arrays = load_file(str(crossbar_map / rec["file"]))
    arrays["level_plus"] = torch.where(arrays["level_plus"] > 3, arrays["level_plus"] - 3, arrays["level_plus"])
    rewrite(crossbar_map, rec["name"], arrays)
    with pytest.raises(MapError, match="not the nearest level"):
        load_map(crossbar_map)


def test_load_rejects_unknown_format_version_and_non_maps(crossbar_map, tmp_path):
    manifest_file = crossbar_map / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(MapError, match=f"unknown format_version {FORMAT_VERSION + 1}"):
        load_map(crossbar_map)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MapError, match="not an analogllm map"):
        load_map(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_map(tmp_path / "nowhere")


def test_failed_export_leaves_no_partial_output_and_keeps_an_old_map(tmp_path):
    model, _ = analog_model("tiny-llama", "pcm")
    with torch.no_grad():  # the last layer cannot be programmed: the export fails after writing others
        analog_layers(model)[-1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj: the weight has NaN"):
        export_map(model, tmp_path / "map", progress=False)
    assert list(tmp_path.iterdir()) == []  # no map, no temporary folder
    good, _ = analog_model("tiny-llama", "pcm")
    path = export_map(good, tmp_path / "map", progress=False)
    manifest = (path / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="NaN"):
        export_map(model, path, progress=False)
    assert (path / "manifest.json").read_bytes() == manifest and len(list(tmp_path.iterdir())) == 1
    load_map(path)


def test_export_rejects_bad_input(tmp_path):
    digital, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="not analogue"):
        export_map(digital, tmp_path / "a")
    fresh, _ = load_model("tiny-llama")
    al.analogize_(fresh, "pcm")
    with pytest.raises(ValueError, match="learned DAC input range was never initialised"):
        export_map(fresh, tmp_path / "a", progress=False)
    model, _ = analog_model("tiny-llama", "pcm")
    with pytest.raises(ValueError, match="target 'photonic' needs a photonic device"):
        export_map(model, tmp_path / "a", "photonic")
    with pytest.raises(ValueError, match="unknown target 'gds'"):
        export_map(model, tmp_path / "a", "gds")
    rram, _ = analog_model("tiny-llama", "rram")
    with pytest.raises(ValueError, match="holds exactly its 32 levels"):
        export_map(rram, tmp_path / "a", levels=64)
    ideal, _ = analog_model("tiny-llama", "ideal")
    with pytest.raises(ValueError, match="needs a crossbar device"):
        export_map(ideal, tmp_path / "a")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not an analogllm map"):
        export_map(model, tmp_path / "mine", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# ----- CLI ------------------------------------------------------------------------------------------------
def test_cli_exports_and_verifies_a_checkpoint(tmp_path, capsys):
    model, tok = load_model("tiny-llama")
    al.analogize_(model, al.AnalogConfig.from_profile("rram", **{"tiling.rows": 48}))
    al.program_(model, 2)
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)  # fresh conversion: DAC ranges unset
    assert main(["export", str(tmp_path / "ckpt"), "--target", "crossbar", "--out", str(tmp_path / "map")]) == 0
    assert "14 layers" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "map" / "manifest.json").read_text())
    assert manifest["calibration"]["blocks"] == 4 and manifest["chip"]["seed"] == 2
    assert main(["verify", str(tmp_path / "map"), "--blocks", "4"]) == 0  # rebuilt and calibrated alike
    assert "PASS" in capsys.readouterr().out
    name = manifest["layers"][3]["name"]
    arrays = load_file(str(tmp_path / "map" / manifest["layers"][3]["file"]))
    arrays["scale"] = arrays["scale"] * 1.5
    rewrite(tmp_path / "map", name, arrays)
    assert main(["verify", str(tmp_path / "map"), "--blocks", "4"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "ckpt"), "--profile", "pcm", "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint with its own config" in capsys.readouterr().err


def test_cli_exports_a_builtin_model_with_a_profile(tmp_path, capsys):
    out = tmp_path / "map"
    assert main(["export", "tiny-gpt2", "--profile", "photonic", "--set", "tiling.rows=32", "--out", str(out)]) == 0
    assert load_map(out).manifest["model"]["source"] == "tiny-gpt2"
    assert main(["verify", str(out), "--blocks", "2"]) == 0
    args = ["export", "tiny-gpt2", "--profile", "photonic", "--target", "crossbar", "--out", str(tmp_path / "y")]
    assert main(args) == 2
    assert "needs a crossbar device" in capsys.readouterr().err


# ----- the manifest's own checksum ------------------------------------------------------------------------------
def test_manifest_checksum_rejects_a_changed_chip_seed(crossbar_map):
    manifest_file = crossbar_map / "manifest.json"
    original = manifest_file.read_text()
    manifest = json.loads(original)
    assert manifest["manifest_sha256"] == manifest_digest(manifest)
    manifest["chip"]["seed"] += 1  # only the seed: every layer file and its checksum are untouched
    manifest_file.write_text(json.dumps(manifest, indent=1))
    with pytest.raises(MapError, match="manifest_sha256 does not match"):
        load_map(crossbar_map)
    assert main(["verify", str(crossbar_map)]) == 2
    manifest = json.loads(original)
    manifest["layers"][2]["seed"] = 7  # one layer's chip instance
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(MapError, match="manifest_sha256 does not match"):
        load_map(crossbar_map)
    manifest = json.loads(original)
    manifest["manifest_sha256"] = "0" * 64
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(MapError, match="manifest_sha256 does not match"):
        load_map(crossbar_map)


def test_manifest_checksum_covers_content_not_layout_and_older_maps_load(crossbar_map):
    manifest_file = crossbar_map / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps(dict(reversed(manifest.items())), indent=4))  # other key order, spacing
    assert load_map(crossbar_map).manifest["manifest_sha256"] == manifest["manifest_sha256"]
    del manifest["manifest_sha256"]  # a version-1 map written before the checksum existed
    manifest_file.write_text(json.dumps(manifest))
    load_map(crossbar_map)


def test_identical_exports_have_identical_files_and_manifest_hashes(tmp_path):
    model, _ = analog_model("tiny-qwen3-moe", "pcm", seconds=60.0)
    a = export_map(model, tmp_path / "a", progress=False)
    b = export_map(model, tmp_path / "b", progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["manifest_sha256"] == mb["manifest_sha256"] == manifest_digest(ma)
    other, _ = analog_model("tiny-qwen3-moe", "pcm", seed=4, seconds=60.0)  # another chip instance
    c = json.loads((export_map(other, tmp_path / "c", progress=False) / "manifest.json").read_text())
    assert c["manifest_sha256"] != ma["manifest_sha256"]


def test_layer_files_are_written_array_by_array_as_safetensors_lays_them_out(tmp_path):
    """The layer writer streams each array (deferred ones made piece by piece only then) into safetensors'
    own layout: its data section is the library's, byte for byte, and a declared size not made fails."""
    from safetensors import safe_open
    from safetensors.torch import save

    from analogllm.export.manifest import Deferred, save_layer_file

    g = torch.Generator().manual_seed(0)
    arrays = {"g_plus": torch.randn(2, 5, 7, generator=g), "g_minus": torch.randn(2, 7, 5, generator=g).transpose(1, 2),
              "level_plus": torch.randint(0, 255, (2, 5, 7), generator=g, dtype=torch.uint8),
              "level_minus": torch.randint(0, 9, (2, 5, 7), generator=g, dtype=torch.int32), "scale": torch.rand(2, 3)}
    made = []
    def pieces():  # rows of the array in file order, made one at a time
        made.append(1)
        yield from arrays["g_plus"].reshape(-1, 7)

    written = dict(arrays, g_plus=Deferred((2, 5, 7), torch.float32, pieces))
    save_layer_file(written, tmp_path / "a.safetensors", {"layer": "x", "format": "f"})
    assert made == [1]
    reference = save({k: v.contiguous() for k, v in arrays.items()})
    data = (tmp_path / "a.safetensors").read_bytes()
    assert data[8 + int.from_bytes(data[:8], "little"):] == reference[8 + int.from_bytes(reference[:8], "little"):]
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"layer": "x", "format": "f"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in arrays.items())
    wrong = dict(arrays, scale=Deferred((2, 4), torch.float32, lambda: [torch.zeros(2, 3)]))
    with pytest.raises(RuntimeError, match="declared"):
        save_layer_file(wrong, tmp_path / "b.safetensors", {})
    wrong = dict(arrays, scale=Deferred((2, 4), torch.float32, lambda: [torch.zeros(8, dtype=torch.float64)]))
    with pytest.raises(RuntimeError, match="declared"):
        save_layer_file(wrong, tmp_path / "c.safetensors", {})
