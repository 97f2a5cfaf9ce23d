"""Closed-loop programming (analogllm.chip.compensate): the device's programming model is the chip's, the
compensation cancels programming error on the inputs a layer sees, and the compensated chip survives a
checkpoint and an exported map."""

import pytest
import torch
from torch import nn

import analogllm as al
from analogllm.chip.compensate import InputMoment
from analogllm.chip.state import chip_generator
from analogllm.devices.pcm import PCM
from analogllm.devices.rram import RRAM
from analogllm.ops.noise import STREAM


def _inputs(n_in: int, rows: int, seed: int) -> torch.Tensor:
    """Correlated activations as an LLM's are: a few strong directions over an isotropic floor."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(n_in, 12, generator=torch.Generator().manual_seed(99))
    return torch.randn(rows, 12, generator=g) @ basis.T + 0.3 * torch.randn(rows, n_in, generator=g)


def _layer(profile: str = "pcm", **overrides) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 256, bias=False))
    al.analogize_(model, al.AnalogConfig.from_profile(profile, **overrides))
    return model[0]


def _output_error(layer: nn.Linear, x: torch.Tensor, moment: InputMoment | None, seed: int = 3) -> float:
    layer.analog.moment = moment
    layer.analog.program(layer.weight, seed=seed, seconds=0.0)
    w = layer.weight.detach()
    real = layer.analog.realised_weight(w)
    return float(((real - w) @ x.T).norm() / (w @ x.T).norm())


@pytest.mark.parametrize("pairs", [1, 2])
@pytest.mark.parametrize("numel", [3 * 97 * 64, 2 * STREAM + 12345])  # one generator / several streams
def test_pcm_programming_model_is_the_realised_chip(numel, pairs):
    pcm = PCM(pairs=pairs)
    w = torch.rand(numel) * 2 - 1
    draws = pcm.programming_draws(numel, chip_generator(5, 77))
    assert len(draws) == 2 * pairs
    held, expected, prog_var, read_var = pcm.programmed(w, draws)
    assert torch.equal(expected, w)  # continuous targets
    real = pcm.realise(w, 0.0, chip_generator(5, 77))
    assert torch.equal(held, real.weight)  # summed in the realisation's order: the very chip
    # the variances are the device model's: both devices' programming noise, both devices' read noise,
    # of the mean of n pairs
    g_plus, g_minus = w.clamp(min=0) * pcm.g_max, (-w).clamp(min=0) * pcm.g_max
    expected = (pcm.prog_std(g_plus).square() + pcm.prog_std(g_minus).square()) / (pairs * pcm.g_max**2)
    assert torch.allclose(prog_var, expected, rtol=1e-5)
    assert torch.allclose(read_var.sqrt(), real.read_std, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("d2d", [0.0, 0.05])
def test_rram_programming_model_is_the_realised_chip(d2d):
    rram = RRAM(d2d_std=d2d)
    w = torch.rand(4 * 64 * 48) * 2 - 1
    held, levels, prog_var, read_var = rram.programmed(w, rram.programming_draws(w.numel(), chip_generator(2, 9)))
    real = rram.realise(w, 0.0, chip_generator(2, 9))
    assert torch.allclose(held, real.weight, atol=1e-6)
    step = 1 / (rram.levels - 1)
    assert torch.allclose(levels / step, (levels / step).round(), atol=1e-4)  # the level grid
    assert torch.allclose(read_var, torch.full_like(w, rram.read_noise**2))


def test_pcm_with_stuck_devices_stays_open_loop():
    assert PCM(stuck_low=0.01).programming_draws(100, torch.Generator()) is None
    assert RRAM(stuck_high=0.01).programming_draws(100, torch.Generator()) is None
    assert not PCM(stuck_low=0.01).closed_loop and not RRAM(stuck_high=0.01).closed_loop
    assert PCM().closed_loop and RRAM().closed_loop
    assert not al.AnalogConfig.from_profile("ideal").device.closed_loop
    assert not al.AnalogConfig.from_profile("photonic").device.closed_loop


@pytest.mark.parametrize("profile,no_read_noise", [("pcm", {"device.read_noise_scale": 0.0}),
                                                   ("rram", {"device.read_noise": 0.0})])
def test_closed_loop_programming_cancels_programming_error_on_unseen_inputs(profile, no_read_noise):
    layer = _layer(profile, **no_read_noise)  # verify reads exact: the compensation's ceiling
    fit, unseen = _inputs(384, 2048, seed=1), _inputs(384, 2048, seed=2)
    moment = InputMoment(384, 64).fit_(fit)
    open_loop = sum(_output_error(layer, unseen, None, s) for s in range(3)) / 3
    closed = sum(_output_error(layer, unseen, moment, s) for s in range(3)) / 3
    # measured: pcm 0.064 open loop, 0.013 closed loop (same draws of programming noise); rram, whose
    # levels' rounding is cancelled too, 0.081 and 0.016
    assert closed < 0.35 * open_loop


def test_two_pairs_per_weight_cut_a_layers_error_by_root_two_open_and_closed_loop():
    fit, unseen = _inputs(384, 2048, seed=1), _inputs(384, 2048, seed=2)
    moment = InputMoment(384, 64).fit_(fit)
    err = {(n, m is None): sum(_output_error(_layer(**{"device.pairs": n}), unseen, m, s) for s in range(3)) / 3
           for n in (1, 2) for m in (None, moment)}
    # measured: 0.064 → 0.045 open loop (the idle devices' clamp bias is a mean: it does not average
    # away), and closed loop, which cancels what a noisy verify read lets it see, 0.041 → 0.029
    for open_loop in (True, False):
        assert 0.6 < err[2, open_loop] / err[1, open_loop] < 0.8, err


def test_noisy_verify_reads_still_help_and_shrinkage_beats_trusting_them():
    layer = _layer()
    fit, unseen = _inputs(384, 2048, seed=1), _inputs(384, 2048, seed=2)
    moment = InputMoment(384, 64).fit_(fit)
    open_loop = sum(_output_error(layer, unseen, None, s) for s in range(3)) / 3
    one_read = sum(_output_error(layer, unseen, moment, s) for s in range(3)) / 3
    layer.analog.config = layer.analog.config.set("mapping.verify_reads", 16)
    averaged = sum(_output_error(layer, unseen, moment, s) for s in range(3)) / 3
    # measured: 0.062 open loop, 0.040 with one verify read, less with 16
    assert one_read < 0.8 * open_loop
    assert averaged < one_read


def test_the_moment_is_low_rank_plus_diagonal_and_exact_at_full_rank():
    x = _inputs(48, 500, seed=0)
    h = (x.double().T @ x.double()) / 500
    full = InputMoment(48, 48).fit_(x)
    assert torch.allclose(full.matrix(), h, atol=1e-4 * h.diagonal().max().item())
    low = InputMoment(48, 8).fit_(x)
    assert torch.allclose(low.matrix().diagonal(), h.diagonal(), rtol=1e-4)  # the diagonal is kept whole
    assert low.factor.shape == (48, 8)


def test_the_moment_from_fewer_rows_than_inputs_is_the_leading_eigenspace():
    # an MLP down projection's sample (768 rows × 1536 inputs) is decomposed through the smaller X·Xᵀ
    x = _inputs(96, 40, seed=1)
    h = (x.double().T @ x.double()) / 40
    lam, vec = torch.linalg.eigh(h)
    top = (vec[:, -8:] * lam[-8:].sqrt()) @ (vec[:, -8:] * lam[-8:].sqrt()).T
    low = InputMoment(96, 8).fit_(x)
    f = low.factor.double()
    assert torch.allclose(f @ f.T, top, atol=1e-5 * h.diagonal().max().item())
    assert torch.allclose(low.matrix().diagonal(), h.diagonal(), rtol=1e-4)
    assert torch.allclose(InputMoment(96, 40).fit_(x).matrix(), h, atol=1e-5 * h.diagonal().max().item())


def test_mapping_fits_moments_on_pcm_and_not_on_the_ideal_profile():
    from analogllm.data import token_blocks
    from analogllm.hf.models import load_model

    model, tok = load_model("tiny-llama")
    calib = token_blocks(tok, split="train", block_size=64, max_blocks=4)
    ideal = al.analogize_(load_model("tiny-llama")[0], al.AnalogConfig.from_profile("ideal"), calibration=calib)
    assert not ideal.analog_report.mapping.compensated
    al.analogize_(model, al.AnalogConfig.from_profile("pcm"), calibration=calib)
    report = model.analog_report.mapping
    matrices = [m for m in model.modules() if isinstance(m, al.nn.matrix.AnalogMatrix)]
    assert len(report.compensated) == len(matrices) and all(m.moment is not None for m in matrices)
    assert "closed-loop programming" in report.summary()
    off = al.analogize_(load_model("tiny-llama")[0], al.AnalogConfig.from_profile("pcm", **{"mapping.compensate": False}),
                        calibration=calib)
    assert not off.analog_report.mapping.compensated


def test_config_rejects_bad_closed_loop_settings():
    with pytest.raises(al.ConfigError, match="mapping.verify_reads"):
        al.AnalogConfig.from_profile("pcm", **{"mapping.verify_reads": 0})
    with pytest.raises(al.ConfigError, match="mapping.compensate_rank"):
        al.AnalogConfig.from_profile("pcm", **{"mapping.compensate_rank": 0})


def test_an_exported_map_of_a_closed_loop_chip_holds_its_targets_and_replays_it(tmp_path):
    from analogllm.data import token_blocks
    from analogllm.hf.models import load_model

    model, tok = load_model("tiny-llama")
    calib = token_blocks(tok, split="train", block_size=64, max_blocks=4)
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", **{"tiling.rows": 48}), calibration=calib)
    al.program_(model, seed=4, seconds=3600.0)
    report = al.verify_map(al.export_map(model, tmp_path / "map", progress=False), model, tok, max_blocks=2)
    assert report.passed, report.summary()
    assert report.logit_error == 0.0 and all(c.chip_error == 0.0 and c.target_error < 1e-5 for c in report.layers)
    # what is programmed (and written) is the instance's closed-loop targets, not the nominal weights
    _, matrix, weight = next(al.analog_matrices(model))
    moved = matrix.target_weight(weight, 4)[0] - weight.detach()
    assert moved.abs().max() > 1e-3 * weight.abs().max()
