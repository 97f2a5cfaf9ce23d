"""Conversion of every supported model family: exactness (ideal), coverage (pcm), report, errors."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import analogllm as al
from analogllm.hf.models import TINY_MODELS, load_model
from analogllm.nn.matrix import AnalogMatrix

FAMILIES = [n for n in TINY_MODELS]


def inputs(model, n=2, t=24):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (n, t), generator=gen)


@pytest.mark.parametrize("name", FAMILIES)
def test_ideal_profile_reproduces_digital_logits(name):
    model, _ = load_model(name)
    model.eval()
    ids = inputs(model)
    with torch.no_grad():
        digital = model(input_ids=ids).logits
    al.analogize_(model, "ideal")
    al.program_(model, seed=0)
    assert model.analog_report.analog, "nothing was converted"
    with torch.no_grad():
        analog = model(input_ids=ids).logits
    assert (analog - digital).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_every_weight_matmul_runs_through_the_analogue_path(name):
    model, _ = load_model(name)
    model.eval()
    ids = inputs(model, n=4, t=32)
    with torch.no_grad():
        digital = model(input_ids=ids).logits
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", **{"tiling.rows": 32}))
    # nothing that carries a matmul weight is left behind, except what the config excludes
    head = model.get_output_embeddings()
    leftovers = [n for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D) and m is not head
                 and not hasattr(m, "parametrizations")]
    assert leftovers == []
    assert type(head) is nn.Linear  # the LM head (``lm_head``, RWKV's ``head``) stays digital by default
    calls = {}
    for n, m in model.named_modules():
        if isinstance(m, AnalogMatrix):
            calls[n] = 0
            m.register_forward_hook(lambda mod, args, out, n=n: calls.__setitem__(n, calls[n] + 1))
    reads = {}
    for n, m in model.named_modules():
        if type(m).__name__ == "AnalogWeight":
            reads[n] = 0
            m.register_forward_hook(lambda mod, args, out, n=n: reads.__setitem__(n, reads[n] + 1))
    with torch.no_grad():
        analog = model(input_ids=ids).logits
    unused = [n for n, c in calls.items() if c == 0 and not n.endswith("parametrizations.weight.0.analog")]
    assert unused == [], f"analogue matrices never used in a forward pass: {unused}"
    assert all(c > 0 for c in reads.values())
    assert torch.isfinite(analog).all()
    assert (analog - digital).abs().max() > 1e-3  # the chip is not the digital model
    rows = {r[0]: r for r in model.analog_report.rows}
    assert any(r[3] == "digital" and "embedding" in r[4] for r in rows.values())
    assert "digital" in model.analog_report.table() and "analog" in model.analog_report.table()


def test_family_specific_adapters():
    gpt2, _ = load_model("tiny-gpt2")
    al.analogize_(gpt2, "pcm")
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, al.AnalogConv1D)
    mamba, _ = load_model("tiny-mamba")
    al.analogize_(mamba, "pcm")
    mixer = mamba.backbone.layers[0].mixer
    assert hasattr(mixer.dt_proj, "parametrizations")  # read directly by the model: weight-side physics
    kinds = {r[0]: r[3] for r in mamba.analog_report.rows}
    assert kinds["backbone.layers.0.mixer.dt_proj"] == "weight-side"
    assert kinds["backbone.layers.0.mixer.conv1d"] == "digital"
    moe, _ = load_model("tiny-qwen3-moe")
    al.analogize_(moe, "pcm")
    experts = [r for r in moe.analog_report.rows if r[4] == "experts"]
    assert experts and all(r[3] == "analog" for r in experts)


def test_mamba_weight_side_physics_changes_the_model():
    model, _ = load_model("tiny-mamba")
    model.eval()
    ids = inputs(model)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    al.analogize_(model, "pcm", include=[r"dt_proj"])
    with torch.no_grad():
        noisy = model(input_ids=ids).logits
    assert (noisy - base).abs().max() > 1e-4  # a module swap alone would change exactly nothing here


def test_include_exclude_and_double_conversion():
    model, _ = load_model("tiny-llama")
    al.analogize_(model, "pcm", include=[r"mlp"], exclude=[r"down_proj", "lm_head"])
    analog = model.analog_report.analog
    assert analog and all("mlp" in n and "down_proj" not in n for n in analog)
    with pytest.raises(ValueError, match="already analogue"):
        al.analogize_(model, "pcm")


def test_hwa_mode_injects_training_noise_and_chip_mode_is_the_chip():
    model, _ = load_model("tiny-llama")
    al.analogize_(model, "pcm")
    ids = inputs(model)
    al.set_mode(model, "hwa")
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(a, b)
    al.program_(model, seed=5)
    al.set_mode(model, "chip")
    model.train()  # .training no longer picks the hardware mode: still the same chip below
    torch.manual_seed(0)
    c = model(input_ids=ids).logits
    torch.manual_seed(0)
    d = model(input_ids=ids).logits
    assert torch.equal(c, d)  # same chip, same read-noise draw
    al.program_(model, seed=6)
    torch.manual_seed(0)
    assert not torch.allclose(model(input_ids=ids).logits, c)
    al.drift_(model, 86400)
    assert al.chip_info(model) == {"seed": 6, "seconds": 86400.0}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen3-next"])
def test_optional_analogue_attention_products(name):
    model, _ = load_model(name)
    model.eval()
    ids = inputs(model)
    with torch.no_grad():
        digital = model(input_ids=ids).logits
    exact = al.AnalogConfig.from_profile("ideal").set("analog_attention", True)
    al.analogize_(model, exact)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - digital).abs().max().item() < 1e-5
    quantised, _ = load_model(name)
    quantised.eval()
    al.analogize_(quantised, exact.set("dac.bits", 4).set("adc.bits", 6).set("exclude", ["proj|fc|c_|lm_head|gate|experts"]))
    with torch.no_grad():
        out = quantised(input_ids=ids).logits
    assert not quantised.analog_report.analog, quantised.analog_report.analog  # only attention is analogue
    assert (out - digital).abs().max().item() > 1e-4
    assert torch.isfinite(out).all()
