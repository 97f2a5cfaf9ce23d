"""Training-free mapping: every step is exact on the ideal profile, and each lowers the chip's error."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import analogllm as al
from analogllm.config import ConfigError
from analogllm.data import token_blocks
from analogllm.hf.checkpoint import from_pretrained, save_pretrained
from analogllm.hf.models import TINY_MODELS, load_model
from analogllm.mapping.clip import clip_columns_
from analogllm.mapping.error import LayerModel, device_variance
from analogllm.mapping.ranges import best_ranges, layer_model
from analogllm.ops.hadamard import Rotation, factor, fwht, hadamard_matrix
from analogllm.ops.noise import seeded

ALL_STEPS = {"mapping.rotate": True, "mapping.rescale": True, "mapping.ranges": "error", "mapping.adc": "tile"}


def _blocks(tok, split, n, size=64):
    return token_blocks(tok, split=split, block_size=size, max_blocks=n)


@pytest.mark.parametrize("n", [12, 20, 36, 64, 576, 1536, 768])
def test_hadamard_orders_are_orthogonal_and_fast_transform_matches_dense(n):
    h = hadamard_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))  # a true Hadamard matrix: entries ±1
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ h / math.sqrt(n), atol=1e-12)
    assert torch.allclose(fwht(x, transpose=True), x @ h.T / math.sqrt(n), atol=1e-12)  # Paley factors: H ≠ Hᵀ
    rot = Rotation(n, seed=1)
    assert torch.allclose(rot.inverse(x), x @ rot.matrix().T, atol=1e-12)


@pytest.mark.parametrize("n", [64, 100])  # fast Hadamard and the dense fallback
def test_exact_rotation_block_by_block_matches_the_dense_matrix(n, monkeypatch):
    import analogllm.ops.hadamard as hadamard

    monkeypatch.setattr(hadamard, "_BLOCK", 3 * n)  # 3 rows a block: 10 rows span four blocks, the last partial
    rot, x = Rotation(n, seed=2), torch.randn(10, n, dtype=torch.float64)
    q = rot.matrix()
    assert torch.allclose(rot.exact(x), x @ q, atol=1e-12)
    assert torch.allclose(rot.exact(x, transpose=True), x @ q.T, atol=1e-12)
    w = x.float().clone()
    assert rot.exact(w, out=w) is w and torch.allclose(w.double(), x @ q, atol=1e-5)  # in place, float32
    wt = x.float().T.clone().T  # a transposed (non-contiguous) destination
    rot.exact(wt, out=wt)
    assert torch.allclose(wt.double(), x @ q, atol=1e-5)


def test_rotation_falls_back_to_a_dense_orthogonal_matrix():
    assert factor(100) is None  # 100 = 25·4 and 25 is no Hadamard order built here
    rot = Rotation(100, seed=3)
    q = rot.matrix()
    assert not rot.fast and torch.allclose(q @ q.T, torch.eye(100, dtype=q.dtype), atol=1e-12)
    x = torch.randn(4, 100)
    assert torch.allclose(rot(x).double(), x.double() @ q, atol=1e-5)
    assert torch.allclose(rot.inverse(rot(x)), x, atol=1e-5)
    assert rot.macs_per_token() == 100 * 100


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_every_mapping_step_is_exact_on_the_ideal_profile(name):
    model, tok = load_model(name)
    ids = _blocks(tok, "validation", 2)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    mapped = copy.deepcopy(model)
    al.analogize_(mapped, al.AnalogConfig.from_profile("ideal", **ALL_STEPS), calibration=_blocks(tok, "train", 8))
    report = mapped.analog_report.mapping
    with torch.no_grad():
        out = mapped(input_ids=ids).logits
    assert (out - ref).abs().max().item() < 1e-5
    assert len(report.ranges) > 0
    if model.config.model_type in ("llama", "qwen3", "phi3"):
        assert report.rotation is not None  # the residual stream really was rotated
        head = mapped.get_output_embeddings().weight
        assert not torch.allclose(head, model.get_output_embeddings().weight)


def _outlier_llama(scale=40.0):
    """tiny-llama with converter-hostile activations, the same function: a few residual channels are
    blown up in the norm weights (their readers' columns divided back), and a few MLP channels in up_proj
    (down_proj's columns divided back), as pretrained LLMs have them."""
    model, tok = load_model("tiny-llama", seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, readers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                ch = torch.randperm(norm.weight.numel())[:3]
                norm.weight[ch] *= scale
                for lin in readers:
                    lin.weight[:, ch] /= scale
            ch = torch.randperm(layer.mlp.up_proj.out_features)[:3]
            layer.mlp.up_proj.weight[ch] *= scale
            layer.mlp.down_proj.weight[:, ch] /= scale
    return model, tok


def _chip_error(model, ids, ref, seed=0):
    al.program_(model, seed=seed)
    model.eval()
    with torch.no_grad(), seeded(seed):
        out = model(input_ids=ids).logits
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def outlier_model():
    model, tok = _outlier_llama()
    ids = _blocks(tok, "validation", 4)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    return model, tok, ids, ref


def _mapped_error(outlier_model, calibration=True, seed=0, **steps):
    model, tok, ids, ref = outlier_model
    m = copy.deepcopy(model)
    # each step's own effect: the profile's DAC headroom, measured correction and KV prefix (each measured
    # on SmolLM2 in docs/mapping.md) off, and the chip's logits compared with the unprefixed model's
    plain = {"mapping.dac_headroom": 1.0, "mapping.correction_rank": 0, "kv_prefix": []}
    cfg = al.AnalogConfig.from_profile("pcm", **{**plain, **steps})
    al.analogize_(m, cfg, calibration=_blocks(tok, "train", 8) if calibration else None)
    if not calibration:  # no mapping: the learned DAC ranges initialise from the first batch's abs-max
        with torch.no_grad():
            m.train()(input_ids=ids[:1])
    return _chip_error(m, ids, ref, seed)


def test_each_mapping_step_lowers_the_chip_error(outlier_model):
    plain = _mapped_error(outlier_model, calibration=False)
    none = {"mapping.rotate": False, "mapping.rescale": False, "mapping.online_rotation": []}
    ranges_only = _mapped_error(outlier_model, **none, **{"mapping.ranges": "error"})
    max_only = _mapped_error(outlier_model, **none, **{"mapping.ranges": "max", "mapping.adc": "none"})
    rescaled = _mapped_error(outlier_model, **{**none, "mapping.rescale": True})
    rotated = _mapped_error(outlier_model, **{**none, "mapping.rotate": True})
    everything = _mapped_error(outlier_model)
    # calibrated ranges beat abs-max ranges; rescaling and rotation each beat ranges alone, and so do all
    # steps together (measured: 1.16 unmapped, 0.99 abs-max, 0.23 ranges, 0.12 rescaled, 0.14 rotated, 0.13 all)
    assert ranges_only < 0.8 * max_only and ranges_only < 0.8 * plain
    assert rescaled < 0.8 * ranges_only
    assert rotated < 0.8 * ranges_only
    assert everything < 0.8 * ranges_only and everything < 0.2 * plain


def _probe_layer(w: torch.Tensor, cfg: al.AnalogConfig) -> al.AnalogLinear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return al.AnalogLinear.from_linear(lin, cfg, "probe")


def _set_ranges(layer: al.AnalogLinear, r: float, adc: torch.Tensor) -> None:
    with torch.no_grad():
        layer.analog.input_range.fill_(r)
        layer.analog.output_range.copy_(adc)
    layer.analog.mark_range_set()


def _chip_relative_error(layer: al.AnalogLinear, w: torch.Tensor, x: torch.Tensor, r: float,
                         adc: torch.Tensor) -> float:
    """The error model's score measured on chip 0: mean over tokens of |y − x Wᵀ|² / (|x Wᵀ|² + floor)."""
    _set_ranges(layer, r, adc)
    layer.analog.program(layer.weight, seed=0)
    layer.eval()
    with torch.no_grad(), seeded(1):
        y = layer(x)
    yd = x @ w.T
    sig = yd.square().sum(-1)
    return float(((y - yd).square().sum(-1) / (sig + 0.05 * sig.mean())).mean())


def test_error_model_predicts_the_layer_error_on_the_chip():
    torch.manual_seed(0)
    cfg = al.AnalogConfig.from_profile("pcm")
    x = torch.randn(512, 600) * torch.linspace(0.2, 3.0, 600)  # uneven channels, two 300-row tiles
    w = torch.randn(200, 600) / 25
    layer = _probe_layer(w, cfg)
    lm = LayerModel(x, w, layer.analog.tiles, layer.analog.rows, cfg, device_variance(cfg, 0.0))
    for k in (2.0, 4.0, 10.0):
        r = k * lm.rms
        adc = lm.best_adc(r, cfg.adc.bound, per_tile=True)
        measured = _chip_relative_error(layer, w, x, r, adc)
        assert measured == pytest.approx(lm.errors(r, adc).total, rel=0.25), k


def test_error_model_counts_saturation_on_several_tiles_coherently():
    # Massive-activation tokens (1 in 20) whose outputs saturate the ADCs of both 300-row tiles with the
    # same sign: the chip's error is the square of the summed tile errors, which the model must predict
    # (counting the tiles' saturation errors as independent predicts about half of it).
    torch.manual_seed(0)
    cfg = al.AnalogConfig.from_profile("pcm")
    d = torch.randn(600).sign()
    w = torch.randn(200, 600) / 25 + 0.03 * d * torch.randn(200, 1).sign()
    x = torch.randn(400, 600) / 6
    x[::20] = d  # at the DAC range 1 they fill it exactly, so only the ADCs cut them
    layer = _probe_layer(w, cfg)
    lm = LayerModel(x, w, layer.analog.tiles, layer.analog.rows, cfg, device_variance(cfg, 0.0))
    adc = torch.full((layer.analog.tiles,), float(cfg.adc.bound))
    predicted = lm.errors(1.0, adc)
    assert layer.analog.tiles == 2 and predicted.adc > 0.5 * predicted.total  # saturation dominates
    assert _chip_relative_error(layer, w, x, 1.0, adc) == pytest.approx(predicted.total, rel=0.2)
    # the ADCs are at full scale, so only a DAC range above the largest input shrinks those outputs
    best = best_ranges(lm, "error", "tile")
    assert best.dac_range > 1.2 * lm.amax and best.errors.total < 0.8 * predicted.total


def test_error_model_histogram_bins_match_a_binary_search():
    cfg = al.AnalogConfig.from_profile("pcm")
    lm = LayerModel(torch.randn(64, 600), torch.randn(50, 600), 2, 300, cfg, device_variance(cfg, 0.0))
    y = torch.cat([torch.rand(20000, dtype=torch.float64) * lm.edges[-1] * 1.1, lm.edges, torch.zeros(3, dtype=torch.float64)])
    expected = torch.bucketize(y, lm.edges, right=True).clamp(min=1) - 1  # bins 0..len-1 by lower edge
    assert torch.equal(lm._bin(y), expected)


def test_error_model_terms_equal_their_sums_written_out():
    # The error model's DAC, weight-noise and ADC-saturation terms against the docstring's sums computed
    # element by element (float64), so a faster evaluation cannot change what the mapping optimises.
    torch.manual_seed(0)
    cfg = al.AnalogConfig.from_profile("pcm")
    tiles, rows = 2, 300
    x = torch.randn(96, 600) * torch.linspace(0.2, 3.0, 600)
    x[::16, :3] *= 40  # outlier tokens: clipped at the DAC, saturating at the ADC
    w = torch.randn(50, 600) / 25
    var = device_variance(cfg, 0.0)
    lm = LayerModel(x, w, tiles, rows, cfg, var)
    xd, wd = x.double(), w.double()
    y = xd @ wd.T
    sig = y.square().sum(-1)
    tok = 1.0 / (sig + 0.05 * sig.mean())  # each token's weight: one over its floored output power
    step = 1.0 / (2 ** (cfg.dac.bits - 1) - 1)
    r = 3.0 * lm.rms
    parts = [(xd[:, t * rows:(t + 1) * rows], wd[:, t * rows:(t + 1) * rows]) for t in range(tiles)]
    y0 = [(xt @ wt.T).abs() / (wt.abs().amax(-1) * lm.rms) for xt, wt in parts]
    # a threshold just inside the bin below the median output: the histogram counts every value from
    # the bin's upper edge on, so the sum written out does too
    k = int(torch.searchsorted(lm.edges, torch.cat([y.flatten() for y in y0]).median()))
    c = 0.99 * float(lm.edges[k])
    dac = wts = sat = 0.0
    for (xt, wt), y in zip(parts, y0):
        m = wt.abs().amax(-1)
        wn = wt / m[:, None]
        q = torch.round((xt / r).clamp(-1, 1) / step) * step
        dac += float(tok @ (q - xt / r).square() @ (wn.square().T @ m.square()))
        wts += float(tok @ q.square() @ (var.lookup(wn.abs().float()).double().T @ m.square()))
        sat += float(tok @ ((y >= lm.edges[k]) * (y - c).square()) @ m.square())
    e = lm.errors(r, None)
    assert e.dac == pytest.approx(r * r * dac / len(x), rel=1e-4)
    assert e.weights == pytest.approx(r * r * wts / len(x), rel=1e-4)
    assert float(lm._saturation(torch.full((tiles,), float(c))).sum()) == pytest.approx(sat, rel=1e-4)


def test_error_calibration_beats_max_and_std_on_outlier_inputs():
    torch.manual_seed(0)
    cfg = al.AnalogConfig.from_profile("pcm")
    x = torch.randn(256, 512)
    x[::50, :4] *= 60  # rare outliers set the abs-max
    w = torch.randn(128, 512) / 22
    lm = LayerModel(x, w, 1, 512, cfg, device_variance(cfg, 0.0))
    err = best_ranges(lm, "error", "tile")
    assert err.errors.total < best_ranges(lm, "max", "tile").errors.total
    assert err.errors.total < best_ranges(lm, "std", "tile", std_alpha=3.0).errors.total
    assert err.adc_ranges[0] <= cfg.adc.bound  # an ADC range is never widened beyond full scale


def test_dac_headroom_widens_the_chosen_dac_range_and_keeps_the_adc_ranges():
    torch.manual_seed(0)
    cfg = al.AnalogConfig.from_profile("pcm")
    x = torch.randn(256, 600)
    x[::50, :4] *= 60
    lm = LayerModel(x, torch.randn(128, 600) / 22, 2, 300, cfg, device_variance(cfg, 0.0))
    plain, wide = best_ranges(lm, "error", "tile"), best_ranges(lm, "error", "tile", headroom=1.4)
    assert wide.dac_range == pytest.approx(1.4 * plain.dac_range)
    # the outputs shrink 1.4× below the ADC ranges chosen for the error model's own DAC range
    assert wide.adc_ranges == plain.adc_ranges and min(plain.adc_ranges) < cfg.adc.bound
    assert wide.errors == lm.errors(wide.dac_range, torch.tensor(plain.adc_ranges))
    assert wide.errors.total > plain.errors.total  # what the error model itself would not choose
    assert best_ranges(lm, "max", "tile", headroom=1.4).dac_range == pytest.approx(lm.amax)  # error method only
    with pytest.raises(ConfigError, match="mapping.dac_headroom"):
        al.AnalogConfig.from_profile("pcm", **{"mapping.dac_headroom": 0.0})


def test_mapping_applies_the_dac_headroom_to_every_layer_and_reports_it(outlier_model):
    model, tok, _, _ = outlier_model
    steps = {"mapping.clip": False, "mapping.compensate": False}
    mapped = {}
    for h in (1.0, 1.4):
        m = copy.deepcopy(model)
        al.analogize_(m, al.AnalogConfig.from_profile("pcm", **steps, **{"mapping.dac_headroom": h}),
                      calibration=_blocks(tok, "train", 8))
        mapped[h] = m
    layers = {h: {n: a for n, a in m.named_modules() if isinstance(a, al.nn.matrix.AnalogMatrix)} for h, m in mapped.items()}
    assert len(layers[1.0]) > 0
    for name, plain in layers[1.0].items():
        wide = layers[1.4][name]
        assert torch.allclose(wide.input_range, 1.4 * plain.input_range, rtol=1e-5), name
        assert torch.equal(wide.output_range, plain.output_range), name
    assert "1.4x the error model's" in mapped[1.4].analog_report.mapping.summary()
    assert "error model's" not in mapped[1.0].analog_report.mapping.summary()


def _layer_chip_error(cfg, w, x, target, seeds=range(4)):
    """A layer's relative output error against ``target`` on chips ``seeds``, at its best ranges."""
    layer = _probe_layer(w, cfg)
    choice = best_ranges(layer_model(layer.analog, w, x, 0.0), "error", "tile")
    _set_ranges(layer, choice.dac_range, torch.tensor(choice.adc_ranges))
    errs = []
    for s in seeds:
        layer.analog.program(layer.weight, seed=s)
        layer.eval()
        with torch.no_grad(), seeded(s):
            errs.append(float((layer(x) - target).norm() / target.norm()))
    return sum(errs) / len(errs)


def test_weight_clipping_lowers_the_chip_error_of_heavy_tailed_columns():
    torch.manual_seed(0)
    cfg = al.AnalogConfig.from_profile("pcm")
    x = torch.randn(512, 600) * torch.linspace(0.2, 3.0, 600)  # two 300-row tiles
    w = torch.distributions.StudentT(3.0).sample((200, 600)) / 40  # a few large weights per column
    layer = al.AnalogLinear.from_linear(torch.nn.Linear(600, 200, bias=False), cfg, "probe")
    clipped = w.clone()
    choice = clip_columns_(layer.analog, clipped, x, cfg.mapping.clip_fractions, 0.0)
    # every tile column's new max is one of the candidate fractions of its old max, and only weights
    # above it changed
    for t in range(2):
        cols = slice(300 * t, 300 * (t + 1))
        ratio = clipped[:, cols].abs().amax(-1) / w[:, cols].abs().amax(-1)
        grid = torch.tensor([1.0, *cfg.mapping.clip_fractions])
        assert (ratio[:, None] - grid).abs().min(-1).values.max() < 1e-6
        kept = w[:, cols].abs() <= clipped[:, cols].abs().amax(-1, keepdim=True)
        assert torch.equal(clipped[:, cols][kept], w[:, cols][kept])
    assert 0.0 < choice.clipped < 0.05 and choice.mean_fraction < 0.95
    assert choice.error < 0.9 * choice.error_unclipped
    # on the chip, against the unclipped digital layer (measured on 4 chips: 0.198 unclipped, 0.189 clipped)
    target = x @ w.T
    assert _layer_chip_error(cfg, clipped, x, target) < 0.97 * _layer_chip_error(cfg, w, x, target)


def test_weight_clipping_is_the_identity_on_the_ideal_profile():
    cfg = al.AnalogConfig.from_profile("ideal")
    w = torch.distributions.StudentT(3.0).sample((64, 128))
    layer = al.AnalogLinear.from_linear(torch.nn.Linear(128, 64, bias=False), cfg, "probe")
    clipped = w.clone()
    choice = clip_columns_(layer.analog, clipped, torch.randn(64, 128), cfg.mapping.clip_fractions, 0.0)
    assert torch.equal(clipped, w) and choice.mean_fraction == 1.0 and choice.clipped == 0.0


def test_mapping_with_weight_clipping_lowers_the_model_chip_error(outlier_model):
    # measured on 3 chips: 0.123 without clipping, 0.120 with
    errs = {clip: sum(_mapped_error(outlier_model, seed=s, **{"mapping.clip": clip}) for s in range(3)) / 3
            for clip in (False, True)}
    assert errs[True] < 0.99 * errs[False]


def test_mapped_checkpoint_round_trips(tmp_path, outlier_model):
    model, tok, ids, _ = outlier_model
    m = copy.deepcopy(model)
    al.analogize_(m, al.AnalogConfig.from_profile("pcm"), calibration=_blocks(tok, "train", 8))
    al.program_(m, seed=3)
    m.eval()
    save_pretrained(m, tmp_path / "ckpt", tokenizer=tok)
    back = from_pretrained(tmp_path / "ckpt")
    matrices = [mm for mm in back.modules() if isinstance(mm, al.nn.matrix.AnalogMatrix)]
    assert sum(mm.transform is not None for mm in matrices) > 0
    assert all(mm.moment is not None and mm.moment.diag.abs().sum() > 0 for mm in matrices)  # closed loop kept
    with torch.no_grad(), seeded(5):
        a = m(input_ids=ids).logits
    with torch.no_grad(), seeded(5):
        b = back(input_ids=ids).logits
    assert torch.equal(a, b)


def test_a_tied_digital_head_stays_tied_under_the_residual_rotation(tmp_path):
    base, tok = load_model("tiny-llama")
    base.config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(base.config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _blocks(tok, "validation", 2)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    params = sum(p.numel() for p in model.parameters())
    mapped = copy.deepcopy(model)
    al.analogize_(mapped, al.AnalogConfig.from_profile("ideal", **ALL_STEPS), calibration=_blocks(tok, "train", 8))
    with torch.no_grad():
        out = mapped(input_ids=ids).logits
    assert (out - ref).abs().max().item() < 1e-5
    rotation = mapped.analog_report.mapping.rotation
    assert rotation["online_tied_head"] and not rotation["untied_lm_head"]
    assert mapped.lm_head.weight is mapped.model.embed_tokens.weight  # no second vocabulary × hidden matrix
    assert torch.equal(mapped.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert sum(p.numel() for p in mapped.parameters()) == params
    assert not torch.equal(mapped.model.embed_tokens(ids), model.model.embed_tokens(ids))  # rotated online
    # a noisy chip round-trips through a checkpoint with the online rotation rebuilt
    chip = copy.deepcopy(model)
    al.analogize_(chip, al.AnalogConfig.from_profile("pcm"), calibration=_blocks(tok, "train", 8))
    al.program_(chip, seed=2)
    save_pretrained(chip, tmp_path / "ckpt", tokenizer=tok)
    back = from_pretrained(tmp_path / "ckpt")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad(), seeded(5):
        a = chip(input_ids=ids).logits
    with torch.no_grad(), seeded(5):
        b = back(input_ids=ids).logits
    assert torch.equal(a, b)


def test_calibration_capture_runs_analogue_attention_exactly():
    """The calibration pass sees the exact model's activations, analogue attention products included:
    with them on a noisy chip, the captured inputs equal those of the same model without them."""
    from analogllm.mapping.capture import capture_inputs

    model, tok = load_model("tiny-llama")
    blocks = _blocks(tok, "train", 4)
    captured = []
    for attention in (False, True):
        m = copy.deepcopy(model)
        al.analogize_(m, al.AnalogConfig.from_profile("pcm", analog_attention=attention))
        al.program_(m, seed=0)
        captured.append(capture_inputs(m, blocks, tokens=64, seed=0))
        assert not attention or any(hasattr(x, "analog_products") for x in m.modules())
    assert captured[0].keys() == captured[1].keys()
    for key, x in captured[0].items():
        assert torch.allclose(x, captured[1][key], atol=1e-6), key
