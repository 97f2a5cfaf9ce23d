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


def _clamped_normal(mu, s):
    """Mean and variance of max(Y, 0), Y ~ N(mu, s²) (closed form)."""
    a = mu / s
    pdf, cdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(a / math.sqrt(2)))
    m1 = mu * cdf + s * pdf
    m2 = (mu * mu + s * s) * cdf + mu * s * pdf
    return m1, m2 - m1 * m1


@pytest.mark.parametrize("x", [0.2, 0.5, 0.9])
def test_pcm_programming_noise_std_matches_profile(x):
    # aihwkit PCMLikeNoiseModel: σ(x) = 0.26348 + 1.9650x − 1.1731x² µS on BOTH devices, clamped at 0 µS;
    # the idle G− (x = 0) adds its clamped σ(0) noise. 262,144 pairs: std SE ≈ 0.14 %, tolerance 3 %.
    pcm = al.AnalogConfig.from_profile("pcm").device
    w = torch.full((4, 256, 256), x)
    real = pcm.realise(w, 0.0, gen())
    sigma = lambda v: 0.26348 + 1.9650 * v - 1.1731 * v**2  # noqa: E731
    _, var_on = _clamped_normal(25.0 * x, sigma(x))
    _, var_idle = _clamped_normal(0.0, sigma(0.0))
    stated = math.sqrt(var_on + var_idle) / 25.0
    assert (real.weight - w).std().item() == pytest.approx(stated, rel=0.03)
    # negative weights live on the G− device and get the same noise
    neg = pcm.realise(-w, 0.0, gen(1))
    assert (neg.weight + w).std().item() == pytest.approx(stated, rel=0.03)


def _folded(mu, s):
    """Mean and std of |Y|, Y ~ N(mu, s²)."""
    a = mu / s
    mean = s * math.sqrt(2 / math.pi) * math.exp(-a * a / 2) + mu * math.erf(a / math.sqrt(2))
    return mean, math.sqrt(mu * mu + s * s - mean * mean)


def test_pcm_drift_follows_power_law_with_device_spread():
    pcm = PCM(prog_noise_scale=0.0)
    w = torch.full((1, 128, 128), 1.0)  # 16,384 devices: ν mean SE 0.1 %, std SE 0.6 %
    g0 = pcm.realise(w, 0.0, gen()).weight
    times = [3600.0, 86400.0, 3.15e7]
    nus = []
    for t in times:
        ratio = pcm.realise(w, t, gen()).weight / g0
        nus.append(-torch.log(ratio) / math.log((t + pcm.drift_t0) / pcm.drift_t0))
    # the same device keeps the same exponent at every time: a power law, not noise
    assert torch.allclose(nus[0], nus[1], atol=1e-5) and torch.allclose(nus[1], nus[2], atol=1e-5)
    mean, std = _folded(0.049, 0.008)  # μν clipped at 0.049 and σν at 0.008 for x = 1, ν = |N(μν, σν)|
    assert nus[0].mean().item() == pytest.approx(mean, rel=0.03)
    assert nus[0].std().item() == pytest.approx(std, rel=0.03)
    day = (pcm.realise(w, 86400.0, gen()).weight / g0).median().item()
    assert day == pytest.approx((86420 / 20) ** -0.049, rel=0.01)  # ≈ 0.66 after one day


def test_pcm_read_noise_grows_with_time():
    # σ_read = |G(t)|·Q_s(x_T)·√ln((t + t0 + t_read)/(2 t_read)), Q_s(1) = 0.0088: ≈ 3.7 % of G after 1 h
    pcm = PCM(prog_noise_scale=0.0)
    w = torch.full((1, 64, 64), 1.0)
    early = pcm.realise(w, 0.0, gen())
    late = pcm.realise(w, 3600.0, gen())
    for real, t in ((early, 0.0), (late, 3600.0)):
        stated = 0.0088 * math.sqrt(math.log((t + 20.0 + 250e-9) / (2 * 250e-9)))
        assert torch.allclose(real.read_std / real.weight, torch.full_like(w, stated), rtol=1e-5)
    assert (late.read_std / late.weight).mean() > (early.read_std / early.weight).mean()


def _layer(cfg, seed=0):
    torch.manual_seed(0)
    layer = AnalogLinear(256, 128, config=cfg)
    layer.eval()
    return layer


def test_drift_compensation_restores_mean_output_scale():
    # conductance drift alone: the IR drop's bias on the ±1 calibration read is checked in test_readside.py;
    # the measured correction (which cancels drift too) off
    cfg = al.AnalogConfig.from_profile("pcm", **{"dac.bits": None, "adc.bits": None, "output.noise": 0.0,
                                                 "device.read_noise_scale": 0.0, "tiling.rows": None,
                                                 "ir_drop.wire_resistance": 0.0, "mapping.correction_rank": 0})
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
    quiet = RRAM(levels=16, prog_noise_scale=0.0, read_noise=0.0, stuck_low=0.0, stuck_high=0.0)
    w = torch.rand(2, 64, 64) * 2 - 1
    real = quiet.realise(w, 0.0, gen())
    levels = torch.unique(torch.round(real.weight.abs() * 15, decimals=4))
    assert len(levels) <= 16 and torch.allclose(levels, torch.round(levels))
    assert (real.weight - w).abs().max() <= 0.5 / 15 + 1e-6  # within half a level
    noisy = RRAM(levels=1000, read_noise=0.0, stuck_low=0.0, stuck_high=0.0)
    x = torch.full((4, 128, 128), 0.307)  # 65,536 pairs
    err = (noisy.realise(x, 0.0, gen()).weight - x).std().item()
    # Wan et al. 2022 (aihwkit ReRamWan2022): 2.300 µS at x = 0.307 of 40 µS, plus the idle device's
    # clamped 0.348 µS
    stated = math.sqrt(2.300**2 + 0.348**2 * (0.5 - 1 / (2 * math.pi))) / 40.0
    assert err == pytest.approx(stated, rel=0.03)


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
    # balanced edges: uniform insertion loss is one scale per mesh, which the calibration removes
    assert ((lossy.weight * lossy.gain - w).norm() / w.norm()).item() < 1e-6


@pytest.mark.parametrize("profile", ["pcm", "rram", "photonic"])
def test_same_seed_same_chip_different_seed_different_chip(profile):
    cfg = al.AnalogConfig.from_profile(profile, **{"tiling.rows": 64})
    layer = _layer(cfg)
    a = layer.analog.program(layer.weight, seed=1).tiles.clone()
    b = layer.analog.program(layer.weight, seed=1).tiles.clone()
    c = layer.analog.program(layer.weight, seed=2).tiles.clone()
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


@pytest.mark.parametrize("seconds,shape", [(0.0, (3, 64, 128)), (86400.0, (3, 64, 128)), (3.15e7, (3, 64, 128)),
                                           (86400.0, (3, 700, 1001)), (0.0, (2, 1024, 1024))])
def test_pcm_realises_device_by_device_exactly_as_its_pair_state(seconds, shape):
    """PCM programs a layer one device at a time, a block of noise streams at once (bounded memory;
    the larger shapes span several blocks, the last one partial); the chip must be the one its full
    pair state describes, bit for bit, with the same draws (ν is drawn at t = 0 as well); the read
    noise's power law may differ in its last bit where a block edge moves the vectorised loop's tail."""
    from analogllm.chip.state import chip_generator

    dev = al.AnalogConfig.from_profile("pcm").device
    w = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s = dev.pair_state(w, seconds, chip_generator(0, 1))
    real = dev.realise(w, seconds, chip_generator(0, 1))
    assert torch.equal(real.weight, (s.g_plus - s.g_minus) / dev.g_max)
    torch.testing.assert_close(real.read_std, s.read_std, rtol=2e-7, atol=0)
    if seconds > 0:
        assert torch.equal(real.reference, (s.ref_plus - s.ref_minus) / dev.g_max)
    else:
        assert real.reference is None
    mine = w.clone()  # a caller done with its weight lets the device write the chip over it: the same chip
    consumed = dev.realise_consuming(mine, seconds, chip_generator(0, 1))
    assert consumed.weight.data_ptr() == mine.data_ptr() and torch.equal(consumed.weight, real.weight)
    assert torch.equal(consumed.read_std, real.read_std)


def test_statistics_table_interpolates_linearly_with_its_slope_as_gradient():
    # the table is looked up on every HWA step (device noise) with a gradient through |w|: values are the
    # linear interpolation between grid points, the gradient is the segment's slope (0 where |w| is clipped)
    from analogllm.chip.statistics import Table

    values = torch.rand(65, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    table = Table(values)
    a = torch.linspace(-0.1, 1.1, 1001, dtype=torch.float64, requires_grad=True)
    got = table.lookup(a)
    pos = a.detach().clamp(0, 1) * 64
    lo = pos.floor().long().clamp(max=63)
    f = pos - lo
    assert torch.allclose(got, values[lo] * (1 - f) + values[lo + 1] * f, atol=1e-12)
    assert torch.allclose(table.lookup(torch.linspace(0, 1, 65, dtype=torch.float64)), values, atol=1e-12)
    got.sum().backward()
    inside = (a.detach() > 0) & (a.detach() < 1)
    slope = (values[lo + 1] - values[lo]) * 64
    assert torch.allclose(a.grad[inside], slope[inside], atol=1e-9) and torch.all(a.grad[~inside] == 0)


def test_lazy_tiles_are_the_normalised_tiles_bit_for_bit_in_any_range():
    # the drift calibration reads the tiles a range at a time: every range, crossing tile rows, tiles,
    # experts and the zero padding of the last tile (and a tile of padding only), is the whole tiles' flat
    # values exactly, and the scales are the same
    from analogllm.chip.state import LazyTiles, normalised_tiles

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 7, 23, generator=g)
    w[0, 3, 5:10] = 0  # a tile row of zeros: scale at its floor
    for tiles, rows in ((3, 10), (4, 8)):  # 4 × 8 = 32 > 23 + 8: the last tile holds padding only
        whole, scale = normalised_tiles(w, tiles, rows)
        lazy = LazyTiles(w, tiles, rows)
        flat = whole.reshape(-1)
        assert lazy.numel() == flat.numel() and torch.equal(lazy.scale, scale)
        for start in range(0, flat.numel(), 7):
            for stop in (start + 1, start + 13, start + 61, flat.numel() + 5):
                assert torch.equal(lazy[start:stop], flat[start:stop])


@pytest.mark.parametrize("rows, extra", [(512, {}), (400, {"ir_drop.wire_resistance": 0.35, "adc.gain_std": 0.02,
                                                                "adc.offset_std": 0.5})])
def test_gain_calibrated_block_by_block_is_the_realised_chips_gain(rows, extra):
    # an exported map's record needs only the gain: calibrated from the device's blocks (more than one
    # device block, rows that split across blocks, IR drop and ADC errors in the calibration read),
    # it is the gain of the chip realised whole, and another seed or time gives another gain
    from analogllm.chip.state import calibrated_gain, realise
    from analogllm.devices.pcm import _BLOCK

    cfg = al.AnalogConfig.from_profile("pcm", **{"tiling.rows": rows, **extra})
    w = torch.randn(700, 1536, generator=torch.Generator().manual_seed(0))
    tiles = math.ceil(1536 / rows)
    rows = math.ceil(1536 / tiles)
    assert w.numel() > _BLOCK and (_BLOCK % rows != 0) == bool(extra)  # 384 rows: a block ends inside a row
    day = 86400.0
    whole = realise(cfg, w, tiles, rows, 3, 77, day).compensation  # gain × pulse factor
    blocks = calibrated_gain(cfg, w, tiles, rows, 3, 77, day)
    assert torch.allclose(blocks, whole, rtol=1e-6) and whole.item() > 1.05  # drift compensated
    assert not torch.allclose(calibrated_gain(cfg, w, tiles, rows, 4, 77, day), whole, rtol=1e-5)
    assert calibrated_gain(cfg, w, tiles, rows, 3, 77, 0.0).item() == realise(cfg, w, tiles, rows, 3, 77, 0.0).gain.item() == 1.0
