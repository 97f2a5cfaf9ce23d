"""Analogue checkpoints are Hugging Face checkpoints: save → load gives the same model and chip through
our functions and through transformers' own; the CLI convert; bad input leaves no files."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import analogllm as al
from analogllm.cli import main
from analogllm.hf.checkpoint import from_pretrained, is_analog_checkpoint, save_pretrained
from analogllm.hf.models import load_model
from analogllm.hf.quantizer import AnalogQuantizationConfig


def _programmed(name):
    model, tok = load_model(name)
    al.analogize_(model, "pcm")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)  # initialises the learned DAC ranges from data
    al.program_(model, seed=7)
    al.drift_(model, 3600)
    return model, tok, ids


def _logits(model, ids):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mamba", "tiny-qwen3-moe"])
def test_save_load_gives_identical_outputs_for_the_same_chip(name, tmp_path):
    model, tok, ids = _programmed(name)
    before = _logits(model, ids)
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    q = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "analogllm" and q["chip"] == {"seed": 7, "seconds": 3600.0}
    loaded = from_pretrained(tmp_path / "ckpt")
    assert torch.equal(before, _logits(loaded, ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_transformers_own_save_and_load_round_trip_the_analogue_model(tmp_path):
    model, _, ids = _programmed("tiny-llama")
    before = _logits(model, ids)
    model.save_pretrained(tmp_path / "hf")  # HF's own method, nothing of ours
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "AnalogLinear" and layer.analog.chip.seed == 7  # not the digital model
    assert torch.equal(before, _logits(loaded, ids))


def test_quantization_config_at_load_converts_a_digital_checkpoint(tmp_path):
    model, _ = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "plain")
    analog = AutoModelForCausalLM.from_pretrained(
        tmp_path / "plain", quantization_config=AnalogQuantizationConfig(profile="pcm", overrides={"adc.bits": 6}))
    assert analog.analog_config.adc.bits == 6
    assert type(analog.model.layers[1].mlp.down_proj).__name__ == "AnalogLinear"
    torch.testing.assert_close(analog.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


def test_a_deployed_model_refuses_to_save_with_the_reason(tmp_path):
    model, _, _ = _programmed("tiny-llama")
    al.deploy_(model, seed=7)
    with pytest.raises(ValueError, match="deploy_"):
        model.save_pretrained(tmp_path / "hf")  # no silently written all-zero weights
    with pytest.raises(ValueError, match="deploy_"):
        save_pretrained(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_loading_a_digital_checkpoint_is_a_clear_error(tmp_path):
    model, _ = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="not an analogue checkpoint"):
        from_pretrained(tmp_path / "plain")


def test_load_model_of_an_analogue_checkpoint_is_the_analogue_model(tmp_path):
    model, tok, ids = _programmed("tiny-llama")
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    loaded, _ = load_model(str(tmp_path / "ckpt"))
    assert getattr(loaded, "analog_config", None) is not None
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))


def test_cli_profiles_and_convert(tmp_path, capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "pcm" in out and "photonic" in out and "512×512" in out
    assert main(["convert", "tiny-qwen3", "--profile", "pcm", "--set", "adc.bits=6", "--calibration-blocks", "0",
                 "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "| analog" in out and "embedding" in out
    model = from_pretrained(tmp_path / "c")
    assert model.analog_config.adc.bits == 6
    assert main(["convert", "tiny-qwen3", "--profile", "pcm", "--calibration-blocks", "0",
                 "--out", str(tmp_path / "c")]) == 0  # an earlier checkpoint may be replaced
    assert is_analog_checkpoint(tmp_path / "c")


def test_convert_never_deletes_a_foreign_output_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["convert", "tiny-llama", "--calibration-blocks", "0", "--out", str(out)]) == 2
    assert "not an analogue checkpoint" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "no-such-model-anywhere", "--profile", "pcm"], "no-such-model-anywhere"),
        (["convert", "tiny-llama", "--profile", "nope"], "unknown profile 'nope'"),
        (["convert", "tiny-llama", "--set", "adc.bits=-2"], "adc.bits"),
        (["convert", "tiny-llama", "--set", "tiling.rowz=3"], "tiling.rowz"),
    ],
)
def test_cli_bad_input_is_one_clear_line_and_no_output(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out_dir = tmp_path / "out"
    assert main([*args, "--out", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []


def test_convert_from_a_local_pretrained_path(tmp_path, capsys):
    model, tok = load_model("tiny-phi3")
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--profile", "rram", "--out", str(tmp_path / "analog")]) == 0
    loaded = from_pretrained(tmp_path / "analog")
    assert loaded.analog_config.device.kind == "rram"
    assert type(loaded).__name__ == "Phi3ForCausalLM"
    assert type(loaded.model.layers[0].self_attn.qkv_proj).__name__ == "AnalogLinear"
