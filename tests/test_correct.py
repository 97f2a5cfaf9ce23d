"""Measured low-rank correction (analogllm.chip.correct): the weighted truncated SVD is the best rank-k
correction, the Wiener shrinkage keeps the read's noise out, the correction cancels drift error on inputs
the layer never saw, and the chip's data path adds exactly what ``realised_weight`` reports."""

import copy

import pytest
import torch
from torch import nn

import analogllm as al
from analogllm.chip.compensate import InputMoment
from analogllm.chip.correct import correction_macs, low_rank, top_svd
from analogllm.config import ConfigError

YEAR = 365 * 86400.0


def _inputs(n_in: int, rows: int, seed: int) -> torch.Tensor:
    """Correlated activations as an LLM's are: a few strong directions over an isotropic floor."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(n_in, 12, generator=torch.Generator().manual_seed(99))
    return torch.randn(rows, 12, generator=g) @ basis.T + 0.3 * torch.randn(rows, n_in, generator=g)


def _layer(**overrides) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 256, bias=False))
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", **overrides))
    layer = model[0]
    layer.analog.set_moment(64).fit_(_inputs(384, 2048, seed=1))
    return layer


def _error(layer: nn.Linear, x: torch.Tensor, rank: int, seconds: float, seed: int) -> float:
    """Relative output error of chip ``seed`` at ``seconds`` on inputs ``x``, correction included."""
    layer.analog.config = layer.analog.config.set("mapping.correction_rank", rank)
    layer.analog.program(layer.weight, seed=seed, seconds=seconds)
    w = layer.weight.detach()
    return float(((layer.analog.realised_weight(w) - w) @ x.T).norm() / (w @ x.T).norm())


def _mean_error(layer: nn.Linear, x: torch.Tensor, rank: int, seconds: float) -> float:
    return sum(_error(layer, x, rank, seconds, s) for s in range(3)) / 3


def test_the_weighted_truncated_svd_is_the_best_rank_k_correction():
    g = torch.Generator().manual_seed(0)
    error = torch.randn(48, 40, generator=g)
    x = _inputs(40, 4000, seed=3)[:, :40]
    chol = torch.linalg.cholesky(x.T @ x / x.shape[0])
    a, b = low_rank(error, None, chol, 40, g)  # full rank, no noise: the error itself
    assert torch.allclose(b @ a, error, atol=1e-4)
    a, b = low_rank(error, None, chol, 6, g)
    s = torch.linalg.svdvals(error @ chol)
    left = ((error - b @ a) @ chol).norm()
    assert left == pytest.approx(float(s[6:].norm()), rel=1e-4)  # Eckart–Young in the inputs' metric
    ua, ub = low_rank(error, None, None, 6, g)  # the plain SVD leaves more error on these inputs
    assert float(((error - ub @ ua) @ chol).norm()) > 1.3 * float(left)  # measured 1.81×


def test_the_randomised_svd_finds_the_leading_directions():
    g = torch.Generator().manual_seed(2)
    left, _ = torch.linalg.qr(torch.randn(300, 200, generator=g))
    right, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    m = left * 0.85 ** torch.arange(200.0) @ right.T  # a decaying spectrum, as a weighted drift error has
    u, s, vh = top_svd(m, 12, g)
    assert torch.allclose(s, 0.85 ** torch.arange(12.0), rtol=1e-4)
    assert torch.allclose(u * s @ vh, left[:, :12] * s @ right[:, :12].T, atol=1e-4)
    state = torch.get_rng_state()
    first, second = (top_svd(m, 12, torch.Generator().manual_seed(7)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # a chip is a function of its seed
    assert torch.equal(torch.get_rng_state(), state)  # and the global RNG is left alone


def test_wiener_shrinkage_keeps_a_pure_noise_measurement_out():
    g = torch.Generator().manual_seed(1)
    chol = torch.linalg.cholesky(torch.cov(_inputs(64, 2000, seed=4).T) + 0.1 * torch.eye(64))
    measured, twin = torch.randn(80, 64, generator=g), torch.randn(80, 64, generator=g)  # nothing but noise
    a, b = low_rank(measured, twin, chol, 16, g)
    ta, tb = low_rank(measured, None, chol, 16, g)
    # what the correction would add on these inputs: measured 0.05 of what trusting the read adds
    assert float((b @ a @ chol).norm()) < 0.15 * float((tb @ ta @ chol).norm())


def test_correction_cancels_drift_error_on_unseen_inputs():
    layer = _layer(**{"device.read_noise_scale": 0.0})  # an exact read: the correction's ceiling
    unseen = _inputs(384, 2048, seed=2)
    before, after = _mean_error(layer, unseen, 0, YEAR), _mean_error(layer, unseen, 16, YEAR)
    # measured: 0.121 → 0.011 at one year (the drift spread along the 12 strong directions)
    assert after < 0.2 * before


def test_one_noisy_read_still_corrects_drift_and_helps_at_t0():
    layer = _layer()
    unseen = _inputs(384, 2048, seed=2)
    before, after = _mean_error(layer, unseen, 0, YEAR), _mean_error(layer, unseen, 16, YEAR)
    fresh, fresh_corrected = _mean_error(layer, unseen, 0, 0.0), _mean_error(layer, unseen, 16, 0.0)
    # measured: 0.127 → 0.060 at one year; 0.041 → 0.032 right after closed-loop programming
    assert after < 0.6 * before
    assert fresh_corrected < fresh


def test_the_chip_adds_the_correction_realised_weight_reports():
    layer = _layer(**{"device.read_noise_scale": 0.0, "output.noise": 0.0, "dac.bits": None, "adc.bits": None,
                      "mapping.correction_rank": 8})
    layer.analog.program(layer.weight, seed=0, seconds=86400.0)
    chip = layer.analog.chip
    assert chip.correct_in.shape == (1, 8, 384) and chip.correct_out.shape == (1, 256, 8)
    x = _inputs(384, 64, seed=5)
    with torch.no_grad():
        out = layer(x)
    expected = x @ layer.analog.realised_weight(layer.weight).T
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    moved = copy.deepcopy(layer).to(torch.float64)  # the correction is chip state: it moves with it
    assert moved.analog.chip.correct_in.dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(moved(x.double()).float(), out, rtol=1e-4, atol=1e-4 * float(out.abs().max()))


def test_the_correction_is_measured_again_at_every_age():
    layer = _layer(**{"mapping.correction_rank": 8})
    layer.analog.program(layer.weight, seed=0, seconds=3600.0)
    hour = layer.analog.chip.correct_out.clone()
    layer.analog.program(layer.weight, seed=0, seconds=YEAR)
    year = layer.analog.chip.correct_out
    assert year.norm() > 2 * hour.norm()  # drift grows, so does what the chip cancels (measured 2.75×)
    layer.analog.program(layer.weight, seed=0, seconds=3600.0)
    assert torch.equal(layer.analog.chip.correct_out, hour)  # a chip is a function of (seed, age)


def test_correction_settings_are_checked_and_costed():
    with pytest.raises(ConfigError, match="mapping.correction_rank"):
        al.AnalogConfig.from_profile("pcm", **{"mapping.correction_rank": -1})
    with pytest.raises(ConfigError, match="mapping.correction_reads"):
        al.AnalogConfig.from_profile("pcm", **{"mapping.correction_reads": 0})
    assert correction_macs(32, 576, 1536) == 32 * 2112
    assert correction_macs(64, 48, 16) == 16 * 64  # capped at the matrix's own rank, as the correction is
    layer = _layer(**{"mapping.correction_rank": 0})
    layer.analog.program(layer.weight, seed=0, seconds=0.0)
    assert layer.analog.chip.correct_in is None  # rank 0: off
    moment = InputMoment(8, 2).fit_(torch.randn(40, 8))
    chol = moment.cholesky().double()
    h = moment.matrix()
    assert torch.allclose(chol @ chol.T, h + 0.01 * h.diagonal().mean() * torch.eye(8), atol=1e-5)


def test_an_exported_map_replays_the_models_correction_and_a_read_back_chip_measures_its_own(tmp_path):
    from analogllm.data import token_blocks
    from analogllm.export import readback as rb
    from analogllm.export.manifest import analog_layers
    from analogllm.hf.models import load_model

    model, tok = load_model("tiny-llama")
    calib = token_blocks(tok, split="train", block_size=64, max_blocks=4)
    config = al.AnalogConfig.from_profile("pcm", **{"tiling.rows": 48, "mapping.correction_rank": 4})
    al.analogize_(model, config, calibration=calib)  # closed loop: the map holds targets, not the weights
    al.program_(model, seed=4, seconds=86400.0)
    path = al.export_map(model, tmp_path / "map", source="tiny-llama", progress=False)
    report = al.verify_map(path, model, tok, max_blocks=2)
    assert report.passed and report.logit_error == 0.0, report.summary()
    measured = rb.simulate_measurement(path, tmp_path / "measured", reads=None)
    twin, _ = rb.readback_model(path, measured)
    ratios = []
    for layer in analog_layers(twin):
        chip = layer.matrix.chip
        assert chip.read_back is not None and chip.correct_in is not None
        corrected = layer.matrix.realised_weight(layer.weight)
        arrays = corrected - chip.correct_out[0] @ chip.correct_in[0]
        want = layer.weight.detach()  # the map's targets: a map does not hold the model's weights
        ratios.append(float((corrected - want).norm() / (arrays - want).norm()))
    # rank 4 of a 64-row layer's drift error, plain metric (the rebuilt model has no input moments): the
    # read-back chips' corrections took 7–14 % off it, layer by layer
    assert max(ratios) < 0.96


def test_the_cost_model_counts_the_correction():
    from analogllm.cost.counts import workload_from_model
    from analogllm.hf.models import load_model

    totals = {}
    for rank in (0, 4):
        model, _ = load_model("tiny-llama")
        al.analogize_(model, al.AnalogConfig.from_profile("pcm", **{"mapping.correction_rank": rank}))
        totals[rank] = workload_from_model(model).totals()["digital_macs"]
    shapes = [w.shape for _, _, w in al.analog_matrices(model)]
    assert totals[4] - totals[0] == sum(4 * (out + inp) for out, inp in shapes)
