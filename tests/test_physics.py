"""Device physics against the published formulas, written out here independently of the implementation.

Sources: aihwkit PCMLikeNoiseModel (Nandakumar et al. 2019; Joshi et al. 2020) and ReRamWan2022NoiseModel
(Wan et al., Nature 2022), both with the single-pair converter (both devices of a pair programmed,
conductances clamped at 0 µS). Statistical checks use 262,144 pairs per level (PCM) or 65,536 (RRAM,
drift exponents): the standard error of a std estimate is then 0.14 % / 0.28 %, so a 3 % tolerance sits
at more than 10 standard errors and still catches a 3 % bias. The PCM clamp bias (a mean of 0.105 µS
under ≈ 0.4 µS of noise) is checked on 1,048,576 pairs (standard error 0.37 %).
"""

from __future__ import annotations

import math

import pytest
import torch

from analogllm.devices import mesh
from analogllm.devices.conductance import stuck_devices
from analogllm.devices.pcm import PCM
from analogllm.devices.photonic import Photonic
from analogllm.devices.rram import RRAM

G_PCM, G_RRAM = 25.0, 40.0
T0, T_READ = 20.0, 250e-9
DAY = 86400.0


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- the formulas ---------------------------------------------------------------------------------------
def pcm_sigma(x: float) -> float:
    """σ_prog(x) µS at g_max 25 µS (Nandakumar et al. 2019)."""
    return 0.26348 + 1.9650 * x - 1.1731 * x * x


def pcm_nu(x: float) -> tuple[float, float]:
    """(μν, σν) of the drift exponent at target x, ln x floored at 1e-7."""
    lx = math.log(max(x, 1e-7))
    return min(max(-0.0155 * lx + 0.0244, 0.049), 0.1), min(max(-0.0125 * lx - 0.0059, 0.008), 0.045)


def pcm_qs(x: float) -> float:
    return min(0.0088 / max(x**0.65, 1e-3), 0.2)


def read_time_factor(t: float) -> float:
    """√ln((t + t0 + t_read)/(2 t_read)), t counted from programming."""
    return math.sqrt(math.log((t + T0 + T_READ) / (2 * T_READ)))


def rram_sigma(x: float, t: float) -> float:
    """σ(x) µS at 40 µS, Wan et al. 2022 as fitted in aihwkit, at the anchor times 1 s, 1 day, 2 days."""
    coeffs = {
        1.0: (0.348, 16.030, -43.853, 45.393, -16.815),
        DAY: (0.701, 22.086, -50.773, 47.095, -16.458),
        2 * DAY: (0.782, 20.274, -43.507, 37.062, -11.934),
    }[t]
    return sum(c * x**i for i, c in enumerate(coeffs))


def clamped(mu: float, s: float) -> tuple[float, float]:
    """Mean and variance of max(Y, 0), Y ~ N(mu, s²)."""
    a = mu / s
    pdf, cdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(a / math.sqrt(2)))
    m1 = mu * cdf + s * pdf
    return m1, (mu * mu + s * s) * cdf + mu * s * pdf - m1 * m1


def folded(mu: float, s: float) -> tuple[float, float]:
    """Mean and std of |Y|, Y ~ N(mu, s²)."""
    a = mu / s
    mean = s * math.sqrt(2 / math.pi) * math.exp(-a * a / 2) + mu * math.erf(a / math.sqrt(2))
    return mean, math.sqrt(mu * mu + s * s - mean * mean)


# ----- PCM ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x", [0.0, 0.05, 0.2, 0.5, 0.9, 1.0])
def test_pcm_programming_noise_on_both_devices(x):
    w = torch.full((16 if x == 0.05 else 4, 256, 256), x)
    real = PCM().realise(w, 0.0, gen(1))
    measured_g = real.weight.double() * G_PCM
    m_on, v_on = clamped(x * G_PCM, pcm_sigma(x))
    m_idle, v_idle = clamped(0.0, pcm_sigma(0.0))
    assert measured_g.std().item() == pytest.approx(math.sqrt(v_on + v_idle), rel=0.03)
    if x == 0:  # both devices idle: the pair keeps zero mean, σ ≈ 0.218 µS
        assert math.sqrt(2 * v_idle) == pytest.approx(0.2175, abs=5e-4)
        assert abs(measured_g.mean().item()) < 0.003
    elif x == 0.05:  # the idle G− pulls the weight towards 0 by its clamp bias, ≈ 0.105 µS
        bias = m_on - x * G_PCM - m_idle
        assert bias == pytest.approx(-0.1051, abs=5e-4)
        assert (measured_g.mean().item() - x * G_PCM) == pytest.approx(bias, rel=0.03)


@pytest.mark.parametrize("x", [0.001, 0.1, 0.3, 1.0])
def test_pcm_drift_exponent_mean_and_spread_vs_level(x):
    dev = PCM(prog_noise_scale=0.0)  # G(0) = target, so ν is read off the power law exactly
    w = torch.full((4, 128, 128), x)
    t = 3.15e7
    nu = -torch.log(dev.realise(w, t, gen(2)).weight.double() / x) / math.log((t + T0) / T0)
    mean, std = folded(*pcm_nu(x))
    assert nu.mean().item() == pytest.approx(mean, rel=0.03)
    assert nu.std().item() == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("x", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("t", [0.0, 3600.0, DAY, 3.15e7])
def test_pcm_read_noise_uses_the_target_conductance(x, t):
    # without programming noise G− = 0, so read_std = |G+(t)|·Q_s(x_T)·√ln(…) device by device; the
    # drifted conductance in Q_s would be +31 % (x = 1, 1 day) … +83 % (x = 0.1, 1 year) too high
    dev = PCM(prog_noise_scale=0.0)
    real = dev.realise(torch.full((1, 64, 64), x), t, gen(3))
    ratio = (real.read_std / real.weight).double()
    assert torch.allclose(ratio, torch.full_like(ratio, pcm_qs(x) * read_time_factor(t)), rtol=1e-5)


@pytest.mark.parametrize("t", [0.0, DAY])
def test_pcm_idle_devices_drift_and_are_read(t):
    # a zero weight: two idle devices, G_p = max(σ(0) z, 0), ν = |N(0.1, 0.045)| (clipped μν, σν), and
    # Q_s(0) = 0.2, so E[read_std²]·g_max² = 2·E[G_p²]·E[τ^(−2ν)]·0.04·ln(…) with E[G_p²] = σ(0)²/2
    real = PCM().realise(torch.zeros(4, 256, 256), t, gen(4))
    tau = (t + T0) / T0
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    pdf = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    nu = (0.1 + 0.045 * z).abs()
    drift2 = float((pdf * tau ** (-2 * nu)).sum() * (z[1] - z[0])) if t > 0 else 1.0
    stated = 2 * pcm_sigma(0.0) ** 2 / 2 * drift2 * 0.2**2 * read_time_factor(t) ** 2
    assert (real.read_std.double() ** 2 * G_PCM**2).mean().item() == pytest.approx(stated, rel=0.03)


@pytest.mark.parametrize("pairs", [2, 4])
@pytest.mark.parametrize("x", [0.05, 0.5])
def test_pcm_pairs_average_independent_devices(x, pairs):
    # n pairs in parallel, all aimed at x: the weight is their mean, so its programming spread is one
    # pair's over √n (the clamped-Gaussian formulas above) and its mean keeps the idle device's clamp bias
    w = torch.full((4, 256, 256), x)
    real = PCM(pairs=pairs).realise(w, 0.0, gen(11))
    g = real.weight.double() * G_PCM
    m_on, v_on = clamped(x * G_PCM, pcm_sigma(x))
    m_idle, v_idle = clamped(0.0, pcm_sigma(0.0))
    assert g.std().item() == pytest.approx(math.sqrt((v_on + v_idle) / pairs), rel=0.03)
    assert g.mean().item() == pytest.approx(m_on - m_idle, abs=0.01)
    # the read noise of the mean: without programming noise every device sits at its target at t = 0, so
    # the n pairs' reads are alike and the mean's std is one device's Q_s(x)·√ln(…) relative, over √n
    # (G− idle at exactly 0 µS, no read noise) ...
    quiet = PCM(pairs=pairs, prog_noise_scale=0.0).realise(torch.full((1, 64, 64), x), 0.0, gen(12))
    ratio = (quiet.read_std / quiet.weight).double()
    assert torch.allclose(ratio, torch.full_like(ratio, pcm_qs(x) * read_time_factor(0.0) / math.sqrt(pairs)), rtol=1e-5)
    # ... and after a day, when drift has spread the devices, its variance is still one pair's over n
    aged = PCM(pairs=pairs, prog_noise_scale=0.0).realise(torch.full((4, 64, 64), x), DAY, gen(12))
    one = PCM(prog_noise_scale=0.0).realise(torch.full((16, 64, 64), x), DAY, gen(13))
    assert (aged.read_std.double().square().mean() * pairs).item() == pytest.approx(
        one.read_std.double().square().mean().item(), rel=0.03)


def test_pcm_pairs_drift_spread_falls_by_root_n():
    # ν's spread enters the weight through (t/t0)^(−ν): the spread of the mean of n powers is one's / √n
    x, t = 0.3, 3.15e7
    spread = [PCM(pairs=n, prog_noise_scale=0.0, read_noise_scale=0.0).realise(torch.full((4, 128, 128), x), t, gen(14))
              .weight.double().std().item() for n in (1, 2)]
    assert spread[1] == pytest.approx(spread[0] / math.sqrt(2), rel=0.04)


@pytest.mark.parametrize("numel", [3 * 70 * 600, 2 * (1 << 18) + 777])  # one generator / several streams
@pytest.mark.parametrize("t", [0.0, DAY])
def test_pcm_pairs_block_path_is_the_device_by_device_state(numel, t):
    # realise (block by block, streams) and pair_state (whole tensors) draw the same devices in the same
    # order; the state holds each side's mean over the pairs and the std of that mean
    pcm = PCM(pairs=2)
    w = torch.rand(numel, generator=gen(15)) * 2 - 1
    real = pcm.realise(w.clone(), t, gen(16))
    state = pcm.pair_state(w.clone(), t, gen(16))
    assert torch.allclose(real.weight, (state.g_plus - state.g_minus) / pcm.g_max, atol=1e-6)
    assert torch.allclose(real.read_std, state.read_std, rtol=1e-5, atol=1e-8)
    if t:
        assert torch.allclose(real.reference, (state.ref_plus - state.ref_minus) / pcm.g_max, atol=1e-6)
    with pytest.raises(Exception, match="device.pairs"):
        PCM(pairs=0)


# ----- RRAM -----------------------------------------------------------------------------------------------
def quiet_rram(**kw) -> RRAM:
    return RRAM(**{"read_noise": 0.0, "stuck_low": 0.0, "stuck_high": 0.0, **kw})


def test_rram_levels_are_exact_without_noise():
    w = torch.rand(4, 64, 64, generator=gen(5)) * 2 - 1
    real = quiet_rram(prog_noise_scale=0.0).realise(w, 0.0, gen())
    assert torch.equal(real.weight, torch.round(w * 31) * (G_RRAM / 31) / G_RRAM)


@pytest.mark.parametrize("k", [0, 1, 3, 8, 12, 20, 31])
@pytest.mark.parametrize("t", [1.0, DAY, 2 * DAY])
def test_rram_noise_vs_level_at_1s_1day_2days(k, t):
    x = k / 31  # on the 32-level grid
    real = quiet_rram().realise(torch.full((4, 128, 128), x), 0.0 if t == 1.0 else t, gen(6))
    g = real.weight.double() * G_RRAM
    m_idle, v_idle = clamped(0.0, rram_sigma(0.0, t))
    if k == 0:
        assert g.std().item() == pytest.approx(math.sqrt(2 * v_idle), rel=0.03)  # the RESET devices: 0.348 µS at 1 s
        return
    m_on, v_on = clamped(x * G_RRAM, rram_sigma(x, t))
    assert g.std().item() == pytest.approx(math.sqrt(v_on + v_idle), rel=0.03)
    assert g.mean().item() == pytest.approx(m_on - m_idle, abs=0.03 * math.sqrt(v_on + v_idle))


def test_rram_relaxation_interpolates_in_log_time_and_holds_after_two_days():
    dev = quiet_rram()
    x = 20 / 31
    w = torch.full((4, 128, 128), x)
    mid = math.sqrt(1.0 * DAY)  # halfway between 1 s and 1 day in ln t: the mean of the two variances
    g = dev.realise(w, mid, gen(7)).weight.double() * G_RRAM

    def sigma_mid(v: float) -> float:
        return math.sqrt((rram_sigma(v, 1.0) ** 2 + rram_sigma(v, DAY) ** 2) / 2)

    stated = clamped(x * G_RRAM, sigma_mid(x))[1] + clamped(0.0, sigma_mid(0.0))[1]
    assert g.std().item() == pytest.approx(math.sqrt(stated), rel=0.03)
    later = [dev.realise(w, t, gen(7)).weight for t in (2 * DAY, 5 * DAY, 3.15e7)]
    assert torch.equal(later[0], later[1]) and torch.equal(later[0], later[2])


def test_rram_drift_ages_a_chip_and_carries_its_reference():
    dev = RRAM()
    w = torch.rand(2, 64, 64, generator=gen(8)) * 2 - 1
    now, day = dev.realise(w, 0.0, gen(9)), dev.realise(w, DAY, gen(9))
    assert dev.drifts and not torch.equal(now.weight, day.weight)
    assert now.reference is None and torch.equal(day.reference, now.weight)
    # the same devices at both times: the 1-s error persists (correlated), relaxation adds to it
    e0, e1 = (now.weight - w).flatten(), (day.weight - w).flatten()
    assert torch.corrcoef(torch.stack((e0, e1)))[0, 1] > 0.3
    assert not RRAM(relax_scale=0.0).drifts


# ----- stuck devices --------------------------------------------------------------------------------------
def test_stuck_fractions_are_binomial():
    n = 1 << 20
    low, high = stuck_devices(torch.empty(n), 0.0175, 0.0904, gen(10))
    for mask, p in ((low, 0.0175), (high, 0.0904)):
        assert abs(mask.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert not (low & high).any()
    assert stuck_devices(torch.empty(n), 0.0, 0.0, gen(10)) is None


@pytest.mark.parametrize("device", ["pcm", "rram"])
def test_stuck_devices_sit_at_zero_and_g_max(device):
    pl, ph = 0.03, 0.06
    if device == "pcm":
        dev = PCM(prog_noise_scale=0.0, drift_scale=0.0, stuck_low=pl, stuck_high=ph)
        clean = PCM(prog_noise_scale=0.0, drift_scale=0.0)
    else:
        dev = RRAM(levels=3, prog_noise_scale=0.0, read_noise=0.0, stuck_low=pl, stuck_high=ph)
        clean = RRAM(levels=3, prog_noise_scale=0.0, read_noise=0.0, stuck_low=0.0, stuck_high=0.0)
    w = torch.full((4, 256, 256), 0.5)  # G+ at g_max/2, G− idle at 0 µS
    real = dev.realise(w, 0.0, gen(11)).weight
    n = real.numel()
    ok = 1 - pl - ph
    expected = {  # G+ stuck high, G− not: 1; G+ stuck low or G− stuck high: 0 or −0.5; …
        1.0: ph * (1 - ph), 0.5: ok * (1 - ph), -0.5: ok * ph, -1.0: pl * ph, 0.0: pl * (1 - ph) + ph * ph,
    }
    for value, p in expected.items():
        frac = (real - value).abs().lt(1e-6).double().mean().item()
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (value, frac, p)
    # the off switch: with no stuck devices nothing is drawn for them, and the devices that are not stuck
    # are bit for bit the fault-free chip's (the faults are drawn after all noise)
    assert torch.equal(clean.realise(w, 0.0, gen(11)).weight, torch.full_like(w, 0.5))
    cls = PCM if device == "pcm" else RRAM
    faulty = cls(stuck_low=pl, stuck_high=ph).realise(w, DAY, gen(12)).weight
    fault_free = cls(stuck_low=0.0, stuck_high=0.0).realise(w, DAY, gen(12)).weight
    differ = (faulty != fault_free).double().mean().item()
    p_any = 1 - (1 - pl - ph) ** 2  # a pair with at least one stuck device
    assert 0.5 * p_any < differ < p_any + 4 * math.sqrt(p_any / n)


# ----- photonic: crosstalk --------------------------------------------------------------------------------
def random_mesh(n: int, batch: int = 3, seed: int = 0) -> mesh.MeshPhases:
    g = gen(seed)
    m = mesh.num_mzis(n)
    return mesh.MeshPhases(
        theta=torch.rand(batch, m, generator=g, dtype=torch.float64) * math.pi / 2,
        phi=torch.rand(batch, m, generator=g, dtype=torch.float64) * 2 * math.pi,
        out_phase=torch.rand(batch, n, generator=g, dtype=torch.float64) * 2 * math.pi,
        n=n,
    )


@pytest.mark.parametrize("n", [5, 6])
def test_crosstalk_adds_kappa_of_the_neighbouring_heaters(n):
    phases, kappa = random_mesh(n), 0.01
    got = mesh.thermal_crosstalk(phases, kappa)
    column, top = mesh.mesh_layout(n)
    for j in range(mesh.num_mzis(n)):  # neighbours: same column, top mode two modes away
        nb = [i for i in range(mesh.num_mzis(n)) if column[i] == column[j] and abs(int(top[i]) - int(top[j])) == 2]
        for name in ("theta", "phi"):
            p = getattr(phases, name)
            torch.testing.assert_close(getattr(got, name)[:, j], p[:, j] + kappa * p[:, nb].sum(-1), rtol=0, atol=1e-12)
    for m in range(n):
        nb = [i for i in (m - 1, m + 1) if 0 <= i < n]
        torch.testing.assert_close(got.out_phase[:, m], phases.out_phase[:, m] + kappa * phases.out_phase[:, nb].sum(-1),
                                   rtol=0, atol=1e-12)
    assert mesh.thermal_crosstalk(phases, 0.0) is phases


def test_crosstalk_changes_the_mesh_by_its_first_order_amount():
    n, kappa = 8, 1e-4
    phases = random_mesh(n, seed=1)
    shifted = mesh.thermal_crosstalk(phases, kappa)
    d_theta, d_phi, d_out = (getattr(shifted, p) - getattr(phases, p) for p in ("theta", "phi", "out_phase"))

    def f(t, p, o):
        return mesh.mesh_matrix(mesh.MeshPhases(t, p, o, n))

    base, first = torch.func.jvp(f, (phases.theta, phases.phi, phases.out_phase), (d_theta, d_phi, d_out))
    actual = mesh.mesh_matrix(shifted) - base
    assert first.abs().max() > 1e-4  # a visible change
    assert ((actual - first).norm() / first.norm()).item() < 0.02  # and it is the first-order one


def test_crosstalk_off_is_bit_identical():
    w = torch.rand(3, 32, 32, dtype=torch.float64, generator=gen(2)) * 2 - 1
    tile = mesh.decompose_matrix(w)
    plain = mesh.compose_matrix(tile, phase_bits=8, phase_noise_std=0.002, generator=gen(3), loss_db_per_mzi=0.1)
    off = mesh.compose_matrix(tile, phase_bits=8, phase_noise_std=0.002, generator=gen(3), loss_db_per_mzi=0.1,
                              crosstalk=0.0, mode_loss_mean_db=0.0, mode_loss_std_db=0.0)
    assert torch.equal(plain, off)
    on = mesh.compose_matrix(tile, phase_bits=8, crosstalk=1e-3)
    assert not torch.equal(on, mesh.compose_matrix(tile, phase_bits=8))


# ----- photonic: loss -------------------------------------------------------------------------------------
def bar_mesh(n: int) -> mesh.MeshPhases:
    m = mesh.num_mzis(n)
    zeros = torch.zeros(1, m, dtype=torch.float64)
    return mesh.MeshPhases(theta=zeros, phi=zeros, out_phase=torch.zeros(1, n, dtype=torch.float64), n=n)


def test_per_mode_loss_attenuates_each_waveguide_by_its_own_db():
    n = 6
    loss = torch.tensor([0.0, 0.3, 1.0, 0.2, 2.0, 0.5], dtype=torch.float64)
    out = mesh.mesh_matrix(bar_mesh(n), mode_loss_db=loss)  # bar state: light stays on its waveguide
    torch.testing.assert_close(torch.diagonal(out[0]).abs(), 10 ** (-loss / 20), rtol=0, atol=1e-12)


def test_balanced_edges_make_uniform_insertion_loss_one_scale():
    n, db = 8, 0.3
    phases = mesh.clements_decompose(torch.linalg.qr(torch.randn(4, n, n, dtype=torch.float64, generator=gen(4)))[0])
    lossy = mesh.mesh_matrix(phases, loss_db_per_mzi=db, balanced_edges=True)
    torch.testing.assert_close(lossy, mesh.mesh_matrix(phases) * 10 ** (-db * n / 20), rtol=0, atol=1e-12)
    assert torch.equal(mesh.mesh_matrix(phases, loss_db_per_mzi=db, balanced_edges=False),
                       mesh.mesh_matrix(phases, loss_db_per_mzi=db))


def _weights(seed: int = 0) -> torch.Tensor:
    w = torch.rand(4, 64, 48, dtype=torch.float64, generator=gen(seed)) * 2 - 1
    return w / w.abs().amax(-1, keepdim=True)  # normalised per tile column, like a layer's tiles


def _loss_error(**kw) -> float:
    dev = Photonic(phase_bits=None, phase_noise=0.0, **kw)
    real = dev.realise(_weights(), 0.0, gen(5))
    w = _weights()
    return float((real.weight * real.gain - w).norm() / w.norm())


def test_per_mode_compensation_restores_the_matrix():
    # reference: what the other non-idealities of the profile cost on the same weights
    w = _weights()
    bits = Photonic(phase_noise=0.0, loss_db_per_mzi=0.0).realise(w, 0.0, gen(5)).weight
    noise = Photonic(phase_bits=None, loss_db_per_mzi=0.0).realise(w, 0.0, gen(5)).weight
    other = min(float((bits - w).norm() / w.norm()), float((noise - w).norm() / w.norm()))
    assert 0.005 < other < 0.015
    # per-waveguide loss spread 0.1 dB on top of 0.1 dB/MZI, balanced edges (the profile's layout)
    glob = _loss_error(mode_loss_std_db=0.1, loss_compensation="global")
    mode = _loss_error(mode_loss_std_db=0.1, loss_compensation="mode")
    assert mode < 0.75 * glob and mode < 0.5 * other
    assert _loss_error() < 1e-9  # uniform insertion loss alone is one scale per mesh: removed exactly
    # the plain Clements layout: path-dependent loss through the outer waveguides, ≈ 1.9 % with one gain;
    # per-detector gains remove part of it
    plain_glob = _loss_error(balanced_edges=False, loss_compensation="global")
    plain_mode = _loss_error(balanced_edges=False, loss_compensation="mode")
    assert 0.015 < plain_glob < 0.025 and plain_mode < 0.9 * plain_glob


def test_global_compensation_and_no_mode_loss_are_the_previous_model():
    # loss_compensation: global with no per-mode loss is the chip as it was: weight = the composed lossy
    # meshes, gain = ‖W_target‖/‖W_chip‖
    w = _weights(1)[:, :32, :32].float()
    dev = Photonic(mesh_size=16, balanced_edges=False, loss_compensation="global")
    real = dev.realise(w, 0.0, gen(6))
    blocks, shape = dev.blocks(w.double())
    tile = mesh.decompose_matrix(blocks)
    chip = dev.unblocks(mesh.compose_matrix(tile, phase_bits=8, phase_noise_std=0.002, generator=gen(6),
                                            loss_db_per_mzi=0.1), shape, 32, 32)
    target = dev.unblocks(mesh.compose_matrix(tile), shape, 32, 32)
    assert torch.equal(real.weight, chip.float())
    assert real.gain == float(target.norm() / chip.norm())
    # and a lossless chip has no gain to calibrate
    assert Photonic(loss_db_per_mzi=0.0).realise(w, 0.0, gen(6)).gain == 1.0


def test_mode_loss_spread_is_drawn_per_chip():
    w = _weights(2).float()
    dev = Photonic(phase_noise=0.0, phase_bits=None, mode_loss_std_db=0.2, loss_compensation="global")
    a, b = dev.realise(w, 0.0, gen(7)), dev.realise(w, 0.0, gen(8))
    assert not torch.equal(a.weight, b.weight) and torch.equal(a.weight, dev.realise(w, 0.0, gen(7)).weight)
    fixed = Photonic(phase_noise=0.0, phase_bits=None, mode_loss_db=(0.5,), loss_compensation="global")
    assert torch.equal(fixed.realise(w, 0.0, gen(7)).weight, fixed.realise(w, 0.0, gen(8)).weight)
