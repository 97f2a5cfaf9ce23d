"""Model benchmark: an analogue LLM against the same digital LLM, side by side in one run.

    python scripts/bench_model.py                       # SmolLM2-135M when installed, else tiny-llama
    python scripts/bench_model.py --model tiny-qwen3 --profile rram

Reports, for a batch of ``--batch`` × ``--block`` tokens of the built-in corpus:

* eval tokens/s: digital forward vs the programmed analogue chip (pcm, one day of drift), timed
  round-robin in one process (median of ``--rounds``); programming the chip is timed once, apart;
* HWA train step: forward + backward + AdamW step (+ the in-place weight clamp HWA applies), the
  analogue model in ``train()`` mode with its training noise, the same parameters trainable in both
  (embeddings, norms and the LM head frozen, as in the HWA recipes);
* peak memory of each mode, measured in a fresh process per mode: peak resident set size (or
  ``torch.cuda.max_memory_allocated`` on GPU) over programming and two steps, after loading (the
  weights copied out of the checkpoint's memory map first, in every mode); analogue eval once with
  the digital weights kept (``program_``: the model can still reprogram, drift, train and export) and
  once deployed (``deploy_``: only the chip is kept);
* with ``--model FOLDER`` (a saved model), two more fresh processes: ``analog-streamed``, the peak over
  the whole pipeline from process start, a streamed load (:func:`analogllm.hf.streaming.stream_deploy`:
  built empty, each decoder block read from the safetensors, mapped with ``--calibration-blocks`` blocks
  of the built-in text, programmed and deployed in turn) and two eval steps; and ``analog-export``, the
  memory that writing the crossbar map adds to the loaded model (peak minus the resident size before
  export), against four times the largest analogue layer.

    python scripts/make_random_model.py --shape llama-3.2-1b --out runs/llama-3.2-1b-random
    python scripts/bench_model.py --model runs/llama-3.2-1b-random --memory-only --batch 1 \
        --modes digital-eval analog-deployed analog-streamed analog-export
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bench_config, machine, markdown, round_robin  # noqa: E402

import analogllm as al  # noqa: E402
from analogllm.data import token_blocks  # noqa: E402
from analogllm.hf.models import load_model  # noqa: E402
from analogllm.training.hwa import clamp_weights_, freeze_  # noqa: E402

DAY = 86400.0
MODES = ["digital-eval", "analog-eval", "analog-deployed", "digital-train", "analog-train"]
FOLDER_MODES = ["analog-streamed", "analog-export"]  # need --model FOLDER (a saved model)


def _default_model() -> str:
    try:
        load_model("smollm2-135m")
        return "smollm2-135m"
    except (ValueError, FileNotFoundError, ImportError):
        return "tiny-llama"


def _build(args: argparse.Namespace, analog: bool, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    model = model.float().to(device)
    ids = token_blocks(tokenizer, "builtin", block_size=args.block, split="validation", max_blocks=args.batch)
    if ids.shape[0] < args.batch:
        raise SystemExit(f"the built-in corpus gives only {ids.shape[0]} blocks of {args.block} tokens; lower --batch")
    ids = ids[: args.batch].to(device)
    if analog:
        al.analogize_(model, bench_config(args.profile))
        with torch.no_grad(), al.mode(model, "hwa"):
            model(ids[:1])  # data-initialised DAC ranges
    return model, ids


def _eval_step(model: nn.Module, ids: torch.Tensor):
    model.eval()

    def step() -> None:
        if getattr(model, "analog_config", None) is not None:
            al.set_mode(model, "chip")  # the programmed chip (the train step switches to hwa)
        with torch.no_grad():
            model(ids)

    return step


def _train_step(model: nn.Module, ids: torch.Tensor, analog: bool):
    model.train()
    freeze_(model, ["embeddings", "norms", "lm_head"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        if analog:
            al.set_mode(model, "hwa")  # hardware-aware training noise on the digital weights
        opt.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        opt.step()
        if analog:
            clamp_weights_(model)

    return step


def _generate_step(model: nn.Module, ids: torch.Tensor, new_tokens: int, analog: bool):
    """Greedy generation of ``new_tokens`` after one prompt block, with the KV cache (the chip in chip mode)."""
    prompt = ids[:1, :32]

    def step() -> None:
        model.eval()
        if analog:
            al.set_mode(model, "chip")
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    return step


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _streamed_worker(args: argparse.Namespace) -> dict:
    """Peak memory from process start over a streamed convert → map → program → deploy and two eval steps."""
    from analogllm.data import calibration_blocks
    from analogllm.hf.streaming import stream_deploy

    tokenizer = load_model_tokenizer(args.model)
    ids = token_blocks(tokenizer, "builtin", block_size=args.block, split="validation", max_blocks=args.batch)
    calibration = calibration_blocks(tokenizer, count=args.calibration_blocks)
    t0 = time.perf_counter()
    model = stream_deploy(args.model, bench_config(args.profile), seed=0, seconds=DAY,
                          calibration=calibration, device=args.device)
    seconds = time.perf_counter() - t0
    step = _eval_step(model, ids.to(args.device))
    for _ in range(2):
        step()
    return {"load_s": seconds}


def _export_worker(args: argparse.Namespace) -> dict:
    """What exporting the crossbar map adds to the loaded, converted model's resident memory."""
    import tempfile

    from analogllm.export import export_map
    from analogllm.nn.convert import analog_matrices

    model, _ = _build(args, True, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    al.program_(model, seed=0, seconds=DAY, lazy=True)  # one day of drift, as the other rows; no chip held
    gc.collect()
    largest = max(w.numel() * w.element_size() for _, _, w in analog_matrices(model))
    before = _rss_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    with tempfile.TemporaryDirectory() as tmp:
        export_map(model, Path(tmp) / "map", progress=False)
    return {"before_bytes": before, "largest_layer_bytes": largest}


def load_model_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, local_files_only=True)


def _memory_worker(args: argparse.Namespace) -> None:
    """One mode in this fresh process: peak memory over two steps (the first allocates optimiser state)."""
    if args.worker in FOLDER_MODES:
        extra = (_streamed_worker if args.worker == "analog-streamed" else _export_worker)(args)
        print(json.dumps({"mode": args.worker, "peak_bytes": _rss_kib("VmHWM") * 1024, **extra}))
        return
    device = torch.device(args.device)
    analog = args.worker.startswith("analog")
    model, ids = _build(args, analog, device)
    if device.type == "cpu":
        # Weights loaded from a checkpoint are pages of its memory map until copied: count what each mode
        # holds, not which file pages it touched. Same for every mode; the peak restarts after loading.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    if args.worker == "analog-eval":
        al.program_(model, seed=0, seconds=DAY)
    elif args.worker == "analog-deployed":
        al.deploy_(model, seed=0, seconds=DAY)  # frees each digital weight once its chip is realised
    if not args.worker.endswith("train"):
        step = _eval_step(model, ids)
    else:
        step = _train_step(model, ids, analog)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    print(json.dumps({"mode": args.worker, "peak_bytes": peak}))


def _peak_memory(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--profile", args.profile,
           "--batch", str(args.batch), "--block", str(args.block), "--device", args.device,
           "--calibration-blocks", str(args.calibration_blocks)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"memory run for {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _timings(args: argparse.Namespace, device: torch.device) -> tuple[list[list[str]], dict]:
    """Eval, generation and train-step rows, the digital and the analogue model timed round-robin."""
    digital, ids = _build(args, False, device)
    analog, _ = _build(args, True, device)
    t0 = time.perf_counter()
    al.program_(analog, seed=0, seconds=DAY)
    analog.eval()
    with torch.no_grad():
        analog(ids[:1])  # realises every layer's chip instance
    programming = time.perf_counter() - t0
    print(f"  programming one chip instance (1 day of drift): {programming:.1f} s")
    tokens = ids.numel()
    evals = {"digital": _eval_step(digital, ids), "analog": _eval_step(analog, ids)}
    print(f"  timing eval, {args.rounds} rounds ...")
    eval_s = round_robin(evals, args.rounds, 1, device)
    gens = {"digital": _generate_step(digital, ids, args.new_tokens, False),
            "analog": _generate_step(analog, ids, args.new_tokens, True)}
    print(f"  timing generation of {args.new_tokens} tokens, {args.rounds} rounds ...")
    gen_s = round_robin(gens, args.rounds, 1, device)
    trains = {"digital": _train_step(digital, ids, False), "analog": _train_step(analog, ids, True)}
    print(f"  timing HWA train steps, {args.rounds} rounds ...")
    train_s = round_robin(trains, args.rounds, 1, device)
    rows = [
        ["eval tokens/s", f"{tokens / eval_s['digital']:,.0f}", f"{tokens / eval_s['analog']:,.0f}",
         f"{eval_s['digital'] / eval_s['analog']:.2f}x"],
        ["generation tokens/s (batch 1, KV cache)", f"{args.new_tokens / gen_s['digital']:,.1f}",
         f"{args.new_tokens / gen_s['analog']:,.1f}", f"{gen_s['digital'] / gen_s['analog']:.2f}x"],
        ["train step (s)", f"{train_s['digital']:.2f}", f"{train_s['analog']:.2f}",
         f"{train_s['analog'] / train_s['digital']:.2f}x"],
    ]
    return rows, {"tokens": tokens, "eval_s": eval_s, "generate_s": gen_s, "train_step_s": train_s,
                  "programming_s": programming}


def _memory_rows(memory: dict[str, dict]) -> list[list[str]]:
    def mib(mode: str) -> str:
        return f"{memory[mode]['peak_bytes'] / 2**20:,.0f}" if mode in memory else "-"

    def ratio(a: str, b: str) -> str:
        return f"{memory[a]['peak_bytes'] / memory[b]['peak_bytes']:.2f}x" if a in memory and b in memory else "-"

    rows = [
        ["peak memory, eval (MiB)", mib("digital-eval"), mib("analog-eval"), ratio("analog-eval", "digital-eval")],
        ["peak memory, eval deployed (MiB)", mib("digital-eval"), mib("analog-deployed"),
         ratio("analog-deployed", "digital-eval")],
        ["peak memory, train (MiB)", mib("digital-train"), mib("analog-train"), ratio("analog-train", "digital-train")],
    ]
    if "analog-streamed" in memory:
        rows.append([f"peak memory, streamed load + map + deploy + eval, from process start (MiB; load "
                     f"{memory['analog-streamed']['load_s']:.0f} s)", mib("digital-eval"), mib("analog-streamed"),
                     ratio("analog-streamed", "digital-eval")])
    if "analog-export" in memory:
        e = memory["analog-export"]
        added, largest = e["peak_bytes"] - e["before_bytes"], e["largest_layer_bytes"]
        rows.append(["memory added by exporting the crossbar map (MiB; analogue: x largest layer)",
                     f"{largest / 2**20:,.0f} (largest layer)", f"{added / 2**20:,.0f}", f"{added / largest:.2f}x"])
    return [r for r in rows if r[2] != "-" or r[1] != "-"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="built-in name, Hub id or path (default: smollm2-135m if installed)")
    p.add_argument("--profile", default="pcm")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per timed generation (default 32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode memory processes")
    p.add_argument("--memory-only", action="store_true", help="only the memory processes (no timing)")
    p.add_argument("--modes", nargs="+", choices=MODES + FOLDER_MODES, default=None,
                   help="memory modes to measure (default: all that apply)")
    p.add_argument("--calibration-blocks", type=int, default=4,
                   help="blocks of built-in text that map the streamed model (default 4)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", choices=MODES + FOLDER_MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or _default_model()
    if args.worker:
        _memory_worker(args)
        return 0
    device = torch.device(args.device)
    folder = Path(args.model).is_dir()
    modes = args.modes or MODES + (FOLDER_MODES if folder else [])
    if not folder and set(modes) & set(FOLDER_MODES):
        raise SystemExit(f"{', '.join(sorted(set(modes) & set(FOLDER_MODES)))} need --model FOLDER (a saved model)")
    print(f"{args.model}, {args.profile} profile, batch {args.batch} x {args.block} tokens, {machine()}")
    rows, timing = ([], {}) if args.memory_only else _timings(args, device)
    memory = {}
    if not args.no_memory:
        for mode in modes:
            print(f"  peak memory: {mode} (fresh process) ...")
            memory[mode] = _peak_memory(args, mode)
    rows += _memory_rows(memory)
    print()
    print(f"{args.model}, {args.profile}, batch {args.batch} x {args.block} tokens, {machine()}, "
          f"median of {args.rounds} rounds")
    print(markdown(["", "digital", "analogue", "analogue / digital"], rows))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "profile": args.profile, "machine": machine(),
                                         **timing, "memory": memory}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
