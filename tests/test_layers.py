"""AnalogLinear: converters, tiling, training noise, gradients, chip caching."""

import pytest
import torch
import torch.nn.functional as F

import analogllm as al
from analogllm.nn.linear import AnalogLinear
from analogllm.ops.quant import adc_step, clamp_round

IDEAL = al.AnalogConfig.from_profile("ideal")


def layer(cfg, inp=96, out=40, seed=0):
    torch.manual_seed(seed)
    return AnalogLinear(inp, out, config=cfg)


def test_ideal_layer_is_exactly_linear():
    lin = layer(IDEAL)
    x = torch.randn(5, 7, 96)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # chip mode
    al.set_mode(lin, "hwa")
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_dac_takes_at_most_2_pow_bits_levels(bits):
    cfg = IDEAL.set("dac", {"bits": bits, "range": "static", "init_range": 1.0})
    lin = layer(cfg, inp=1, out=1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.zero_()
    lin.eval()
    x = torch.linspace(-3, 3, 5001).unsqueeze(-1)
    y = lin(x)
    assert len(torch.unique(y)) <= 2**bits
    assert y.max().item() == pytest.approx(1.0) and y.min().item() == pytest.approx(-1.0)  # clipped at ±range


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_adc_levels_and_saturation(bits):
    bound = 2.0
    cfg = IDEAL.set("adc.bits", bits).set("adc.bound", bound)
    lin = layer(cfg, inp=16, out=1)
    lin.eval()
    x = torch.randn(4000, 16) * 3
    y = (lin(x) - lin.bias).detach()
    r = x.abs().amax(-1, keepdim=True)  # dynamic DAC range of the ideal profile
    s = lin.weight.abs().max()
    normalised = y / (r * s)
    step = adc_step(bits, bound)
    codes = torch.round(normalised / step)
    assert torch.allclose(normalised, codes * step, atol=1e-4)  # every output is an ADC level
    assert len(torch.unique(codes)) <= 2**bits
    assert normalised.abs().max().item() == pytest.approx(bound, rel=1e-5)  # saturates at the bound
    q = clamp_round(torch.linspace(-10, 10, 10001), bound, adc_step(bits, bound))
    assert len(torch.unique(q)) <= 2**bits and q.abs().max() == bound


def test_tiling_is_exact_without_adc_and_differs_with_per_tile_adc():
    x = torch.randn(8, 10, 200)
    untiled = layer(IDEAL.set("dac.bits", 8), inp=200)
    tiled = layer(IDEAL.set("dac.bits", 8).set("tiling.rows", 64), inp=200)
    assert tiled.analog.tiles == 4
    for m in (untiled, tiled):
        m.eval()
    assert torch.allclose(untiled(x), tiled(x), atol=1e-5)
    adc = IDEAL.set("dac.bits", 8).set("adc.bits", 6).set("adc.bound", 8.0)
    a, b = layer(adc, inp=200), layer(adc.set("tiling.rows", 64), inp=200)
    a.eval(), b.eval()
    assert not torch.allclose(a(x), b(x), atol=1e-3)
    for m in (a, b):  # both still approximate the digital layer
        rel = ((m(x) - F.linear(x, m.weight, m.bias)).norm() / F.linear(x, m.weight).norm()).item()
        assert rel < 0.1


def test_training_weight_noise_is_output_noise_of_std_sigma_norm_x():
    sigma = 0.05
    cfg = IDEAL.set("training.weight_noise", sigma)
    lin = layer(cfg, inp=64, out=8)
    al.set_mode(lin, "hwa")
    x = torch.randn(1, 64)
    ys = torch.stack([lin(x)[0] for _ in range(4000)])
    expected = sigma * lin.weight.abs().amax(-1) * x.norm()  # σ·(channel max)·‖x‖
    assert torch.allclose(ys.std(0), expected.detach(), rtol=0.08)
    assert torch.allclose(ys.mean(0), F.linear(x, lin.weight, lin.bias)[0].detach(), atol=4 * expected.max().item() / 60)


def test_gradients_reach_weights_and_learned_ranges_through_every_quantiser():
    cfg = al.AnalogConfig.from_profile("pcm", **{"tiling.rows": 32})
    lin = layer(cfg)
    al.set_mode(lin, "hwa")
    x = torch.randn(16, 96) * 2
    lin(x).pow(2).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert lin.analog.input_range.grad is not None and torch.isfinite(lin.analog.input_range.grad)
    assert lin.analog.input_range.grad.abs() > 0


def test_straight_through_gradient_equals_linear_gradient_inside_range():
    cfg = IDEAL.set("dac.bits", 6).set("adc.bits", 6).set("adc.bound", 50.0)
    lin = layer(cfg, inp=32, out=4)
    al.set_mode(lin, "hwa")
    x = torch.randn(10, 32, requires_grad=True)
    lin(x).sum().backward()
    assert torch.allclose(x.grad, lin.weight.sum(0).expand(10, 32).detach(), atol=1e-5)


def test_learned_range_is_initialised_from_data_and_clips_beyond():
    cfg = al.AnalogConfig.from_profile("pcm")
    lin = layer(cfg)
    assert not bool(lin.analog.range_ready)
    x = torch.randn(32, 96)
    lin.eval()
    lin(x)
    assert bool(lin.analog.range_ready)
    assert lin.analog.input_range.item() == pytest.approx(x.abs().max().item())


def test_eval_is_the_cached_chip_and_read_noise_is_fresh():
    cfg = al.AnalogConfig.from_profile("pcm")
    lin = layer(cfg)
    lin.eval()
    x = torch.randn(4, 96)
    y1, y2 = lin(x), lin(x)
    assert not torch.equal(y1, y2)  # fresh read and output noise at every read
    chip = lin.analog.chip.tiles
    lin(x)
    assert lin.analog.chip.tiles is chip  # programmed once, reused
    quiet = cfg.set("device.read_noise_scale", 0.0).set("output.noise", 0.0)
    q = layer(quiet)
    q.eval()
    assert torch.equal(q(x), q(x))
    with torch.no_grad():
        q.weight.mul_(0.5)  # an in-place update re-programs the same chip instance
    assert q.analog.chip.source != (q.weight._version, q.weight.data_ptr())
    q(x)
    assert q.analog.chip.source == (q.weight._version, q.weight.data_ptr())


def _reference(lin, x, cfg):
    """The analogue forward written as a plain autograd graph with explicit straight-through steps:
    what the fused node must compute (and differentiate) when there is no noise."""
    m = lin.analog

    def ste_round(v, step):
        return v + (torch.round(v / step) * step - v).detach()

    r = m.input_range.abs() + 1e-12
    u = ste_round((x / r).clamp(-1, 1), 1 / (2 ** (cfg.dac.bits - 1) - 1))
    bound = cfg.training.clip_sigma * lin.weight.detach().std(-1, keepdim=True)
    w = lin.weight.clamp(-bound, bound)
    pad = m.tiles * m.rows - w.shape[-1]
    out, saturated = 0, 0
    for t in range(m.tiles):  # a loop is fine for a reference
        sl = slice(t * m.rows, (t + 1) * m.rows)
        wt = F.pad(w, (0, pad))[:, sl]
        s = wt.detach().abs().amax(-1).clamp(min=1e-12)
        y = F.pad(u, (0, pad))[:, sl] @ wt.T / s
        if cfg.adc.bits is not None:
            saturated += int((y.abs() > cfg.adc.bound).sum())
            y = ste_round(y.clamp(-cfg.adc.bound, cfg.adc.bound), adc_step(cfg.adc.bits, cfg.adc.bound))
        out = out + y * s
    return out * r + lin.bias, saturated


@pytest.mark.parametrize("adc_bits", [None, 6])
def test_fused_node_matches_a_plain_autograd_reference(adc_bits):
    # tiles of 32 rows on 96 inputs, 2.5σ clipping, 7-bit DAC with a learned range, and (6-bit case) an
    # ADC bound low enough that many outputs saturate: the fused node's gates must match autograd's.
    # (the reference above has no IR drop: tests/test_readside.py checks the IR drop and its gradient)
    cfg = al.AnalogConfig.from_profile("pcm", **{
        "tiling.rows": 40, "training.weight_noise": 0.0, "training.output_noise": 0.0, "dac.bits": 7,
        "adc.bits": adc_bits, "adc.bound": 1.5, "ir_drop.wire_resistance": 0.0})
    lin = layer(cfg)
    al.set_mode(lin, "hwa")
    torch.manual_seed(1)
    x = (torch.randn(64, 96) * 2).requires_grad_(True)
    with torch.no_grad():
        lin.analog.input_range.fill_(3.0)  # some inputs clip
        lin.analog.mark_range_set()
    g = torch.randn(64, 40)
    y = lin(x)
    grads = torch.autograd.grad(y, [x, lin.weight, lin.bias, lin.analog.input_range], g)
    y_ref, saturated = _reference(lin, x, cfg)
    ref = torch.autograd.grad(y_ref, [x, lin.weight, lin.bias, lin.analog.input_range], g)
    assert lin.analog.tiles == 3
    assert torch.allclose(y, y_ref, atol=1e-4)
    assert (saturated > 100) == (adc_bits is not None)  # the gated backward path is really exercised
    for name, a, b in zip(["x", "weight", "bias"], grads[:3], ref[:3]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), name
    if adc_bits is None:  # without an ADC the range gradient is exact; with one it differs by rounding terms
        assert torch.allclose(grads[3], ref[3], rtol=1e-3)


def test_chip_path_passes_the_realised_matrix_gradient_to_the_input():
    # LoRA-on-chip trains adapters *through* the frozen chip: the input gradient is g · W_chip (inside the
    # DAC range, no ADC saturation), with W_chip the matrix this chip instance realises.
    cfg = al.AnalogConfig.from_profile("pcm", **{"tiling.rows": 40, "device.read_noise_scale": 0.0,
                                                 "output.noise": 0.0, "adc.bound": 1e3})
    lin = layer(cfg)
    lin.eval()
    with torch.no_grad():
        lin.analog.input_range.fill_(10.0)
        lin.analog.mark_range_set()
    lin.analog.program(lin.weight, seed=3, seconds=3600.0)
    x = torch.randn(16, 96, requires_grad=True)
    g = torch.randn(16, 40)
    (gx,) = torch.autograd.grad(lin(x), [x], g)
    assert torch.allclose(gx, g @ lin.analog.realised_weight(lin.weight), atol=1e-5)
    assert not torch.allclose(gx, g @ lin.weight.detach(), atol=1e-3)  # the chip's matrix, not the digital one
