"""Reading a chip back: measured files → the chip a model runs on → LoRA against it, and the CLI."""

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
from analogllm.eval.perplexity import evaluate_lm
from analogllm.export import export_map, load_map
from analogllm.export.manifest import analog_layers, sha256_file
from analogllm.export import readback as rb
from analogllm.hf.checkpoint import save_pretrained
from analogllm.hf.models import load_model
from analogllm.training.finetune import TrainSection, train_adapters
from analogllm.tuners import lora
from analogllm.tuners.pat import SimulatedChip
from analogllm.tuners.zeroth_order import ZerothOrderConfig

DAY = 86400.0
Q_PROJ = "model.layers.0.self_attn.q_proj"
O_PROJ = "model.layers.0.self_attn.o_proj"


def exported(tmp: Path, profile: str = "pcm", seconds: float = DAY, seed: int = 3, **overrides):
    """A tiny Llama programmed on chip ``seed`` and aged, its DAC ranges set by data, and its map."""
    model, tok = load_model("tiny-llama")
    al.analogize_(model, al.AnalogConfig.from_profile(profile, **overrides))
    al.program_(model, seed, seconds)
    with torch.no_grad():
        model.eval()(input_ids=token_blocks(tok, split="train", max_blocks=2))
    return model, export_map(model, tmp / "map", source="tiny-llama", progress=False)


@pytest.fixture(scope="module")
def pcm(tmp_path_factory):
    """(model, map, noise-free measurement, 16-read measurement) of a PCM chip one day after programming."""
    tmp = tmp_path_factory.mktemp("pcm")
    model, path = exported(tmp)
    exact = rb.simulate_measurement(path, tmp / "exact", reads=None)
    noisy = rb.simulate_measurement(path, tmp / "noisy", reads=16)
    return model, path, exact, noisy


def rewrite_measured(measured: Path, layer: str, arrays: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Replace one measured layer file (and its checksum, so only the change itself is wrong)."""
    meta_file = measured / rb.MEASUREMENT_NAME
    meta = meta or json.loads(meta_file.read_text())
    entry = next(e for e in meta["layers"] if e["name"] == layer)
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(measured / entry["file"]))
    entry["sha256"] = sha256_file(measured / entry["file"])
    meta_file.write_text(json.dumps(meta))


def layer_file(measured: Path, layer: str) -> Path:
    meta = json.loads((measured / rb.MEASUREMENT_NAME).read_text())
    return measured / next(e["file"] for e in meta["layers"] if e["name"] == layer)


def copy_measurement(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def held_out_loss(model, blocks) -> float:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)  # the same read-noise stream for every score
        return evaluate_lm(model, blocks, batch_size=8).loss


# ----- round trip -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile, overrides", [
    ("pcm", {}),
    ("rram", {}),
    ("pcm", {"tiling.rows": 48, "tiling.cols": 40}),  # several input tiles, partial column blocks
    ("pcm", {"drift.compensation_at": "pulse"}),  # the measured gain applied as longer pulses
    ("pcm", {"device.pairs": 2}),  # each side's two devices read in parallel
    ("photonic", {"device.mode_loss_db": [0.2], "device.mode_loss_std_db": 0.05}),
])
def test_noise_free_measurement_reads_back_the_programmed_chip(tmp_path, profile, overrides):
    # the conductances' round trip; a read-back chip measures its own correction (test_correct.py)
    model, path = exported(tmp_path, profile, **{"mapping.correction_rank": 0, **overrides})
    measured = rb.simulate_measurement(path, tmp_path / "measured", reads=None)
    twin, _ = rb.readback_model(path, measured)
    programmed = {layer.name: layer for layer in analog_layers(model)}
    for layer in analog_layers(twin):
        ref = programmed[layer.name].matrix
        chip = layer.matrix.chip
        assert chip.read_back is not None and chip.seconds == DAY
        real = layer.matrix.realised_weight(layer.weight)
        want = ref.realised_weight(programmed[layer.name].weight)
        assert torch.allclose(real, want, rtol=0, atol=1e-6 * float(want.abs().max())), layer.name
        assert torch.allclose(chip.gain, ref.chip.gain, rtol=1e-6)
        assert torch.allclose(chip.compensation, ref.chip.compensation, rtol=1e-6)
        assert torch.equal(chip.scale, ref.chip.scale)
        if ref.chip.read_var is None:
            assert chip.read_var is None
        else:  # the measured spread of one read is the device model's (mean over the tile rows) ...
            full = torch.tensor([n == layer.matrix.rows for _, n in load_map(path).layers[layer.name].record["tiles"]["inputs"]])
            assert torch.allclose(chip.read_var[:, full], ref.chip.read_var[:, full], rtol=1e-5, atol=0)
            # ... except that a partial tile's zero-padded rows carry no input, so no read noise, while
            # the simulation averages its idle padding devices in: a small difference, on those tiles only
            assert torch.allclose(chip.read_var[:, ~full], ref.chip.read_var[:, ~full], rtol=0.1, atol=0)
    if profile == "pcm":  # the device model's read noise at the measured conductances is the same one;
        # with two pairs it takes a side's devices as alike, a lower bound (the mean of squares is at least
        # the square of the mean) within a few % of their own (measured: 0.95–0.99 of it)
        twin_model, _ = rb.readback_model(path, measured, read_noise="model")
        for a, b in zip(analog_layers(twin_model), analog_layers(twin)):
            model_var, own = a.matrix.chip.read_var, b.matrix.chip.read_var
            if "device.pairs" not in overrides:
                assert torch.allclose(model_var, own, rtol=1e-5, atol=0)
            else:
                assert bool((model_var <= own * (1 + 1e-5)).all()) and bool((model_var >= 0.9 * own).all())
        assert max(rb.deviation(twin, load_map(path)).values()) > 0.05  # a day of drift is visible


def test_noisy_measurement_is_within_its_statistical_error(tmp_path):
    # exact per-device read noise, so the programmed chip knows every pair's spread of one read
    model, path = exported(tmp_path, "pcm", **{"exact_read_noise": True})
    reads = 16
    measured = rb.simulate_measurement(path, tmp_path / "measured", reads=reads)
    twin, _ = rb.readback_model(path, measured)
    programmed = {layer.name: layer for layer in analog_layers(model)}
    z, spread = [], []
    for layer in analog_layers(twin):
        truth = programmed[layer.name].matrix.chip
        var = truth.read_var  # (E, T, rows, out): every pair's read variance, normalised units
        keep = var > 0
        diff = layer.matrix.chip.tiles - truth.tiles  # average of N reads − the true conductances
        z.append((diff[keep] / (var[keep] / reads).sqrt()).double())
        spread.append((layer.matrix.chip.read_var[keep] / var[keep]).double())
    z, spread = torch.cat(z), torch.cat(spread)
    n = z.numel()
    assert n > 50_000
    assert abs(float(z.mean())) < 5 / math.sqrt(n)             # unbiased
    assert abs(float(z.std()) - 1) < 0.02                        # error σ/√N, no more, no less
    assert float(z.abs().max()) < 6.5
    assert abs(float(spread.mean()) - 1) < 0.02                  # E[s²] = σ²: the measured spread is right
    assert 0.3 < float(spread.quantile(0.01)) < float(spread.quantile(0.99)) < 2.2  # χ²(15)/15 range


# ----- the read-back chip stays what was measured ---------------------------------------------------------
def test_read_back_chip_is_never_reprogrammed(pcm, tmp_path):
    _, path, _, noisy = pcm
    model, tok = rb.readback_model(path, noisy)
    layer = analog_layers(model)[0]
    tiles = layer.matrix.chip.tiles.clone()
    with torch.no_grad():
        layer.weight.mul_(2.0)  # the digital weight changes; the physical chip does not
    model(input_ids=token_blocks(tok, split="validation", max_blocks=1))
    assert torch.equal(layer.matrix.chip.tiles, tiles) and layer.matrix.chip.read_back is not None
    for action in (lambda: al.program_(model, seed=1), lambda: al.drift_(model, 2 * DAY)):
        with pytest.raises(RuntimeError, match="read back from measurements"):
            action()
    assert torch.equal(layer.matrix.chip.tiles, tiles)
    with pytest.raises(ValueError, match="read back from measurements"):
        save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="read back from measurements"):
        export_map(model, tmp_path / "map2", progress=False)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "map2").exists()
    peft_model = lora.attach_lora(model, lora.LoraSettings(r=2))
    with pytest.raises(lora.ChipMergeError, match="read back"):
        lora.merge_and_reprogram(peft_model, seed=7)


# ----- LoRA against the read-back chip ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["backprop", "physics-aware", "zeroth-order"])
def test_lora_trains_against_the_read_back_chip(pcm, mode):
    _, path, _, noisy = pcm
    model, tok = rb.readback_model(path, noisy)
    train = token_blocks(tok, block_size=64, split="train", max_blocks=256)
    val = token_blocks(tok, block_size=64, split="validation", max_blocks=8)
    tiles = {layer.name: layer.matrix.chip.tiles.clone() for layer in analog_layers(model)}
    fingerprint = lora.chip_fingerprint(model)
    peft_model = lora.attach_lora(model, lora.LoraSettings(r=4, alpha=8))
    before = held_out_loss(peft_model, val)
    backend = None if mode == "backprop" else SimulatedChip(peft_model)
    info = train_adapters(peft_model, mode, train, TrainSection(steps=20, batch_size=8, lr=1e-2),
                          ZerothOrderConfig(steps=30, lr=0.3, eps=0.05, directions=4, noise_probe=0), backend)
    after = held_out_loss(peft_model, val)
    assert math.isfinite(info["last_loss"])
    if mode == "zeroth-order":  # 30 SPSA steps: it runs on the read-back chip; the loss may barely move
        assert after < before + 0.05
    else:
        assert after < before - 0.05, (before, after)
    # the chip it trained against is the measured one, untouched
    assert lora.chip_fingerprint(peft_model) == fingerprint
    base = peft_model.get_base_model()
    for layer in analog_layers(base):
        name = layer.name.replace(".base_layer", "")
        if ".lora_" not in name:
            assert torch.equal(layer.matrix.chip.tiles, tiles[name]) and layer.matrix.chip.read_back is not None


def test_adapters_saved_beside_the_map_load_back(pcm, tmp_path):
    _, map_src, _, noisy = pcm
    path = copy_measurement(map_src, tmp_path / "map")  # a map of our own to write adapters into
    model, tok = rb.readback_model(path, noisy)
    train = token_blocks(tok, block_size=64, split="train", max_blocks=64)
    ids = token_blocks(tok, block_size=64, split="validation", max_blocks=2)
    peft_model = lora.attach_lora(model, lora.LoraSettings(r=4, alpha=8))
    train_adapters(peft_model, "backprop", train, TrainSection(steps=5, batch_size=8, lr=1e-2), ZerothOrderConfig())
    saved = rb.save_readback_adapters(peft_model, path / "adapters" / "day1")
    assert {"adapter_config.json", "adapter_model.safetensors", rb.READBACK_META} <= {p.name for p in saved.iterdir()}
    note = json.loads((saved / rb.READBACK_META).read_text())
    assert note["measurement_sha256"] == rb.load_measured(path, noisy).digest
    load_map(path)  # the map itself is still intact

    fresh, _ = rb.readback_model(path, noisy)
    loaded = rb.load_readback_adapters(fresh, saved)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        want = peft_model.eval()(input_ids=ids).logits
        torch.manual_seed(5)
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, want)

    other = rb.simulate_measurement(path, tmp_path / "other", reads=16, noise_seed=1)  # another read of the chip
    other_model, _ = rb.readback_model(path, other)
    with pytest.raises(ValueError, match="trained on another chip"):
        rb.load_readback_adapters(other_model, saved)
    rb.load_readback_adapters(other_model, saved, strict=False)


# ----- bad measured files --------------------------------------------------------------------------------
def _transpose(a):
    return {**a, "g_plus": a["g_plus"].transpose(-1, -2).contiguous()[:, :, :-1]}


BAD_ARRAYS = {
    "wrong shape": (lambda a: {**a, "g_plus": a["g_plus"][:, :-1]}, "wrong shape"),
    "NaN": (lambda a: {**a, "g_plus": a["g_plus"].index_put((torch.tensor([0]),) * 3, torch.tensor([math.nan]))},
            "non-finite"),
    "siemens": (lambda a: {**a, "g_plus": a["g_plus"] * 1e-6, "g_minus": a["g_minus"] * 1e-6}, "microsiemens"),
    "nanosiemens": (lambda a: {**a, "g_plus": a["g_plus"] * 1e3, "g_minus": a["g_minus"] * 1e3}, "microsiemens"),
    "negative G-": (lambda a: {**a, "g_minus": -a["g_minus"]}, "wrong sign"),
    "missing array": (lambda a: {k: v for k, v in a.items() if k != "g_minus"}, "'g_minus' is missing"),
    "unknown array": (lambda a: {**a, "gplus": a["g_plus"].clone()}, "unexpected array"),
    "integer dtype": (lambda a: {**a, "g_plus": a["g_plus"].round().to(torch.int32)}, "F32 or F64"),
    "one spread": (lambda a: {k: v for k, v in a.items() if k != "g_minus_std"}, "go together"),
    "negative spread": (lambda a: {**a, "g_plus_std": -a["g_plus_std"]}, "standard deviation"),
    "zero gain": (lambda a: {**a, "gain": a["gain"] * 0}, "gain must be > 0"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_measured_layer_is_one_clear_error(pcm, tmp_path, case):
    _, path, _, noisy = pcm
    measured = copy_measurement(noisy, tmp_path / "measured")
    change, message = BAD_ARRAYS[case]
    rewrite_measured(measured, Q_PROJ, change(load_file(str(layer_file(measured, Q_PROJ)))))
    with pytest.raises(rb.MeasurementError, match=message) as err:
        rb.load_measured(path, measured)
    text = str(err.value)
    assert "\n" not in text and Q_PROJ in text and str(layer_file(measured, Q_PROJ)) in text


@pytest.mark.parametrize("case, message", [
    ("swapped pair", "anti-correlate"),        # G+ and G- exchanged: every weight's sign flipped
    ("another layer", "do not resemble"),      # q_proj's file holds o_proj's chip (same shape)
])
def test_measurement_of_something_else_is_refused(pcm, tmp_path, case, message):
    model, path, _, noisy = pcm
    measured = copy_measurement(noisy, tmp_path / "measured")
    arrays = load_file(str(layer_file(measured, Q_PROJ)))
    if case == "swapped pair":
        arrays = {**arrays, "g_plus": arrays["g_minus"], "g_minus": arrays["g_plus"],
                  "g_plus_std": arrays["g_minus_std"], "g_minus_std": arrays["g_plus_std"]}
    else:
        arrays = load_file(str(layer_file(measured, O_PROJ)))
    rewrite_measured(measured, Q_PROJ, arrays)
    fresh, _ = rb.load_source_model(path)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(rb.MeasurementError, match=message) as err:
        rb.chip_from_measurement(fresh, path, measured)
    assert Q_PROJ in str(err.value)
    # checked before anything was installed: the model is as it was
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert all(layer.matrix.chip.read_back is None for layer in analog_layers(fresh))


def test_bad_measurement_folder_is_one_clear_error(pcm, tmp_path):
    _, path, _, noisy = pcm
    cases = []
    m = copy_measurement(noisy, tmp_path / "missing-layer")
    layer_file(m, O_PROJ).unlink()
    cases.append((m, "missing layer"))
    m = copy_measurement(noisy, tmp_path / "unlisted-layer")
    meta = json.loads((m / rb.MEASUREMENT_NAME).read_text())
    meta["layers"] = [e for e in meta["layers"] if e["name"] != O_PROJ]
    (m / rb.MEASUREMENT_NAME).write_text(json.dumps(meta))
    cases.append((m, "missing layer"))
    for key, value, message in [
        ("units", {"conductance": "S"}, "wrong units"),
        ("seconds", None, "seconds must be"),
        ("format_version", 2, "format_version"),
        ("target", "photonic", "does not match the map"),
        ("map_sha256", "0" * 64, "names another map"),
    ]:
        m = copy_measurement(noisy, tmp_path / key)
        meta = json.loads((m / rb.MEASUREMENT_NAME).read_text())
        meta[key] = value
        (m / rb.MEASUREMENT_NAME).write_text(json.dumps(meta))
        cases.append((m, message))
    m = copy_measurement(noisy, tmp_path / "tampered")
    data = bytearray(layer_file(m, Q_PROJ).read_bytes())
    data[-1] ^= 1
    layer_file(m, Q_PROJ).write_bytes(bytes(data))
    cases.append((m, "checksum mismatch"))
    for measured, message in cases:
        with pytest.raises(rb.MeasurementError, match=message) as err:
            rb.load_measured(path, measured)
        assert "\n" not in str(err.value), measured.name
    with pytest.raises(FileNotFoundError, match="no such measurement folder"):
        rb.load_measured(path, tmp_path / "nowhere")


def test_bad_photonic_measurement_units(tmp_path):
    _, path = exported(tmp_path, "photonic")
    good = rb.simulate_measurement(path, tmp_path / "good", reads=8)
    name = load_map(path).manifest["layers"][0]["name"]
    for case, change, message in [
        ("degrees", lambda a: {**a, "u_theta": a["u_theta"] * 180 / math.pi}, "radians"),
        ("percent", lambda a: {**a, "sigma": a["sigma"] * 100}, "sigma outside"),
    ]:
        measured = copy_measurement(good, tmp_path / case)
        rewrite_measured(measured, name, change(load_file(str(layer_file(measured, name)))))
        with pytest.raises(rb.MeasurementError, match=message):
            rb.load_measured(path, measured)
    model, _ = rb.readback_model(path, good)  # phase-estimation noise of 8 reads: still the chip
    assert max(rb.deviation(model, load_map(path)).values()) < 0.2


# ----- the command line -----------------------------------------------------------------------------------
def test_cli_loop_and_clean_failures(pcm, tmp_path, capsys):
    _, map_src, _, noisy = pcm
    path = copy_measurement(map_src, tmp_path / "map")
    measured = tmp_path / "measured"
    assert main(["measure", str(path), "--seconds", "86400", "--reads", "8", "--out", str(measured)]) == 0
    assert "measured at t = 86400 s (8 reads per device)" in capsys.readouterr().out

    out = tmp_path / "out"
    argv = ["readback", str(path), str(measured), "--quiet", "--out", str(out), "--name", "day1-{mode}",
            "--set", "train.modes=[backprop, physics-aware]", "--set", "train.steps=3", "--set", "data.eval_blocks=2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "read-back chip" in text and "chip + LoRA (physics-aware)" in text
    results = json.loads((out / "readback-results.json").read_text())
    assert results["measurement_sha256"] == rb.load_measured(path, measured).digest and len(results["modes"]) == 2
    for mode in ("backprop", "physics-aware"):
        assert (out / "adapters" / f"day1-{mode}" / "adapter_config.json").is_file()
    # distillation from the map's own targets (the model in digital mode): a KL, far below the CE above
    kd_out = tmp_path / "kd"
    assert main(["readback", str(path), str(measured), "--quiet", "--out", str(kd_out), "--set", "train.steps=2",
                 "--set", "train.modes=[backprop]", "--set", "data.eval_blocks=2", "--set", "train.distill.enabled=true"]) == 0
    capsys.readouterr()
    kd = json.loads((kd_out / "readback-results.json").read_text())["modes"][0]["first_loss"]
    assert 0 < kd < 0.1 * results["modes"][0]["first_loss"], (kd, results["modes"][0]["first_loss"])

    # bad input: exit 2, one line naming what was wrong, nothing written
    bad = copy_measurement(measured, tmp_path / "bad")
    arrays = load_file(str(layer_file(bad, Q_PROJ)))
    arrays["g_plus"][0, 0, 0] = math.nan
    rewrite_measured(bad, Q_PROJ, arrays)
    fresh_out = tmp_path / "fresh-out"
    failures = [
        (["readback", str(path), str(bad), "--out", str(fresh_out)], "non-finite"),
        (["readback", str(path), str(measured), "--out", str(fresh_out), "--set", "chip.seed=1"], "from the measurement"),
        (["readback", str(path), str(measured), "--out", str(fresh_out), "--name", "same",
          "--set", "train.modes=[backprop, zeroth-order]"], "put '{mode}' in the name"),
        (["measure", str(path), "--out", str(path / "layers")], "is not a measurement"),
        (["measure", str(path), "--out", str(tmp_path / "m2"), "--seconds", "-1"], "seconds must be >= 0"),
    ]
    for argv, message in failures:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and err.startswith("analogllm "), err
    assert not fresh_out.exists() and not (tmp_path / "m2").exists()
    assert load_map(path) and len(list((path / "layers").iterdir())) == len(load_map(path).layers)


def test_failed_measurement_leaves_no_partial_output(pcm, tmp_path, monkeypatch):
    _, path, _, _ = pcm
    from analogllm.export import crossbar

    calls = []
    real = crossbar.simulate_measurement

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(crossbar, "simulate_measurement", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        rb.simulate_measurement(path, tmp_path / "measured", reads=4)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
