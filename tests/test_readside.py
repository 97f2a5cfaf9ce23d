"""Read-side non-idealities against formulas written out here, independently of the implementation:
IR drop of the column wires (a resistor-ladder nodal solve, and aihwkit's IOParameters.ir_drop formula),
static per-column ADC gain and offset errors (their statistics, and the converter formula), the DAC's
integral nonlinearity (the INL bow). For each: the fused CPU kernel against the torch reference with the
effect on, and the off switch (0 → the very same reads as without the parameter)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import analogllm as al
from analogllm.config import ConfigError, profile_names
from analogllm.nn.linear import AnalogLinear
from analogllm.ops import cpu as kernel
from analogllm.ops import read as readop

needs_kernel = pytest.mark.skipif(kernel.library() is None, reason="no C compiler: reads run on the torch path")

RHO_PCM = 0.35 * 25e-6  # 0.35 Ω of wire per cell × g_max 25 µS


# ----- the formulas ---------------------------------------------------------------------------------------
def ladder(w: torch.Tensor, on: torch.Tensor, rho: float) -> torch.Tensor:
    """Wire voltages φ_k / V_read of one column by nodal analysis (float64). Device k (conductance w_k·g_max)
    joins the wire at node k and is driven at V_read when ``on``; k = 0 is the far end, a wire segment of
    resistance R joins node k to k + 1, and node n − 1 to the ADC's virtual ground (0 V). In units of
    g_max a segment's conductance is 1/ρ. Kirchhoff at node k:
        g_k (1 − φ_k) + (φ_{k−1} − φ_k)/ρ [k > 0] + (φ_{k+1} − φ_k)/ρ = 0,   φ_n = 0."""
    n = w.numel()
    g = (w * on).double()
    wire = torch.full((n,), 1.0 / rho, dtype=torch.float64)
    diag = g + wire + torch.cat([torch.zeros(1, dtype=torch.float64), wire[1:]])
    a = torch.diag(diag) - torch.diag(wire[1:], 1) - torch.diag(wire[1:], -1)
    return torch.linalg.solve(a, g)


def aihwkit_ir_drop(w: torch.Tensor, x: torch.Tensor, rho: float) -> torch.Tensor:
    """aihwkit's ir_drop (rpu_forward_backward_pass.cpp, applyIrDrop) for one tile, (N, out): a_i = n·Σ_j|w_ij||x_j|
    ·ρ, c_i = a_i(0.5 − 0.2a_i + 0.05a_i²), drop_i = c_i·Σ_j w_ij x_j (1 − (1 − j'/n)²), where its input j' = 0
    sits at the ADC end: j' = n − 1 − j in our row order (row 0 at the far end)."""
    n = w.shape[0]
    a = n * rho * (x.abs() @ w.abs())
    c = a * (a * (0.05 * a - 0.2) + 0.5)
    jp = (n - 1 - torch.arange(n, dtype=torch.float64))
    return c * ((x * (1 - (1 - jp / n) ** 2)) @ w)


def bow(u: torch.Tensor, inl: float) -> torch.Tensor:
    """The INL bow in LSB: inl · (3√3/2) · u(1 − u²), 0 at 0 and ±1, peak ±inl at |u| = 1/√3."""
    return inl * 1.5 * math.sqrt(3.0) * u * (1 - u * u)


def _op(x, tiles, *, rho=0.0, adc_range=None, adc_bits=0, adc_gain=None, adc_offset=None, dac_bits=0, inl=0.0,
        fused=False, noise=False, sat=0.0):
    """One read through the reference (or the kernel): unit scales, gain and DAC range."""
    t, _, o = tiles.shape
    args = (x, tiles, torch.ones(t, o), torch.tensor(1.0), torch.tensor(1.0), adc_range,
            torch.full((t, o), 1e-4) if noise else None, None, torch.tensor([11, 22]), dac_bits, adc_bits,
            0.04**2 if noise else 0.0, 0.0, sat, True, adc_range is not None, adc_gain, adc_offset, rho, inl)
    return (readop._kernel if fused else readop.reference)(*args)


# ----- IR drop --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a", [0.05, 0.3, 1.0])
def test_ir_drop_profile_matches_a_resistor_ladder_for_a_uniform_load(a):
    # every row driven, every weight equal: the model's wire voltage φ_j = c(a)·P_j against the ladder, row
    # by row (first order exact, c(a) the continuous line's exact far end), and the column's total output
    n = 512
    w = torch.full((n,), a / (RHO_PCM * n * n), dtype=torch.float64)  # a = ρ·n·Σ|w||u|
    phi = ladder(w, torch.ones(n), RHO_PCM)
    model = readop.ir_factor(torch.tensor(a, dtype=torch.float64)) * readop.ir_profile(n, dtype=torch.float64)
    assert phi[0] == phi.max() and phi[-1] == phi.min()  # the far end sits highest, the last row next to the ADC
    assert (model - phi).abs().max() <= (0.002 + 0.02 * a) * phi[0]
    # the same through a read (float32): y = Σ w u (1 − φ)
    y = _op(torch.ones(1, n), w.float().view(1, n, 1), rho=RHO_PCM)[0]
    exact = float((w * (1 - phi)).sum())
    assert abs(float(y) - exact) <= 2e-3 * float((w * phi).sum()) + 1e-5 * exact


def test_ir_drop_of_a_random_input_pattern_matches_the_ladder_and_aihwkit():
    # 64 columns of random weights, half the rows pulsed (u ∈ {0, 1}), a ≈ 0.1–0.3: the drop the read
    # computes against the ladder column by column, and against aihwkit's cubic formula
    n, cols = 512, 64
    g = torch.Generator().manual_seed(0)
    w = torch.rand(n, cols, generator=g, dtype=torch.float64) * 0.3
    on = (torch.rand(n, generator=g) < 0.5).double()
    ideal = on @ w
    y = _op(on.float().view(1, n), w.float().unsqueeze(0), rho=RHO_PCM)[0][0].double()
    drop = ideal - y
    ladder_drop = torch.stack([(w[:, o] * on * ladder(w[:, o], on, RHO_PCM)).sum() for o in range(cols)])
    a = n * RHO_PCM * ideal
    assert 0.08 < float(a.min()) and float(a.max()) < 0.35
    error = (drop - ladder_drop) / ladder_drop  # the load's random unevenness along each column: ±2 %
    assert error.abs().max() < 0.05 and abs(float(error.mean())) < 0.015
    ai = aihwkit_ir_drop(w, on.view(1, n), RHO_PCM)[0]
    assert ((drop - ai).abs() / ai).max() < 0.02  # the two first-order models agree to O(a², 1/n)
    assert error.square().mean() <= ((ai - ladder_drop) / ladder_drop).square().mean()  # and ours is no worse


def test_ir_drop_of_a_load_at_one_end_is_biased_as_documented():
    # the model's wire profile is the uniform load's: a load at the far end (the whole wire carries it)
    # is underestimated, one next to the ADC overestimated (docs/physics.md gives the sizes)
    n = 512
    w = torch.full((n,), 0.4, dtype=torch.float64)
    rows = torch.arange(n)
    for on, sign in (((rows < n // 2).double(), -1), ((rows >= n // 2).double(), 1)):
        y = _op(on.float().view(1, n), w.float().view(1, n, 1), rho=RHO_PCM)[0]
        drop = float((w * on).sum()) - float(y)
        exact = float((w * on * ladder(w, on, RHO_PCM)).sum())
        assert sign * (drop - exact) / exact > 0.1


def test_ir_drop_gradient_is_straight_through():
    # the backward of a read with IR drop is the one without (like noise): the same input gradients,
    # while the forward differs
    cfg = al.AnalogConfig.from_profile("pcm", **{"adc.bits": None, "output.noise": 0.0, "device.read_noise_scale": 0.0,
                                                 "tiling.rows": 64, "ir_drop.wire_resistance": 20.0})
    lin = _layer(cfg, 128, 32)
    off = _layer(cfg.set("ir_drop.wire_resistance", 0.0), 128, 32)
    x = torch.randn(16, 128)
    outs = []
    for layer in (lin, off):
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        (gx,) = torch.autograd.grad(y, [xx], torch.linspace(-1, 1, y.numel()).view_as(y))
        outs.append((y.detach(), gx))
    assert not torch.allclose(outs[0][0], outs[1][0], rtol=1e-3)
    assert torch.equal(outs[0][1], outs[1][1])


# ----- ADC gain and offset errors -------------------------------------------------------------------------
def _layer(cfg, inp=96, out=40, seed=4, seconds=0.0, dac_range=2.5):
    torch.manual_seed(0)
    lin = AnalogLinear(inp, out, config=cfg)
    if cfg.dac.range != "dynamic":
        with torch.no_grad():
            lin.analog.input_range.fill_(dac_range)
        lin.analog.mark_range_set()
    lin.analog.program(lin.weight, seed=seed, seconds=seconds)
    return lin


def test_adc_errors_have_the_profile_statistics_and_belong_to_the_chip():
    # 2 tiles × 4096 columns: gain 1 + 0.03·z, offset 0.7·z' LSB, independent and normal; fixed per chip
    # instance (the same at every drift time, another seed another chip); switching them on moves no other
    # random number of the chip
    cfg = al.AnalogConfig.from_profile("pcm", **{"adc.gain_std": 0.03, "adc.offset_std": 0.7})
    lin = _layer(cfg, 1024, 4096)
    chip = lin.analog.chip
    gain, offset = chip.adc_gain.flatten().double(), chip.adc_offset.flatten().double()
    n = gain.numel()
    assert chip.adc_gain.shape == (1, 2, 4096) == chip.adc_offset.shape
    assert abs(float(gain.mean()) - 1) < 4 * 0.03 / math.sqrt(n)
    assert abs(float(gain.std()) / 0.03 - 1) < 4 / math.sqrt(2 * n)
    assert abs(float(offset.mean())) < 4 * 0.7 / math.sqrt(n)
    assert abs(float(offset.std()) / 0.7 - 1) < 4 / math.sqrt(2 * n)
    assert abs(float(torch.corrcoef(torch.stack([gain, offset]))[0, 1])) < 4 / math.sqrt(n)
    p2 = math.erfc(2 / math.sqrt(2))
    assert abs(float(((offset / 0.7).abs() > 2).double().mean()) - p2) < 4 * math.sqrt(p2 * (1 - p2) / n)
    later = copy.deepcopy(lin)
    later.analog.program(later.weight, seed=4, seconds=86400.0)
    assert torch.equal(later.analog.chip.adc_gain, chip.adc_gain)
    assert torch.equal(later.analog.chip.adc_offset, chip.adc_offset)
    other = copy.deepcopy(lin)
    other.analog.program(other.weight, seed=5)
    assert not torch.equal(other.analog.chip.adc_gain, chip.adc_gain)
    gain_only = _layer(cfg.set("adc.offset_std", 0.0), 1024, 4096)
    assert torch.equal(gain_only.analog.chip.adc_gain, chip.adc_gain)
    assert not gain_only.analog.chip.adc_offset.any()
    ideal_adcs = _layer(cfg.set("adc.gain_std", 0.0).set("adc.offset_std", 0.0), 1024, 4096)
    assert ideal_adcs.analog.chip.adc_gain is None and ideal_adcs.analog.chip.adc_offset is None
    assert torch.equal(ideal_adcs.analog.chip.tiles, chip.tiles)
    assert torch.equal(ideal_adcs.analog.chip.read_var, chip.read_var)
    moved = copy.deepcopy(lin).to(torch.float64)  # the errors are chip buffers: they move with the chip
    assert moved.analog.chip.adc_gain.dtype == torch.float64


def test_adc_errors_act_before_the_rounding():
    # ideal device, dynamic DAC range, one 8-bit ADC per column: code = round(clamp(g·y + o·LSB, ±B)/LSB),
    # out = code·LSB·s·r + bias, with y = x/r · w/s, s the column's abs-max, r the row's
    bound, bits = 4.0, 8
    cfg = al.AnalogConfig.from_profile("ideal", **{"adc.bits": bits, "adc.bound": bound, "adc.gain_std": 0.05,
                                                   "adc.offset_std": 2.0})
    lin = _layer(cfg, 64, 48)
    chip = lin.analog.chip
    x = torch.randn(200, 64)
    with torch.no_grad():
        out = lin(x)
    w = lin.weight.detach()
    s = w.abs().amax(-1)
    r = x.abs().amax(-1, keepdim=True)
    y = (x / r) @ (w / s.unsqueeze(-1)).T
    step = 2 * bound / (2**bits - 2)
    g, o = chip.adc_gain[0, 0], chip.adc_offset[0, 0]
    code = torch.round((g * y + o * step).clamp(-bound, bound) / step)
    expect = code * step * s * r + lin.bias.detach()
    assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5)
    plain = torch.round(y.clamp(-bound, bound) / step) * step * s * r + lin.bias.detach()
    assert (out - plain).abs().max() > 10 * step * float(s.min())  # the errors are there (the test can fail)


def test_adc_gain_errors_are_in_the_input_gradient():
    # the gain errors are a fixed linear factor of the chip: ∂out/∂x = diag(g)·W when nothing saturates
    cfg = al.AnalogConfig.from_profile("ideal", **{"adc.bits": 8, "adc.bound": 100.0, "adc.gain_std": 0.1})
    lin = _layer(cfg, 64, 48)
    x = torch.randn(20, 64, requires_grad=True)
    grad = torch.randn(20, 48)
    (gx,) = torch.autograd.grad(lin(x), [x], grad)
    g = lin.analog.chip.adc_gain[0, 0]
    assert torch.allclose(gx, (grad * g) @ lin.weight.detach(), atol=1e-5, rtol=1e-5)


# ----- DAC integral nonlinearity --------------------------------------------------------------------------
@pytest.mark.parametrize("inl", [0.5, -1.5])
def test_dac_inl_curve(inl):
    # every code of an 8-bit DAC: the level error in LSB is the bow, 0 at 0 and ±1, odd, its peak the INL
    bits, r = 8, torch.tensor(2.0)
    step = 1 / (2 ** (bits - 1) - 1)
    codes = torch.arange(-(2 ** (bits - 1) - 1), 2 ** (bits - 1), dtype=torch.float64) * step
    u = readop.dac((codes * 2.0).float().view(1, -1), r, bits, inl)[0].double()
    error = (u - codes) / step
    assert torch.allclose(error, bow(codes, inl), atol=2e-4)
    assert float(error[0]) == float(error[-1]) == float(error[len(codes) // 2]) == 0.0
    assert torch.allclose(error, -error.flip(0), atol=1e-4)
    assert abs(inl) * (1 - 1e-3) < float(error.abs().max()) <= abs(inl) + 1e-4
    peak = float(codes[error.abs().argmax()].abs())
    assert abs(peak - 1 / math.sqrt(3)) <= step


def test_dac_inl_in_a_read():
    # ideal device, 8-bit DAC with 1 LSB of INL, no ADC: out = (Q(x/r) + bow·LSB)·r · Wᵀ + bias
    cfg = al.AnalogConfig.from_profile("ideal", **{"dac.bits": 8, "dac.init_range": 2.0, "dac.range": "static",
                                                   "dac.inl": 1.0})
    lin = _layer(cfg, 64, 48, dac_range=2.0)
    x = torch.randn(100, 64)
    with torch.no_grad():
        out = lin(x)
    step = 1 / 127
    q = torch.round((x / 2.0).clamp(-1, 1) / step) * step
    expect = ((q + bow(q, 1.0) * step) * 2.0) @ lin.weight.detach().T + lin.bias.detach()
    assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5)
    linear = (q * 2.0) @ lin.weight.detach().T + lin.bias.detach()
    assert (out - linear).abs().max() > 1e-3


@needs_kernel
def test_kernel_dac_has_the_same_inl():
    x = torch.randn(33, 300) * 2
    r = torch.tensor(2.5)
    for inl in (0.0, 0.8):
        k = readop.dac_inl_coefficient(8, inl)
        u, usq = kernel.dac(x, r, readop.dac_step(8), 3, 100, True, k)
        ref = readop.tile_input(readop.dac(x, r, 8, inl), 3, 100)
        assert torch.allclose(u, ref, atol=1e-6)
        assert torch.allclose(usq, ref.square().sum(-1), rtol=1e-5)


# ----- the kernel and the reference with the effects on ---------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("sat", [0.0, 3.0])
def test_kernel_read_equals_the_reference_read_with_every_read_side_effect(sat):
    g = torch.Generator().manual_seed(3)
    t, rows, o = 3, 100, 90
    x = torch.randn(64, t * rows - 7, generator=g)
    tiles = torch.randn(t, rows, o, generator=g) / 10
    kw = dict(rho=40 * RHO_PCM, adc_range=torch.tensor([6.0, 4.0, 0.5]), adc_bits=8, dac_bits=8, inl=1.5,
              adc_gain=1 + 0.05 * torch.randn(t, o, generator=g), adc_offset=torch.randn(t, o, generator=g),
              noise=True, sat=sat)
    k = _op(x, tiles, fused=True, **kw)
    r = _op(x, tiles, **kw)
    plain = _op(x, tiles, **{**kw, "rho": 0.0, "inl": 0.0, "adc_gain": None, "adc_offset": None})
    assert ((k[0] - r[0]).abs() > 1e-4 * (1 + r[0].abs())).float().mean() < 0.005
    assert ((k[1].float() - r[1].float()).abs() > 1e-4).float().mean() < 0.005
    assert ((k[2] - r[2]).abs() > 1e-3).float().mean() < 0.005
    assert (r[0] - plain[0]).abs().mean() > 0.05 * plain[0].abs().mean()  # the effects are on


def _read(lin, x, monkeypatch, fused: bool):
    monkeypatch.setenv("ANALOGLLM_KERNEL", "1" if fused else "0")
    x = x.clone().requires_grad_(True)
    torch.manual_seed(0)
    y = lin(x)
    (gx,) = torch.autograd.grad(y, [x], torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), gx


EFFECTS = {"tiling.rows": 40, "ir_drop.wire_resistance": 30.0, "dac.inl": 1.0, "adc.gain_std": 0.03,
           "adc.offset_std": 0.5}


@needs_kernel
@pytest.mark.parametrize("profile", ["pcm", "rram"])
@pytest.mark.parametrize("mode", ["chip", "hwa"])
def test_layer_reads_with_read_side_effects_match_between_kernel_and_reference(profile, mode, monkeypatch):
    lin = _layer(al.AnalogConfig.from_profile(profile, **EFFECTS), seconds=3600.0)
    al.set_mode(lin, mode)
    x = torch.randn(300, 96) * 2
    y_fused, g_fused = _read(lin, x, monkeypatch, fused=True)
    y_ref, g_ref = _read(lin, x, monkeypatch, fused=False)
    rare = 3e-3
    assert ((y_fused - y_ref).abs() > 1e-4 * (1 + y_ref.abs())).float().mean() <= rare
    assert ((g_fused - g_ref).abs() > 1e-4 * (1 + g_ref.abs())).float().mean() <= 2 * rare
    off = _layer(al.AnalogConfig.from_profile(profile, **{"tiling.rows": 40, "ir_drop.wire_resistance": 0.0}),
                 seconds=3600.0)
    al.set_mode(off, mode)
    y_off, _ = _read(off, x, monkeypatch, fused=True)
    assert (y_fused - y_off).abs().mean() > 0.02 * y_off.abs().mean()


# ----- the off switch -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_kernel)])
def test_read_side_effects_off_give_the_reads_of_before(fused):
    # the op without the new arguments (as every read was computed before they existed) and with them
    # switched off (0 / None, or ideal ADCs given as gain 1 and offset 0): the very same numbers
    g = torch.Generator().manual_seed(1)
    t, rows, o = 3, 100, 90
    x = torch.randn(64, t * rows - 7, generator=g) * 2
    tiles = torch.randn(t, rows, o, generator=g) / 10
    base = (x, tiles, torch.rand(t, o, generator=g) + 0.5, torch.tensor(3.0), torch.tensor(1.1),
            torch.tensor([6.0, 4.0, 0.5]), torch.full((t, o), 1e-4), torch.randn(o, generator=g),
            torch.tensor([123, 456]), 8, 8, 0.04**2, 0.0, 4.0, True, True)
    fn = readop._kernel if fused else readop.reference
    before = fn(*base)
    for extra in ((None, None, 0.0, 0.0), (torch.ones(t, o), torch.zeros(t, o), 0.0, 0.0)):
        after = fn(*base, *extra)
        for a, b in zip(before, after):
            assert torch.equal(a, b)


def test_layer_with_the_effects_at_zero_reads_as_a_config_without_them():
    # a config written before these parameters existed (no keys) and one with them at 0: the same chip,
    # the same reads, nothing drawn for the ADCs
    data = al.AnalogConfig.from_profile("pcm", **{"tiling.rows": 40}).to_dict()
    data["ir_drop"] = {"wire_resistance": 0.0}
    explicit = al.AnalogConfig.from_dict(data)
    del data["ir_drop"], data["dac"]["inl"], data["adc"]["gain_std"], data["adc"]["offset_std"]
    legacy = al.AnalogConfig.from_dict(data)
    assert legacy == explicit
    x = torch.randn(50, 96)
    reads = []
    for cfg in (legacy, explicit):
        lin = _layer(cfg, seconds=3600.0)
        torch.manual_seed(7)
        with torch.no_grad():
            reads.append(lin(x))
        assert lin.analog.chip.adc_gain is None and lin.analog.chip.adc_offset is None
    assert torch.equal(*reads)


def test_ideal_profile_has_every_read_side_effect_off():
    cfg = al.AnalogConfig.from_profile("ideal")
    assert cfg.ir_drop.wire_resistance == 0 and cfg.dac.inl == 0 and cfg.adc.gain_std == 0 == cfg.adc.offset_std
    assert cfg.is_identity and cfg.ir_drop_rho == 0.0
    assert not al.AnalogConfig.from_profile("ideal", **{"dac.bits": 8, "dac.inl": 0.5}).is_identity


# ----- drift compensation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["digital", "pulse"])
def test_drift_compensation_with_ir_drop_and_adc_errors(where):
    # the ±1 calibration read sees the IR drop and the ADC errors like every read, so compensation still
    # restores the scale of such inputs after a year; inputs that load the wires less lose the difference
    # of the calibration's IR drop at t0 and at t (its wires carry half the current after a year's drift).
    # Longer pulses restore the charge, not the current, so the wires' drop stays the drifted one's
    # (pricing it at the compensated conductances under-compensated full inputs to 0.91).
    quiet = {"dac.bits": None, "adc.bits": 12, "adc.bound": 200.0, "output.noise": 0.0,
             "device.read_noise_scale": 0.0, "device.prog_noise_scale": 0.0, "adc.gain_std": 0.02,
             "adc.offset_std": 0.5, "ir_drop.wire_resistance": 0.35, "drift.compensation_at": where,
             "mapping.correction_rank": 0}
    cfg = al.AnalogConfig.from_profile("pcm", **quiet)
    torch.manual_seed(0)
    full = torch.randint(0, 2, (64, 512)).float() * 2 - 1  # inputs like the calibration's
    small = torch.randn(64, 512) * 0.25
    ratios = {}
    for compensation in (True, False):
        lin = _layer(cfg.set("drift.compensation", compensation), 512, 256, dac_range=1.0)
        with torch.no_grad():
            y0 = [lin(v) - lin.bias for v in (full, small)]
            lin.analog.program(lin.weight, seed=4, seconds=3.15e7)
            y1 = [lin(v) - lin.bias for v in (full, small)]
        ratios[compensation] = [float(b.abs().mean() / a.abs().mean()) for a, b in zip(y0, y1)]
    (full_on, small_on), (full_off, _) = ratios[True], ratios[False]
    assert 0.98 < full_on < 1.02
    assert 0.9 < small_on < 0.99  # the documented under-compensation of lightly loaded reads
    assert full_off < 0.65
    no_ir = _layer(cfg.set("ir_drop.wire_resistance", 0.0), 512, 256, dac_range=1.0)
    with torch.no_grad():
        a = (no_ir(small) - no_ir.bias).abs().mean()
        no_ir.analog.program(no_ir.weight, seed=4, seconds=3.15e7)
        b = (no_ir(small) - no_ir.bias).abs().mean()
    assert 0.98 < float(b / a) < 1.02


def _pulse_pair(**overrides):
    """The same chip instance a year after programming, drift compensated digitally and by pulses."""
    cfg = al.AnalogConfig.from_profile("pcm", **{"dac.bits": None, "adc.bits": None, **overrides})
    return {at: _layer(cfg.set("drift.compensation_at", at), 512, 256, seconds=3.15e7, dac_range=1.0)
            for at in ("digital", "pulse")}


def test_pulse_compensation_is_the_same_correction_in_front_of_the_output_stage():
    # with a noiseless output stage and no ADC, α× longer pulses read exactly what a digital α gives,
    # read noise included (it scales with the arrays' currents)
    pair = _pulse_pair(**{"output.noise": 0.0})
    digital, pulse = pair["digital"].analog.chip, pair["pulse"].analog.chip
    alpha = digital.gain
    assert 1.5 < float(alpha) < 2.5 and digital.pulse is None  # a year of drift
    assert torch.equal(pulse.gain, torch.ones(1)) and torch.equal(pulse.pulse, alpha)
    assert torch.equal(pulse.compensation, digital.compensation)
    assert torch.allclose(pulse.tiles, digital.tiles * alpha, rtol=1e-6)
    assert torch.allclose(pulse.read_var, digital.read_var * alpha**2, rtol=1e-5)
    x = torch.randn(64, 512)
    ys = []
    for lin in pair.values():
        torch.manual_seed(5)  # the same read-noise stream
        with torch.no_grad():
            ys.append(lin(x))
    assert torch.allclose(ys[0], ys[1], rtol=1e-4, atol=1e-4 * float(ys[0].abs().max()))


def test_pulse_compensation_leaves_the_output_noise_unscaled():
    # the output stage's noise is added after the pulses: the digital gain multiplies it by α, pulses do not
    pair = _pulse_pair(**{"output.noise": 0.04, "device.read_noise_scale": 0.0})
    alpha = float(pair["digital"].analog.chip.gain)
    x = torch.randn(256, 512)
    spread = {}
    for at, lin in pair.items():
        with torch.no_grad():
            spread[at] = float((lin(x) - lin(x)).std())  # two reads: only the output noise differs
    assert spread["digital"] / spread["pulse"] == pytest.approx(alpha, rel=0.03)


def test_device_statistics_scale_read_noise_with_the_compensation():
    # the compensation α restores the drifted signal and multiplies its read noise with it: at |w| = 1 the
    # table's variance is the compensated weight's spread plus (σ_read·α)², measured here on a tile of ones
    from analogllm.chip.statistics import compensation_gain, device_statistics

    year = 3.15e7
    cfg = al.AnalogConfig.from_profile("pcm", **{"device.prog_noise_scale": 0.0, "device.read_noise_scale": 3.0})
    alpha = compensation_gain(cfg, year)
    real = cfg.device.realise(torch.ones(8, 64, 256), year, torch.Generator().manual_seed(1))
    drift, read = (real.weight * alpha).var(), (real.read_std * alpha).square().mean()
    _, var = device_statistics(cfg, year)
    assert 1.5 < alpha < 2.5 and float(read) > float(drift) / 2  # the read noise is a large part here
    assert float(var.values[-1]) == pytest.approx(float(drift + read), rel=0.1)


def test_training_read_puts_the_output_noise_where_the_compensation_leaves_it():
    # drift-aware training at a year: a digital α multiplies the output noise the shrunk outputs met,
    # pulses do not, so the two reads' variances differ by (α² − 1)·σ_out² whatever the weight noise
    from analogllm.chip.statistics import compensation_gain

    year, sigma = 3.15e7, 0.3
    spread = {}
    for at in ("digital", "pulse"):
        cfg = al.AnalogConfig.from_profile("pcm", **{"dac.bits": None, "adc.bits": None, "output.noise": sigma,
                                                     "training.noise": "device", "drift.compensation_at": at})
        lin = _layer(cfg, 512, 256, dac_range=1.0)
        lin.analog.mode, lin.analog.train_seconds = "hwa", year
        x = torch.randn(256, 512) * 0.5
        with torch.no_grad():
            spread[at] = float((lin(x) - lin(x)).var() / 2)
    alpha = compensation_gain(cfg, year)
    scale2 = float(lin.analog.normalised_tiles(lin.weight.detach())[1].square().mean())  # tile-column scales²
    want = (alpha**2 - 1) * sigma**2 * scale2
    assert (spread["digital"] - spread["pulse"]) == pytest.approx(want, rel=0.1)


def test_training_read_prices_the_ir_drop_at_the_drifted_current_with_pulses():
    # a digital α after the ADC and α× longer pulses deliver the same charge through the same drifted
    # currents, so without output noise and ADC the two training reads agree, IR drop included (pricing
    # the drop at the compensated tiles' load left the pulses' outputs at 0.90 of the digital gain's)
    year, out = 3.15e7, {}
    for at in ("digital", "pulse"):
        cfg = al.AnalogConfig.from_profile("pcm", **{"dac.bits": None, "adc.bits": None, "output.noise": 0.0,
                                                     "training.noise": "device", "drift.compensation_at": at,
                                                     "ir_drop.wire_resistance": 0.35})
        lin = _layer(cfg, 512, 256, dac_range=1.0)
        lin.analog.mode, lin.analog.train_seconds = "hwa", year
        x = torch.sign(torch.randn(64, 512, generator=torch.Generator().manual_seed(2)))  # loads the wires fully
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)  # the same weight-noise draws in both reads
            out[at] = lin(x) - lin.bias
    ratio = float(out["pulse"].abs().mean() / out["digital"].abs().mean())
    assert ratio == pytest.approx(1.0, abs=1e-4)


# ----- configuration ----------------------------------------------------------------------------------------
def test_read_side_parameters_are_validated():
    with pytest.raises(ConfigError, match="ir_drop.wire_resistance"):
        al.AnalogConfig.from_profile("photonic", **{"ir_drop.wire_resistance": 0.35})
    with pytest.raises(ConfigError, match="ir_drop.wire_resistance"):
        al.AnalogConfig.from_profile("pcm", **{"ir_drop.wire_resistance": -1.0})
    with pytest.raises(ConfigError, match="dac.inl"):
        al.AnalogConfig.from_profile("pcm", **{"dac.bits": None, "dac.inl": 0.5})
    with pytest.raises(ConfigError, match="dac.inl"):
        al.AnalogConfig.from_profile("pcm", **{"dac.inl": 30.0})  # no longer a monotone DAC at 8 bits
    with pytest.raises(ConfigError, match="adc.gain_std"):
        al.AnalogConfig.from_profile("pcm", **{"adc.gain_std": -0.1})
    with pytest.raises(ConfigError, match="adc.offset_std"):
        al.AnalogConfig.from_profile("pcm", **{"adc.bits": None, "adc.offset_std": 0.5})
    assert al.AnalogConfig.from_profile("pcm").ir_drop_rho == 0.0  # off by default, as in aihwkit
    on = {"ir_drop.wire_resistance": 0.35}
    assert al.AnalogConfig.from_profile("pcm", **on).ir_drop_rho == pytest.approx(0.35 * 25e-6)
    assert al.AnalogConfig.from_profile("rram", **on).ir_drop_rho == pytest.approx(0.35 * 40e-6)


def test_profiles_sources_list_the_read_side_parameters(capsys):
    from analogllm.cli import main

    assert main(["profiles", "--sources"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0], cells[1]] = cells[3]
    for profile in profile_names():
        for parameter in ("ir_drop.wire_resistance", "dac.inl", "adc.gain_std", "adc.offset_std"):
            assert rows[profile, parameter] not in ("", "—"), (profile, parameter)
