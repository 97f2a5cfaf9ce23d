"""Save → load restores the same analogue model and chip; CLI convert; bad input leaves no files."""

import json

import pytest
import torch

import analogllm as al
from analogllm.cli import main
from analogllm.hf.models import load_model
from analogllm.hf.checkpoint import CONFIG_NAME, from_pretrained, save_pretrained


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mamba", "tiny-qwen3-moe"])
def test_save_load_gives_identical_outputs_for_the_same_chip(name, tmp_path):
    model, tok = load_model(name)
    al.analogize_(model, "pcm")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids)  # initialises the learned DAC ranges from data
    al.program_(model, seed=7)
    al.drift_(model, 3600)
    model.eval()
    torch.manual_seed(1)
    before = model(input_ids=ids).logits
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert meta["chip"] == {"seed": 7, "seconds": 3600.0}
    loaded = from_pretrained(tmp_path / "ckpt")
    torch.manual_seed(1)
    after = loaded(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_loading_a_digital_checkpoint_is_a_clear_error(tmp_path):
    model, _ = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="not an analogue checkpoint"):
        from_pretrained(tmp_path / "plain")


def test_cli_profiles_and_convert(tmp_path, capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "pcm" in out and "photonic" in out and "512×512" in out
    assert main(["convert", "tiny-qwen3", "--profile", "pcm", "--set", "adc.bits=6", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "| analog" in out and "embedding" in out
    model = from_pretrained(tmp_path / "c")
    assert model.analog_config.adc.bits == 6


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
    assert type(loaded).__name__ == "Phi3ForCausalLM" and loaded.analog_report.analog
