"""Sharded hardware-aware training (FSDP2 and DeepSpeed ZeRO-3 over gloo, two real CPU processes).

One run of tiny-llama, 2 steps launched by ``torchrun`` (``train.fsdp: true``) and resumed to step 4 by
``accelerate launch --use_fsdp --fsdp_version 2`` from its sharded checkpoint, against one process on
the same global batch: each process held half of every analogue weight, the losses and everything
training changed (weights, norms, learned DAC ranges; gradient clipping and weight clamping on) are the
single process's, and ``OUTPUT/final`` is the ordinary analogue checkpoint. The same with ZeRO-3
(``train.zero3: true``, resumed by ``accelerate launch --use_deepspeed --zero_stage 3``).

Training noise is off (each process draws its own noise stream by design), and so is the converters'
rounding during training: with it a run is chaotic in the last float digit (a different summation
order of half batches moves an input across a rounding level, and within four steps 1e-7 grows to
1e-3, with data parallelism just the same), while without it the sharded run is the single process's
to 1e-5 and a real error (a gradient not averaged, a shard not clamped, a checkpoint not restored)
shows at once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml

import analogllm as al
from analogllm.cli import main
from analogllm.config.schema import ConfigError
from analogllm.hf.checkpoint import from_pretrained
from analogllm.hf.models import load_model
from analogllm.training.config import TrainSection, load_hwa_recipe
from analogllm.training.hwa import hwa_train
from analogllm.training.pipeline import blocks, load_base, run_train, to_analog

STEPS = 4
RECIPE = {
    "model": "tiny-llama",
    "analog": {"profile": "pcm", "calibration_blocks": 4,
               "overrides": {"training.weight_noise": 0.0, "training.output_noise": 0.0, "training.quantize": False,
                             "mapping.rescale": False, "mapping.ranges": "std", "mapping.std_alpha": 3.0}},  # quick; clips
    "data": {"block_size": 32, "max_train_blocks": 64},
    "train": {"steps": STEPS, "lr": 3e-3, "input_range_lr": 0.05, "batch_size": 2, "checkpoint_every": 2,
              "keep_checkpoints": 2, "freeze": ["embeddings"], "fsdp": True},
    "eval": {"max_blocks": 2, "chip_seeds": [0], "drift_times": [0]},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def platform():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available on this platform")


def _analog_weights(model) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, al.AnalogLinear)]


def _same_as_one_process(tmp_path, path, run: str, env, monkeypatch, kind: str):
    """The sharded run in ``tmp_path/run`` is the single-process run of the same recipe on the same global
    batch (2 processes x 2 blocks): every step's loss, then everything training changed (weights, norms,
    learned DAC ranges; gradient clipping and weight clamping on), to 0.1 %; ``OUTPUT/final`` is the
    ordinary analogue checkpoint. Returns the untrained converted model, its training blocks and recipe."""
    monkeypatch.setenv("ANALOGLLM_CACHE", env["ANALOGLLM_CACHE"])
    one = {"train.fsdp": False, "train.zero3": False}
    single = run_train(load_hwa_recipe(path, {**one, "train.batch_size": 4, "train.checkpoint_every": 0,
                                              "output_dir": str(tmp_path / "single")}), progress=False)
    reference = single.model
    analog = _analog_weights(reference)
    assert len(analog) == 14

    losses = json.loads((tmp_path / run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["losses"]
    assert losses == pytest.approx(list(single.result.losses), rel=1e-5, abs=0), (losses, single.result.losses)
    info = json.loads((tmp_path / run / "final" / "training.json").read_text())
    assert info["steps"] == STEPS and info["processes"] == 2 and info["sharded"] is True and info["sharding"] == kind
    assert info["tokens"] == (STEPS - 2) * 2 * 2 * 32  # this call's: steps 3 and 4, 2 processes x 2 blocks

    trained = from_pretrained(tmp_path / run / "final")  # the ordinary analogue checkpoint
    assert json.loads((tmp_path / run / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert trained.analog_report.analog and sorted(trained.analog_report.analog) == sorted(n[:-len(".weight")] for n in analog)
    assert trained.config.quantization_config.quant_method == "analogllm"
    got, want = trained.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    recipe = load_hwa_recipe(path, one)  # the converted model before training
    digital, tokenizer = load_base(recipe, progress=False)
    train = blocks(recipe, tokenizer, "train")
    untrained = to_analog(digital, recipe, train, progress=False)
    start = {k: v.clone() for k, v in untrained.state_dict().items()}
    ranges = [k for k in want if k.endswith("input_range")]
    assert len(ranges) == len(analog)
    for k in want:  # what training changed is the same in the sharded run as in one process, to 0.1 %
        err = float((got[k].float() - want[k].float()).norm())
        change = float((want[k].float() - start[k].float()).norm())
        assert err <= 1e-3 * change + 1e-7, (k, err, change)
        if k in analog or k in ranges:
            assert change > 1e-3, (k, change)  # it did train (the DAC ranges too)
    for _, matrix, weight in al.analog_matrices(trained):  # clamped piece by piece, to whole channels' bounds
        bound = matrix.config.training.clip_sigma * weight.std(-1, keepdim=True)
        assert (weight.abs() <= bound * 1.02 + 1e-7).all()
    al.program_(trained, seed=0)
    with torch.no_grad():
        assert torch.isfinite(trained(input_ids=torch.randint(0, 512, (1, 16))).logits).all()
    return untrained, train, recipe


def test_fsdp_run_shards_and_equals_one_process(platform, tmp_path, monkeypatch):
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path / "fsdp")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ANALOGLLM_CACHE": str(tmp_path / "cache")}
    env = {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}

    # steps 1-2 sharded by torchrun (train.fsdp: true), then 3-4 resumed by accelerate launch --use_fsdp
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "analogllm", "train", str(path), "--quiet", "--until", "2"]
    assert "trained steps 0→2 of 4 on 2 process(es)" in _launch(torchrun, env).stdout
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000002"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()),
              "-m", "analogllm", "train", str(path), "--quiet", "--resume", "--set", "train.fsdp=false"]
    assert "trained steps 2→4 of 4 on 2 process(es)" in _launch(launch, env).stdout

    # during training each process held (and checkpointed) its own half of every analogue weight
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(ckpt / "pytorch_model_fsdp_0")).read_metadata()
    analog = _analog_weights(from_pretrained(tmp_path / "fsdp" / "final"))
    assert len(analog) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    files = {(i.fqn, tuple(i.offset)): s.relative_path for i, s in meta.storage_data.items()}
    for name in analog:
        tensor = meta.state_dict_metadata[f"model.{name}"]
        chunks = sorted(tensor.chunks, key=lambda c: tuple(c.offsets))
        assert len(chunks) == 2, (name, chunks)
        assert [c.sizes[0] for c in chunks] == [tensor.size[0] // 2] * 2 and chunks[1].offsets[0] == tensor.size[0] // 2
        assert {files[(f"model.{name}", tuple(c.offsets))] for c in chunks} == {"__0_0.distcp", "__1_0.distcp"}
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()

    untrained, train, recipe = _same_as_one_process(tmp_path, path, "fsdp", env, monkeypatch, "fsdp")

    # its sharded checkpoints resume only a sharded run
    with pytest.raises(ConfigError, match=r"written by a sharded \(fsdp\) run; resume it with train\.fsdp: true"):
        hwa_train(untrained, train, recipe.train, output_dir=tmp_path / "fsdp", resume=True, progress=False)


def test_zero3_run_partitions_and_equals_one_process(platform, tmp_path, monkeypatch):
    """DeepSpeed ZeRO-3: steps 1-2 by torchrun (``train.zero3: true``), resumed to step 4 by ``accelerate
    launch --use_deepspeed --zero_stage 3`` from the engine's checkpoint; each process held half of
    every parameter (its flat fp32 partition in the checkpoint), and the run is the single process's."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'analogllm[zero3]')")
    path = tmp_path / "zero3.yaml"
    recipe = {**RECIPE, "train": {**RECIPE["train"], "fsdp": False, "zero3": True}, "output_dir": str(tmp_path / "zero3")}
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ANALOGLLM_CACHE": str(tmp_path / "cache")}
    env = {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "analogllm", "train", str(path), "--quiet", "--until", "2"]
    assert "trained steps 0→2 of 4 on 2 process(es)" in _launch(torchrun, env).stdout
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()),
              "-m", "analogllm", "train", str(path), "--quiet", "--resume", "--set", "train.zero3=false"]
    assert "trained steps 2→4 of 4 on 2 process(es)" in _launch(launch, env).stdout

    untrained, train, one = _same_as_one_process(tmp_path, path, "zero3", env, monkeypatch, "zero3")

    # each process checkpointed its own flat partition: half of every trainable parameter
    ckpt = tmp_path / "zero3" / "checkpoints" / "step-00000002" / "pytorch_model"
    trainable = sum(p.numel() for n, p in untrained.named_parameters() if "embed_tokens" not in n)
    held = []
    for rank in (0, 1):
        state = torch.load(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
        held.append(sum(t.numel() for t in state["optimizer_state_dict"]["fp32_flat_groups"]))
    assert abs(held[0] - held[1]) <= 64 and trainable <= sum(held) <= trainable + 64, (held, trainable)

    # its engine checkpoints resume only a ZeRO-3 run
    with pytest.raises(ConfigError, match=r"written by a sharded \(zero3\) run; resume it with train\.zero3: true"):
        hwa_train(untrained, train, one.train, output_dir=tmp_path / "zero3", resume=True, progress=False)


def test_fsdp_that_cannot_shard_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """One process has nothing to shard across, FSDP1 is not offered, the plain baseline converts after
    training: each is one error line naming what to change (exit status 2), before anything is loaded."""
    out = tmp_path / "never"
    assert main(["train", "quickstart", "--set", "train.fsdp=true", "--set", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "train.fsdp: sharding needs several processes" in err and "torchrun" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not out.exists()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --use_fsdp sets
    monkeypatch.setenv("FSDP_VERSION", "1")  # its default
    assert main(["train", "quickstart", "--set", f"output_dir={out}"]) == 2
    assert "--fsdp_version 2" in capsys.readouterr().err
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.delenv("FSDP_VERSION")
    with pytest.raises(ConfigError, match=r"train\.fsdp: sharded training needs hardware_aware: true"):
        load_hwa_recipe("quickstart", {"train.distill.enabled": False, "train.hardware_aware": False, "train.fsdp": True})
    # ZeRO-3 alike: one process, another ZeRO stage, and both engines at once
    assert main(["train", "quickstart", "--set", "train.zero3=true", "--set", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "train.zero3: sharding needs several processes" in err and "train.zero3=true" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch --use_deepspeed sets
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert main(["train", "quickstart", "--set", f"output_dir={out}"]) == 2
    assert "--zero_stage 3" in capsys.readouterr().err
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    assert main(["train", "quickstart", "--set", "train.fsdp=true", "--set", f"output_dir={out}"]) == 2
    assert "choose one" in capsys.readouterr().err and not out.exists()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    model, _ = load_model("tiny-llama")  # the library refuses too
    al.analogize_(model, "pcm")
    with pytest.raises(ConfigError, match=r"train\.fsdp: sharding needs several processes"):
        hwa_train(model, torch.randint(0, 512, (8, 16)), TrainSection(steps=1, batch_size=2, fsdp=True), progress=False)


def test_unsharded_cli_run_prints_no_deepspeed_warning(tmp_path):
    """With DeepSpeed installed, transformers' save_pretrained imports it on every run; its accelerator
    detection must not warn on a CPU run that never asked for it."""
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "analogllm", "train", "quickstart", "--quiet", "--set", "pretrain.steps=0",
                          "--set", "train.steps=1", "--set", f"output_dir={out}"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (out / "final").is_dir() and "Setting accelerator" not in run.stdout + run.stderr


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (FSDP over NCCL)")
def test_fsdp_run_shards_on_two_gpus(tmp_path):
    """The same sharded run on two GPUs (NCCL): each process holds half of every analogue weight in its
    checkpoint, and OUTPUT/final is the ordinary analogue checkpoint."""
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path / "fsdp")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env["ANALOGLLM_CACHE"] = str(tmp_path / "cache")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "analogllm", "train", str(path), "--quiet"]
    assert f"trained steps 0→{STEPS} of {STEPS} on 2 process(es)" in _launch(torchrun, env).stdout
    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "fsdp" / "checkpoints" / f"step-{STEPS:08d}"
    meta = dcp.FileSystemReader(str(ckpt / "pytorch_model_fsdp_0")).read_metadata()
    trained = from_pretrained(tmp_path / "fsdp" / "final")
    for name in _analog_weights(trained):
        assert len(meta.state_dict_metadata[f"model.{name}"].chunks) == 2, name
    al.program_(trained.cuda(), seed=0)
    with torch.no_grad():
        assert torch.isfinite(trained(input_ids=torch.randint(0, 512, (1, 16), device="cuda")).logits).all()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (ZeRO-3 over NCCL)")
def test_zero3_run_partitions_on_two_gpus(tmp_path):
    """The ZeRO-3 run on two GPUs (NCCL): each process wrote its own partition, and OUTPUT/final is the
    ordinary analogue checkpoint, which programs and reads on a GPU."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'analogllm[zero3]')")
    path = tmp_path / "zero3.yaml"
    recipe = {**RECIPE, "train": {**RECIPE["train"], "fsdp": False, "zero3": True}, "output_dir": str(tmp_path / "zero3")}
    path.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env["ANALOGLLM_CACHE"] = str(tmp_path / "cache")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "analogllm", "train", str(path), "--quiet"]
    assert f"trained steps 0→{STEPS} of {STEPS} on 2 process(es)" in _launch(torchrun, env).stdout
    ckpt = tmp_path / "zero3" / "checkpoints" / f"step-{STEPS:08d}" / "pytorch_model"
    assert all((ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file() for r in (0, 1))
    trained = from_pretrained(tmp_path / "zero3" / "final")
    al.program_(trained.cuda(), seed=0)
    with torch.no_grad():
        assert torch.isfinite(trained(input_ids=torch.randint(0, 512, (1, 16), device="cuda")).logits).all()
