"""Block-by-block loading onto the chip (analogllm.hf.streaming) and layer-by-layer export.

The streamed model must be the model that loading whole, mapping and deploying give, chip for chip,
while never holding more than one decoder block of digital weights.
"""

from __future__ import annotations

import json

import pytest
import torch

import analogllm as al
from analogllm.chip import program as chip_program
from analogllm.chip.state import is_freed
from analogllm.cli import main
from analogllm.data import calibration_blocks
from analogllm.export import export_map
from analogllm.hf.models import load_model
from analogllm.hf.streaming import Checkpoint, decoder_blocks, stream_deploy
from analogllm.ops.noise import seeded

DAY = 86400.0


def _saved(tmp_path, name: str, shard: str | None = None):
    model, tok = load_model(name)
    folder = tmp_path / name
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(folder)
    return folder, tok


def _logits(model, ids):
    with torch.no_grad(), seeded(5):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mamba"])
def test_a_streamed_chip_is_the_chip_of_the_model_loaded_whole(tmp_path, name):
    # llama: residual rotation applied outside the blocks and per block; gpt2: a tied LM head and Conv1D;
    # mamba: a weight-side layer saved under its plain name
    folder, tok = _saved(tmp_path, name)
    calibration = calibration_blocks(tok, count=2)
    # block-by-block loading serves no KV prefix (its report says so), so the whole model goes without one
    config = al.AnalogConfig.from_profile("pcm", kv_prefix=[])
    whole, _ = load_model(str(folder))
    al.analogize_(whole, config, calibration=calibration)
    al.deploy_(whole, seed=3, seconds=DAY)
    streamed = stream_deploy(folder, config, seed=3, seconds=DAY, calibration=calibration)
    assert chip_program.deployed(streamed)
    assert not any(p.is_meta for p in streamed.parameters())
    chips = {n: m.chip for n, m, _ in al.analog_matrices(whole)}
    for n, m, w in al.analog_matrices(streamed):
        assert torch.equal(m.chip.tiles, chips[n].tiles), n
        assert torch.equal(m.chip.gain, chips[n].gain), n
        assert is_freed(w), n
    ids = calibration[:1, :32]
    assert torch.equal(_logits(streamed, ids), _logits(whole, ids))
    a, b = whole.analog_report.mapping, streamed.analog_report.mapping
    assert set(a.ranges) == set(b.ranges) and sorted(a.online) == sorted(b.online)
    assert all(a.ranges[k].dac_range == b.ranges[k].dac_range for k in a.ranges)


def test_streaming_holds_one_block_of_digital_weights_at_a_time(tmp_path, monkeypatch):
    folder, tok = _saved(tmp_path, "tiny-llama", shard="40KB")  # an indexed set of shards
    assert (folder / "model.safetensors.index.json").is_file()
    seen = []
    real = chip_program.deploy_matrices_

    def watch(module, seed=0, seconds=0.0):
        blocks = decoder_blocks(model_ref[0])[1] if model_ref else []
        # digital weights of analogue layers that are neither meta (not read yet) nor freed (deployed)
        live = [i for i, b in enumerate(blocks)
                if any(not w.is_meta and not is_freed(w) for _, _, w in al.analog_matrices(b))]
        seen.append(live)
        return real(module, seed, seconds)

    model_ref = []
    import analogllm.hf.streaming as streaming

    real_blocks = streaming.decoder_blocks

    def remember(model):
        model_ref.append(model)
        return real_blocks(model)

    monkeypatch.setattr(streaming, "decoder_blocks", remember)
    monkeypatch.setattr(chip_program, "deploy_matrices_", watch)
    model = stream_deploy(folder, "pcm", calibration=calibration_blocks(tok, count=2))
    n = len(decoder_blocks(model)[1])
    # one call per block, each with only that block read, and a last one for the model (nothing live)
    assert seen == [[i] for i in range(n)] + [[]]


def test_streaming_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        stream_deploy(tmp_path, "pcm")
    folder, _ = _saved(tmp_path, "tiny-qwen3-moe")  # experts saved per expert, not under the module's names
    with pytest.raises(KeyError, match="Load this model whole instead"):
        stream_deploy(folder, "pcm")
    folder, _ = _saved(tmp_path, "tiny-llama")
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    ckpt = Checkpoint(folder)
    last = max(ckpt.entries, key=lambda k: ckpt.entries[k][2]["data_offsets"][1])
    with pytest.raises(ValueError, match="truncated"):
        ckpt.get(last)


def test_cli_generate_streams_a_saved_model(tmp_path, capsys):
    folder, _ = _saved(tmp_path, "tiny-llama")
    argv = ["generate", str(folder), "--stream", "--prompt", "The", "--max-new-tokens", "4", "--calibration-blocks", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "chip 0 at t = 0 s (pcm)" in out and "4 tokens in" in out
    assert main(argv + ["--compare"]) == 2
    assert "nothing to --compare" in capsys.readouterr().err
    assert main(["generate", "tiny-llama", "--stream"]) == 2
    assert "--stream needs a folder" in capsys.readouterr().err


def test_export_writes_layer_by_layer_without_keeping_chips(tmp_path):
    model, tok = load_model("tiny-llama")
    al.analogize_(model, "pcm", calibration=calibration_blocks(tok, count=2))
    twin, _ = load_model("tiny-llama")
    al.analogize_(twin, "pcm", calibration=calibration_blocks(tok, count=2))
    al.program_(model, seed=4, lazy=True)  # which chip, realised only as each layer is written
    al.program_(twin, seed=4)
    assert not any(m.chip.programmed for _, m, _ in al.analog_matrices(model))
    export_map(model, tmp_path / "lazy", progress=False)
    export_map(twin, tmp_path / "held", progress=False)
    assert not any(m.chip.programmed for _, m, _ in al.analog_matrices(model))  # nothing left behind
    assert all(m.chip.programmed for _, m, _ in al.analog_matrices(twin))  # what was held stays held
    lazy = json.loads((tmp_path / "lazy" / "manifest.json").read_text())["layers"]
    held = json.loads((tmp_path / "held" / "manifest.json").read_text())["layers"]
    assert [(r["sha256"], r["gain"], r["seed"]) for r in lazy] == [(r["sha256"], r["gain"], r["seed"]) for r in held]
    ids = calibration_blocks(tok, count=1)[:, :32]
    assert torch.equal(_logits(model, ids), _logits(twin, ids))  # realised on first use: the same chip


def test_a_deployed_block_keeps_no_digital_weight_alive(tmp_path, monkeypatch):
    """Once a block is deployed nothing may still reference the digital weights read for it (else a
    streamed load peaks at the chip plus the digital model): checked while the next blocks load."""
    import gc
    import weakref

    import analogllm.hf.streaming as streaming

    folder, tok = _saved(tmp_path, "tiny-llama")
    refs: dict[str, list] = {}
    deployed_blocks: list[str] = []
    leaks = []
    real_load, real_deploy = streaming._Reader.load, chip_program.deploy_matrices_

    def load(self, module, prefix, recurse=True):
        loaded = real_load(self, module, prefix, recurse)
        refs.setdefault(prefix, []).extend(weakref.ref(sub._parameters[pname]) for sub, pname in loaded
                                           if isinstance(sub, al.AnalogLinear) and pname == "weight")
        return loaded

    def deploy(module, seed=0, seconds=0.0):
        out = real_deploy(module, seed, seconds)
        gc.collect()
        leaks.extend(b for b in deployed_blocks if any(r() is not None for r in refs[b]))
        prefix = next((p for p in refs if p.startswith("model.layers.") and refs[p] and p not in deployed_blocks), None)
        if prefix is not None:
            deployed_blocks.append(prefix)
        return out

    monkeypatch.setattr(streaming._Reader, "load", load)
    monkeypatch.setattr(chip_program, "deploy_matrices_", deploy)
    stream_deploy(folder, "pcm", calibration=calibration_blocks(tok, count=2))
    assert len(deployed_blocks) == 2 and not leaks, (deployed_blocks, leaks)
