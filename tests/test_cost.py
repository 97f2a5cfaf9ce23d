"""Tests for analogllm.cost and ``analogllm cost``: counts by hand, totals, units, map == model, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import analogllm as al
from analogllm.cli import main
from analogllm.cost import estimate, load_hardware, to_dict, workload_from_manifest, workload_from_model
from analogllm.cost.counts import LayerCounts, Workload, hf_config_for
from analogllm.cost.estimate import PJ, laser_pj_per_detection, mesh_holding_w, mesh_transmission
from analogllm.data import token_blocks
from analogllm.export import export_map
from analogllm.hf.models import load_model

TILES = {"tiling.rows": 48, "tiling.cols": 40}


def converted(name: str, profile: str, **overrides):
    model, tok = load_model(name)
    al.analogize_(model, al.AnalogConfig.from_profile(profile, **overrides))
    return model, tok


def exported(tmp_path: Path, name: str, profile: str, **overrides) -> Path:
    model, tok = converted(name, profile, **overrides)
    al.program_(model, 0)
    with torch.no_grad():
        model.eval()(input_ids=token_blocks(tok, split="train", max_blocks=1))
    return export_map(model, tmp_path / f"map-{name}-{profile}", progress=False)


# ----- counts checked by hand ---------------------------------------------------------------------------------
# tiny-llama: hidden 64, intermediate 128, 2 layers, 4 heads of 16 (2 KV heads), vocab 512.
# 48-row / 40-column arrays: 64 inputs → T = 2 tiles of 32 rows, 128 inputs → T = 3 tiles of 43 rows;
# 32 outputs → 1 column block, 64 → 2, 128 → 4.
#            name        out  in  T  R  TO arrays  MACs  DAC=in·TO ADC=out·T periphery=in+out·T+out·(T−1)+out
HAND = [("self_attn.q_proj", 64, 64, 2, 32, 2, 4, 4096, 128, 128, 64 + 128 + 64 + 64),
        ("self_attn.k_proj", 32, 64, 2, 32, 1, 2, 2048, 64, 64, 64 + 64 + 32 + 32),
        ("self_attn.v_proj", 32, 64, 2, 32, 1, 2, 2048, 64, 64, 64 + 64 + 32 + 32),
        ("self_attn.o_proj", 64, 64, 2, 32, 2, 4, 4096, 128, 128, 64 + 128 + 64 + 64),
        ("mlp.gate_proj", 128, 64, 2, 32, 4, 8, 8192, 256, 256, 64 + 256 + 128 + 128),
        ("mlp.up_proj", 128, 64, 2, 32, 4, 8, 8192, 256, 256, 64 + 256 + 128 + 128),
        ("mlp.down_proj", 64, 128, 3, 43, 2, 6, 8192, 256, 192, 128 + 192 + 128 + 64)]


def test_crossbar_counts_by_hand_on_tiny_llama():
    model, _ = converted("tiny-llama", "pcm", **TILES)
    w = workload_from_model(model, context=100)
    assert [layer.name for layer in w.layers] == [f"model.layers.{i}.{h[0]}" for i in range(2) for h in HAND]
    for layer, (_, out, inp, t, r, to, arrays, macs, dac, adc, periph) in zip(w.layers, HAND * 2):
        assert (layer.out, layer.inp, layer.tiles, layer.rows, layer.col_blocks) == (out, inp, t, r, to)
        assert layer.arrays == arrays and layer.array_reads == arrays  # every array read once per token
        assert (layer.macs, layer.dac_conversions, layer.adc_conversions) == (macs, dac, adc)
        assert layer.periphery_flops == periph
        assert layer.cells == arrays * 48 * 40
    t = w.totals()
    assert t["arrays"] == 2 * (4 + 2 + 2 + 4 + 8 + 8 + 6) == 68
    assert t["macs"] == t["analog_macs"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3) == 73728
    assert t["dac_conversions"] == 2 * (128 + 64 + 64 + 128 + 256 + 256 + 256)
    assert t["adc_conversions"] == 2 * (128 + 64 + 64 + 128 + 256 + 256 + 192)
    # digital parts at context 100: LM head 512 × 64 MACs, QKᵀ and AV 2 layers × 4 heads × 16 × 100 each
    ops = {op.name: op for op in w.digital}
    assert ops["lm_head (Linear)"].macs == 512 * 64 and ops["lm_head (Linear)"].dram_values == 512 * 64
    attention = ops["attention QK^T and AV"]
    assert attention.macs == 2 * 2 * 4 * 16 * 100 and attention.flops == 2 * attention.macs
    assert attention.dram_values == 2 * 2 * 2 * 16 * 101  # layers × (K, V) × KV heads × head_dim × (100 read + 1 written)
    assert ops["attention softmax"].flops == 2 * 4 * 100 * 6
    assert ops["norms"].flops == (2 * 2 + 1) * 64 * 4  # two RMSNorms per layer + the final one
    assert ops["embedding lookup"].dram_values == 64
    # the profile's rank-32 measured correction: 32 · (in + out) per matrix (k, v: their rank 32 caps it)
    correction = ops["measured rank-32 correction"]
    assert correction.chip_only and correction.macs == 2 * 32 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert t["digital_macs"] == 512 * 64 + attention.macs + correction.macs


def test_photonic_mesh_counts_and_moe_active_experts():
    model, _ = converted("tiny-qwen3-moe", "photonic")  # 16-mode meshes, 16-row tiles, top-2 of 4 experts
    w = workload_from_model(model)
    layers = {layer.name: layer for layer in w.layers}
    q = layers["model.layers.0.self_attn.q_proj"]  # 64 × 64: 4 input tiles × 4 output blocks × 1 mesh
    assert (q.tiles, q.rows, q.col_blocks, q.in_blocks, q.arrays) == (4, 16, 4, 1, 16)
    assert (q.dac_conversions, q.adc_conversions, q.detections) == (64 * 4, 64 * 4, 64 * 4)
    up = layers["model.layers.0.mlp.experts.up"]  # 4 experts × 128 × 64, two active per token
    assert (up.experts, up.active, up.out, up.inp) == (4, 2, 128, 64)
    assert up.arrays == 4 * 4 * 8 and up.array_reads == 2 * 4 * 8
    assert up.macs == 2 * 128 * 64 and up.dac_conversions == 2 * 64 * 8 and up.adc_conversions == 2 * 128 * 4
    router = next(op for op in w.digital if op.name.startswith("model.layers.0.mlp.gate"))
    assert router.macs == 4 * 64


def test_map_input_gives_the_counts_of_model_input(tmp_path):
    for name, profile, overrides in (("tiny-llama", "pcm", TILES), ("tiny-qwen3-moe", "photonic", {}),
                                     ("tiny-mamba", "rram", {})):
        model, _ = converted(name, profile, **overrides)
        from_model = workload_from_model(model, context=64)
        path = exported(tmp_path, name, profile, **overrides)
        manifest = json.loads((path / "manifest.json").read_text())
        from_map = workload_from_manifest(manifest, hf_config_for(name), context=64)
        assert from_map.layers == from_model.layers and from_map.digital == from_model.digital
        assert from_map.totals() == from_model.totals()
        assert from_map.input == "map" and from_model.input == "model"


def test_cli_map_and_model_write_identical_counts_and_energies(tmp_path, capsys):
    path = exported(tmp_path, "tiny-llama", "pcm", **TILES)
    assert main(["cost", str(path), "--out", str(tmp_path / "a"), "--context", "64"]) == 0
    assert main(["cost", "tiny-llama", "--profile", "pcm", "--set", "tiling.rows=48", "--set", "tiling.cols=40",
                 "--out", str(tmp_path / "b"), "--context", "64"]) == 0
    printed = capsys.readouterr().out
    assert "## Analogue layers" in printed and "model.layers.1.mlp.down_proj" in printed
    a, b = (json.loads((tmp_path / d / "cost.json").read_text()) for d in ("a", "b"))
    assert (a["input"], b["input"]) == ("map", "model")
    assert a["layers"] == b["layers"] and a["digital"] == b["digital"] and a["totals"] == b["totals"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cost.json", "cost.md", "cost.png"]
    assert (tmp_path / "a" / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "a" / "cost.md").read_text()
    assert "## Sources" in md and "Le Gallo" in md and "9.76" in md


# ----- energies: totals are sums of parts, units agree -----------------------------------------------------------
def test_totals_are_sums_of_parts_and_units_agree():
    model, _ = converted("tiny-llama", "pcm", **TILES)
    report = estimate(workload_from_model(model), load_hardware("pcm-hermes"), load_hardware("gpu-h100"))
    d = to_dict(report)
    totals = d["totals"]
    parts = [sum(r["energy_pJ"].values()) for r in d["layers"]] + [sum(r["energy_pJ"].values()) for r in d["digital"]]
    assert totals["energy_per_token_pJ"] == pytest.approx(sum(parts), rel=1e-12)
    assert totals["energy_per_token_pJ"] == pytest.approx(sum(totals["energy_breakdown_pJ"].values()), rel=1e-12)
    assert totals["energy_per_token_J"] == pytest.approx(totals["energy_per_token_pJ"] * 1e-12, rel=1e-12)
    for row in d["layers"]:
        assert row["energy_total_pJ"] == pytest.approx(sum(row["energy_pJ"].values()), rel=1e-12)
        assert row["area_mm2"] == pytest.approx(row["arrays"] * row["array_area_um2"] * 1e-6, rel=1e-12)
    assert totals["area_mm2"] == pytest.approx(sum(r["area_mm2"] for r in d["layers"]), rel=1e-12)
    for key in ("arrays", "macs", "array_reads", "dac_conversions", "adc_conversions", "periphery_flops"):
        assert totals[key] == sum(r[key] for r in d["layers"]), key
    assert totals["digital_flops"] == sum(r["flops"] for r in d["digital"])
    assert totals["latency_per_token_s"] == pytest.approx(
        sum(r["latency_s"] for r in d["layers"]) + sum(r["latency_s"] for r in d["digital"]), rel=1e-12)
    assert totals["tokens_per_s"] == pytest.approx(1 / totals["latency_per_token_s"])
    assert totals["tokens_per_s_pipelined"] >= totals["tokens_per_s"]
    # 48 × 40 arrays are 1920 / 65536 of a 0.62 mm² HERMES core each
    assert d["layers"][0]["array_area_um2"] == pytest.approx(0.62e6 * 48 * 40 / 256**2)


def _single_layer(out: int, inp: int, rows: int, cols: int) -> Workload:
    """A workload of one analogue layer and no digital parts, tiled on rows × cols arrays."""
    t, to = math.ceil(inp / rows), math.ceil(out / cols)
    layer = LayerCounts("w", "linear", "analog", "crossbar", 1, 1, out, inp, t, math.ceil(inp / t), to, 1, rows, cols,
                        False)
    model, _ = converted("tiny-llama", "pcm")
    w = workload_from_model(model)
    return Workload(source="w", model_type="llama", family=None, input="model", target="crossbar", device="pcm",
                    context=0, config=w.config, layers=(layer,), digital=(), products=None,
                    architecture=w.architecture)


def test_full_hermes_sized_mvms_cost_exactly_the_anchored_efficiency():
    hw = load_hardware("pcm-hermes")
    report = estimate(_single_layer(512, 512, 256, 256), hw)
    analog = sum(report.breakdown_pj[k] for k in ("array", "dac", "adc"))  # the chip's MVM, periphery aside
    ops = 2 * 512 * 512
    assert ops / analog == pytest.approx(9.76, rel=1e-12)  # TOPS/W = ops per pJ
    c = hw.crossbar
    assert c.read_time_s == pytest.approx(2 * 256 * 256 / (63.1e12 / 64))  # ≈ 133 ns per core MVM
    assert report.layers[0].latency_s == pytest.approx(c.read_time_s + report.layers[0].counts.periphery_flops / 1e12)
    # half-used arrays (a 128 × 128 layer on 256 × 256 arrays) pay their converters: lower efficiency
    small = estimate(_single_layer(128, 128, 256, 256), hw)
    assert 2 * 128 * 128 / sum(small.breakdown_pj[k] for k in ("array", "dac", "adc")) < 9.76


def test_photonic_light_per_mac_falls_as_one_over_mesh_width_and_holding_power_is_charged():
    hw = load_hardware("photonic").photonic
    per_mac = {k: laser_pj_per_detection(hw, k, 0.0) / k for k in (8, 16, 32)}
    assert per_mac[8] == pytest.approx(2 * per_mac[16]) and per_mac[16] == pytest.approx(2 * per_mac[32])
    assert per_mac[16] == pytest.approx(50e-3 / 0.2 / 16)  # 50 fJ per detection, 20 % wall-plug, 16 MACs
    assert mesh_transmission(16, 0.1) == pytest.approx(10 ** (-3.3 / 10))
    m = 16 * 15 // 2
    assert mesh_holding_w(16, 24.77) == pytest.approx(24.77e-3 * (m + 2 * m + 32 + 8))
    model, _ = converted("tiny-llama", "photonic")
    report = estimate(workload_from_model(model), load_hardware("photonic"))
    meshes = sum(r.counts.arrays for r in report.layers)
    assert report.holding_w == pytest.approx(meshes * mesh_holding_w(16, 24.77))
    assert report.breakdown_pj["phase_holding"] * PJ == pytest.approx(report.holding_w * report.latency_s)


def test_gpu_baseline_reads_every_weight_once_per_token():
    model, _ = converted("tiny-llama", "pcm")
    w = workload_from_model(model, context=32)
    report = estimate(w, load_hardware("pcm-hermes"), load_hardware("gpu-h100"))
    b, t = report.baseline, w.totals()
    correction = [op for op in w.digital if op.chip_only]  # the pcm profile's measured correction
    assert correction and correction[0].sram_values > 0  # the chip pays for it; the GPU runs the exact model
    assert b.ops == 2 * t["macs"] + t["digital_flops"] - correction[0].flops
    assert b.bytes == t["macs"] + t["dram_values"]  # FP8: one byte per weight and KV value
    assert b.energy_pj["compute"] == pytest.approx(b.ops / 2.83) and b.energy_pj["hbm"] == pytest.approx(b.bytes * 8 * 3.9)
    assert b.latency_s == pytest.approx(max(b.ops / 1979e12, b.bytes / 3.35e12))
    assert b.energy_at_tdp_j == pytest.approx(700 * b.latency_s)


def test_context_adds_attention_work_linearly():
    model, _ = converted("tiny-llama", "pcm")
    short, long = (workload_from_model(model, context=n).totals() for n in (10, 110))
    assert long["digital_macs"] - short["digital_macs"] == 2 * 2 * 4 * 16 * 100
    assert long["dram_values"] - short["dram_values"] == 2 * 2 * 2 * 16 * 100
    assert long["macs"] == short["macs"]  # the analogue layers do not see the context


# ----- bad input -----------------------------------------------------------------------------------------------
def _profile_text(**changes: str) -> str:
    from importlib import resources

    text = resources.files("analogllm.cost.hardware").joinpath("pcm-hermes.yaml").read_text()
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("text,key", [
    (_profile_text(**{"  dac_pj: 0.1": "  dac_pJ: 0.1"}), "crossbar.dac_pJ"),            # unknown field (typo)
    (_profile_text(**{"  adc_fom_fj: 10.0": "  adc_fom_fj: -3"}), "crossbar.adc_fom_fj"),  # out of range
    (_profile_text(**{"  anchor_tops: 63.1": "  anchor_tops: fast"}), "crossbar.anchor_tops"),  # wrong type
    (_profile_text(**{"  crossbar.dac_pj:": "  crossbar.dac_pj_cited:"}), "crossbar.dac_pj"),  # number without source
    (_profile_text(**{"  array_area_mm2: 0.62\n": ""}), "array_area_mm2"),                 # missing field
    ("crossbar: [1, 2\n", "not valid YAML"),
])
def test_bad_hardware_yaml_is_one_clear_line_exit_2_and_writes_nothing(tmp_path, capsys, text, key):
    bad = tmp_path / "chip.yaml"
    bad.write_text(text)
    out = tmp_path / "report"
    assert main(["cost", "tiny-llama", "--profile", "pcm", "--hardware", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and str(bad) in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_hardware_file_wrong_kind_and_foreign_folder_are_refused(tmp_path, capsys):
    assert main(["cost", "tiny-llama", "--hardware", str(tmp_path / "nope.yaml")]) == 2
    assert "no such hardware profile file" in capsys.readouterr().err
    assert main(["cost", "tiny-llama", "--profile", "pcm", "--hardware", "photonic"]) == 2
    assert "is a photonic chip but the model is mapped to crossbar" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["cost", "tiny-llama", "--out", str(tmp_path / "mine")]) == 2
    assert "is not an analogllm cost report" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert main(["cost", "tiny-llama", "--context", "-1"]) == 2
    # a report folder can be rewritten in place
    assert main(["cost", "tiny-llama", "--out", str(tmp_path / "r")]) == 0
    assert main(["cost", "tiny-llama", "--out", str(tmp_path / "r"), "--context", "8"]) == 0
    assert json.loads((tmp_path / "r" / "cost.json").read_text())["context_tokens"] == 8


def test_every_builtin_number_has_a_source():
    from analogllm.cost.hardware import hardware_names

    for name in hardware_names():
        profile = load_hardware(name)
        assert set(profile.numbers()) <= set(profile.sources), name
        assert all(len(profile.sources[k]) > 20 for k in profile.numbers()), name
