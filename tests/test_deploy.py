"""deploy_: a model that keeps only its chip reads exactly like the programmed one, holds no digital
analogue weights, and refuses everything that would need them."""

import pytest
import torch

import analogllm as al
from analogllm.chip import calibrate_
from analogllm.chip.state import FreedWeight
from analogllm.data import token_blocks
from analogllm.hf.models import load_model
from analogllm.hf.checkpoint import save_pretrained
from analogllm.tuners import lora
from analogllm.training.finetune import TrainSection, train_adapters
from analogllm.tuners.pat import on_hardware
from analogllm.tuners.zeroth_order import ZerothOrderConfig

DAY = 86400.0


def _calibrated(name="tiny-llama", profile="pcm"):
    model, tok = load_model(name)
    al.analogize_(model, al.AnalogConfig.from_profile(profile))
    ids = token_blocks(tok, block_size=32, split="validation", max_blocks=4)
    calibrate_(model, ids[:2], seed=0)
    return model, ids


def _logits(model, ids):
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)  # the same read noise
        return model(ids).logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_deployed_model_reads_like_the_programmed_one_and_holds_only_the_chip(name):
    model, ids = _calibrated(name)
    al.program_(model, seed=3, seconds=DAY)
    reference = _logits(model, ids)
    digital_bytes = sum(w.untyped_storage().nbytes() for _, _, w in al.analog_matrices(model))
    al.deploy_(model, seed=3, seconds=DAY)
    assert torch.equal(_logits(model, ids), reference)
    for _, matrix, weight in al.analog_matrices(model):
        assert matrix.chip.deployed
        assert isinstance(weight.data, FreedWeight) or isinstance(weight, FreedWeight)  # no storage, shape kept
        assert weight.shape == (matrix.chip.scale.shape[-1], matrix.in_features) or weight.dim() == 3
    assert digital_bytes > 100_000
    assert al.chip_info(model) == {"seed": 3, "seconds": DAY}


@pytest.mark.parametrize("mode", ["backprop", "zeroth-order"])
def test_deployed_chip_still_trains_adapters(mode):
    model, ids = _calibrated()
    al.deploy_(model, seed=0, seconds=DAY)
    peft_model = lora.attach_lora(model)
    start = {n: p.detach().clone() for n, p in lora.adapter_parameters(peft_model)}
    info = train_adapters(peft_model, mode, ids, TrainSection(steps=2, batch_size=2, lr=1e-2, seed=0),
                          ZerothOrderConfig(steps=2, lr=0.3, eps=0.05, directions=1, noise_probe=0))
    moved = [n for n, p in lora.adapter_parameters(peft_model) if not torch.equal(p, start[n])]
    assert moved and info["steps"] == 2
    assert all(torch.isfinite(p).all() for _, p in lora.adapter_parameters(peft_model))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-moe"])
def test_deploy_frees_each_digital_weight_as_its_chip_is_realised(name, monkeypatch):
    """The peak of deploy_ is the model plus one layer's chip: when a matrix is programmed, every matrix
    programmed before it has given its digital weight up already."""
    model, _ = _calibrated(name)
    names = [n for n, _, _ in al.analog_matrices(model)]
    live_at_program = []
    real = al.nn.matrix.AnalogMatrix.program

    def program(self, weight, *args, **kwargs):
        live_at_program.append(sum(not isinstance(w.data, FreedWeight) and not isinstance(w, FreedWeight)
                                   for _, _, w in al.analog_matrices(model)))
        return real(self, weight, *args, **kwargs)

    monkeypatch.setattr(al.nn.matrix.AnalogMatrix, "program", program)
    al.deploy_(model, seed=1)
    assert live_at_program == list(range(len(names), 0, -1))


def test_everything_that_needs_the_digital_weights_refuses(tmp_path):
    model, ids = _calibrated()
    al.deploy_(model, seed=0)
    for call in (lambda: al.drift_(model, DAY), lambda: al.program_(model, seed=1)):
        with pytest.raises(RuntimeError, match="deploy_"):
            call()
    with pytest.raises(RuntimeError, match="deploy_"):
        al.set_mode(model, "hwa")  # hardware-aware training needs the digital weights
    model.train()  # only dropout: a deployed model trained by an HF Trainer still reads its chip
    with torch.no_grad():
        assert torch.isfinite(model(ids[:1]).logits).all()
    model.eval()
    with pytest.raises(ValueError, match="deploy_"):
        save_pretrained(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(RuntimeError, match="deploy_"):
        al.export_map(model, tmp_path / "map", target="crossbar")
    assert not (tmp_path / "map").exists()
    peft_model = lora.attach_lora(model)
    peft_model.train()
    with pytest.raises(ValueError, match="digital twin"), on_hardware(peft_model):
        peft_model(input_ids=ids[:1], labels=ids[:1]).loss.backward()


def test_ideal_profile_has_nothing_to_deploy():
    model, _ = load_model("tiny-llama")
    al.analogize_(model, al.AnalogConfig.from_profile("ideal"))
    with pytest.raises(ValueError, match="nothing to deploy"):
        al.deploy_(model)
