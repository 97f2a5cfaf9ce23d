"""Device physics: noise statistics, drift power law, levels and the photonic mesh, against the profiles."""

import math

import pytest
import torch

import analogllm as al
from analogllm.devices.pcm import PCM
from analogllm.devices.photonic import Photonic
from analogllm.devices.rram import RRAM
from analogllm.nn.linear import AnalogLinear


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("x", [0.2, 0.5, 0.9])
def test_pcm_programming_noise_std_matches_profile(x):
    pcm = al.AnalogConfig.from_profile("pcm").device
    w = torch.full((4, 256, 256), x)
    real = pcm.realise(w, 0.0, gen())
    measured = (real.weight - w).std().item()
    stated = (0.26348 + 1.9650 * x - 1.1731 * x**2) / 25.0  # the profile's σ_prog(x) in units of g_max
    assert measured == pytest.approx(stated, rel=0.10)
    # negative weights live on the G− device and get the same noise
    neg = pcm.realise(-w, 0.0, gen(1))
    assert (neg.weight + w).std().item() == pytest.approx(stated, rel=0.10)


def test_pcm_drift_follows_power_law_with_device_spread():
    pcm = PCM(prog_noise_scale=0.0)
    w = torch.full((1, 128, 128), 1.0)
    g0 = pcm.realise(w, 0.0, gen()).weight
    times = [3600.0, 86400.0, 3.15e7]
    nus = []
    for t in times:
        ratio = pcm.realise(w, t, gen()).weight / g0
        nus.append(-torch.log(ratio) / math.log((t + pcm.drift_t0) / pcm.drift_t0))
    # the same device keeps the same exponent at every time: a power law, not noise
    assert torch.allclose(nus[0], nus[1], atol=1e-5) and torch.allclose(nus[1], nus[2], atol=1e-5)
    assert nus[0].mean().item() == pytest.approx(0.049, abs=0.002)  # μν clipped at 0.049 for x = 1
    assert nus[0].std().item() == pytest.approx(0.008, rel=0.15)  # σν = 0.008 for x = 1
    day = (pcm.realise(w, 86400.0, gen()).weight / g0).median().item()
    assert day == pytest.approx((86420 / 20) ** -0.049, rel=0.01)  # ≈ 0.66 after one day


def test_pcm_read_noise_grows_with_time():
    pcm = al.AnalogConfig.from_profile("pcm").device
    w = torch.full((1, 64, 64), 1.0)
    early = pcm.realise(w, 0.0, gen()).read_std.mean()
    late = pcm.realise(w, 3600.0, gen()).read_std.mean()
    # ≈ 4 % of g at x = 1 after 1 h (physics.md), less once drift lowered the conductance
    assert 0.025 < late.item() * (0.77**-1) / math.sqrt(2) < 0.06
    assert early > 0


def _layer(cfg, seed=0):
    torch.manual_seed(0)
    layer = AnalogLinear(256, 128, config=cfg)
    layer.eval()
    return layer


def test_drift_compensation_restores_mean_output_scale():
    cfg = al.AnalogConfig.from_profile("pcm", **{"dac.bits": None, "adc.bits": None, "output.noise": 0.0,
                                                 "device.read_noise_scale": 0.0, "tiling.rows": None})
    x = torch.randn(64, 256)
    for compensation, low, high in [(True, 0.97, 1.03), (False, 0.4, 0.6)]:
        layer = _layer(cfg.set("drift.compensation", compensation))
        layer.analog.program(layer.weight, seed=3, seconds=0.0)
        y0 = layer(x) - layer.bias
        layer.analog.program(layer.weight, seed=3, seconds=3.15e7)  # one year
        y1 = layer(x) - layer.bias
        ratio = (y1.abs().mean() / y0.abs().mean()).item()
        assert low < ratio < high, (compensation, ratio)


def test_rram_levels_and_noise():
    quiet = RRAM(levels=16, prog_noise_us=(0.0, 0.0, 0.0), d2d_std=0.0, read_noise=0.0)
    w = torch.rand(2, 64, 64) * 2 - 1
    real = quiet.realise(w, 0.0, gen())
    levels = torch.unique(torch.round(real.weight.abs() * 15, decimals=4))
    assert len(levels) <= 16 and torch.allclose(levels, torch.round(levels))
    assert (real.weight - w).abs().max() <= 0.5 / 15 + 1e-6  # within half a level
    noisy = RRAM(levels=1000, d2d_std=0.0, read_noise=0.0)
    x = torch.full((4, 128, 128), 0.25)
    err = (noisy.realise(x, 0.0, gen()).weight - x).std().item()
    assert err == pytest.approx(2.3 / 40.0, rel=0.1)  # 2.3 µS at x = 0.25 of 40 µS


def test_photonic_mesh_reproduces_weight_without_noise():
    exact = Photonic(mesh_size=8, phase_bits=None, phase_noise=0.0, loss_db_per_mzi=0.0)
    w = torch.rand(3, 20, 13, dtype=torch.float64) * 2 - 1
    real = exact.realise(w, 0.0, gen())
    assert (real.weight - w).abs().max().item() < 1e-6
    errors = []
    for noise in (0.001, 0.01):
        dev = Photonic(mesh_size=8, phase_bits=None, phase_noise=noise, loss_db_per_mzi=0.0)
        errors.append(((dev.realise(w, 0.0, gen()).weight - w).norm() / w.norm()).item())
    assert 0 < errors[0] < errors[1]
    lossy = Photonic(mesh_size=8, phase_bits=None, phase_noise=0.0, loss_db_per_mzi=0.5).realise(w, 0.0, gen())
    assert lossy.gain > 1.0  # the electronic gain calibrated against the loss
    assert ((lossy.weight * lossy.gain - w).norm() / w.norm()).item() < 0.5


@pytest.mark.parametrize("profile", ["pcm", "rram", "photonic"])
def test_same_seed_same_chip_different_seed_different_chip(profile):
    cfg = al.AnalogConfig.from_profile(profile, **{"tiling.rows": 64})
    layer = _layer(cfg)
    a = layer.analog.program(layer.weight, seed=1).weight.clone()
    b = layer.analog.program(layer.weight, seed=1).weight.clone()
    c = layer.analog.program(layer.weight, seed=2).weight.clone()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_pcm_reference_is_the_same_instance_read_at_programming_time():
    # drift compensation calibrates against the instance at t = 0: the realisation at t carries it, and
    # it must be exactly what realising the same chip seed at t = 0 gives (one realisation, not two)
    dev = al.AnalogConfig.from_profile("pcm").device
    w = torch.rand(3, 40, 64) * 2 - 1
    later = dev.realise(w, 86400.0, torch.Generator().manual_seed(5))
    now = dev.realise(w, 0.0, torch.Generator().manual_seed(5))
    assert now.reference is None and later.reference is not None
    assert torch.equal(later.reference, now.weight)
    assert not torch.allclose(later.weight, now.weight)  # it drifted


def test_chip_noise_streams_do_not_depend_on_the_thread_count():
    # a saved chip seed must give the same chip on any machine: the parallel streams are cut by size only
    from analogllm.ops.noise import gaussian

    like = torch.empty(0)
    threads = torch.get_num_threads()
    draws = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            draws.append(gaussian((3, 700, 500), like, torch.Generator().manual_seed(11)).wait())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    z = draws[0].flatten()
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3  # 1.05M samples
    chunks = z.split(1 << 18)
    assert not torch.equal(chunks[0][:100], chunks[1][:100])  # streams are distinct
