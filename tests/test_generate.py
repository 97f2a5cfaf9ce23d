"""Generation on a programmed chip: ``model.generate`` with the KV cache reads the same chip as a full
forward (every family), the read noise of a generation follows its seed, and ``analogllm generate``."""

import pytest
import torch

import analogllm as al
from analogllm.cli import main
from analogllm.data import token_blocks
from analogllm.eval.generation import generate
from analogllm.hf.models import TINY_MODELS, load_model

NOISE_FREE = {"device.read_noise_scale": 0.0, "output.noise": 0.0}  # a deterministic (but programmed) chip


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_cached_generation_reads_the_same_chip_as_a_full_forward(name):
    model, tok = load_model(name)
    ids = token_blocks(tok, split="validation", block_size=16, max_blocks=1)[:, :8]
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", **NOISE_FREE))
    al.program_(model, seed=0, seconds=86400)
    model.eval()
    logits = {}
    with torch.no_grad():
        for hw in ("chip", "digital"):
            with al.mode(model, hw):
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                     use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
                cached = torch.stack(out.logits, 1)  # one step per new token, through the KV / state cache
                full = model(out.sequences).logits[:, ids.shape[1] - 1 : -1]
                assert out.sequences.shape[1] == ids.shape[1] + 6
                assert ((cached - full).norm() / full.norm()).item() < 1e-5
                logits[hw] = full
    # and it is the chip that generated: programming noise, drift and converters move the logits
    assert ((logits["chip"] - logits["digital"]).norm() / logits["digital"].norm()).item() > 1e-3


def test_generation_read_noise_follows_its_seed():
    model, tok = load_model("tiny-llama")
    al.analogize_(model, "pcm")
    al.program_(model, seed=0)
    model.eval()
    before = torch.random.get_rng_state()
    a = generate(model, tok, "The", 12, sample=True, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    assert generate(model, tok, "The", 12, sample=True, seed=3)[0] == a[0]
    assert {generate(model, tok, "The", 12, sample=True, seed=s)[0] for s in (4, 5, 6)} != {a[0]}
    assert 1 <= a[1] <= 12 and a[2] > 0  # (sampling may end at EOS)


def test_cli_generate_prints_text_and_speed(capsys):
    argv = ["generate", "tiny-llama", "--prompt", "The", "--max-new-tokens", "5", "--calibration-blocks", "2",
            "--seconds", "86400", "--compare"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "chip 0 at t = 86400 s (pcm)" in out and "5 tokens in" in out and "chip / digital speed" in out
    assert main(["generate", "tiny-llama", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
