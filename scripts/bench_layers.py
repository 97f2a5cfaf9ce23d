"""Layer benchmark: analogue linear layers against ``torch.nn.Linear``, side by side in one run.

    python scripts/bench_layers.py                  # (8, 128, 768) -> 3072, float32, pcm profile
    python scripts/bench_layers.py --device cuda --rounds 50
    python scripts/bench_layers.py --set ir_drop.wire_resistance=0.35   # any profile field overridden

Cases (all the same shapes, timed round-robin, median of ``--rounds``):

* ``torch.nn.Linear`` — the digital baseline;
* analogllm ``AnalogLinear``, pcm profile (8-bit DAC with a learned range, 8-bit ADC, training
  weight noise, 2.5σ clipping, output noise), untiled and with 512×512 tiles (a separate ADC per
  tile);
* IBM ``aihwkit-lightning`` and ``aihwkit`` with the closest configuration, when installed
  (``pip install -e ".[bench]"``); skipped with a note otherwise.

"train" is forward + backward (gradients for input, weight and input range); "eval" is a forward of
the deployed chip (programmed pcm instance, read noise, converters) under ``torch.no_grad``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bench_config, machine, markdown, round_robin  # noqa: E402

import analogllm as al  # noqa: E402
from analogllm.cli.core import add_set_argument, parse_overrides  # noqa: E402


def _train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(grad)

    return step


def _eval_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            layer(x)

    return step


def _analogllm(base: nn.Linear, rows: int | None, profile: str, compile_: bool,
               overrides: dict | None = None) -> tuple[nn.Module, nn.Module]:
    cfg = bench_config(profile, **{"tiling.rows": rows, "tiling.cols": rows, **(overrides or {})})
    train = al.AnalogLinear.from_linear(_copy(base), cfg, name="bench")
    al.set_mode(train, "hwa")  # hardware-aware training noise (modes are explicit, not model.train())
    train(torch.randn(4, base.in_features, device=base.weight.device))  # data-initialised input range
    evaluate = al.AnalogLinear.from_linear(_copy(base), cfg, name="bench").eval()
    evaluate.analog.input_range.data.copy_(train.analog.input_range.data)
    evaluate.analog.mark_range_set()
    t0 = time.perf_counter()
    evaluate.analog.program(evaluate.weight, seed=0, seconds=86400.0)
    print(f"  analogllm {profile} rows={rows}: programming one chip instance took {time.perf_counter() - t0:.3f} s")
    train.train()
    if compile_:
        train, evaluate = torch.compile(train), torch.compile(evaluate)
    return train, evaluate


def _lightning(base: nn.Linear, rows: int | None) -> tuple[nn.Module, nn.Module]:
    from aihwkit_lightning.nn.conversion import convert_to_analog
    from aihwkit_lightning.simulator.configs import TorchInferenceRPUConfig, WeightClipType, WeightModifierType

    rpu = TorchInferenceRPUConfig()
    rpu.forward.inp_res = 2**8 - 2
    rpu.forward.out_noise = 0.04
    rpu.forward.out_noise_per_channel = True
    rpu.forward.out_bound = 12.0
    rpu.forward.out_res = 2**8 - 2
    rpu.clip.type = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL
    rpu.clip.sigma = 2.5
    rpu.modifier.type = WeightModifierType.ADD_NORMAL_PER_CHANNEL
    rpu.modifier.std_dev = 0.03
    rpu.mapping.max_input_size = rows or 0
    rpu.pre_post.input_range.enable = True
    rpu.pre_post.input_range.init_from_data = 0
    rpu.pre_post.input_range.init_value = 3.0
    train = convert_to_analog(nn.Sequential(_copy(base)), rpu).train()
    evaluate = convert_to_analog(nn.Sequential(_copy(base)), rpu).eval()
    return train, evaluate


def _aihwkit(base: nn.Linear, rows: int | None) -> tuple[nn.Module, nn.Module]:
    from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
    from aihwkit.nn.conversion import convert_to_analog
    from aihwkit.simulator.configs import InferenceRPUConfig, WeightClipType, WeightModifierType

    rpu = InferenceRPUConfig()
    rpu.forward.inp_res = 1 / (2**8 - 2)
    rpu.forward.out_res = 1 / (2**8 - 2)
    rpu.forward.out_noise = 0.04
    rpu.forward.out_bound = 12.0
    rpu.clip.type = WeightClipType.LAYER_GAUSSIAN
    rpu.clip.sigma = 2.5
    rpu.modifier.type = WeightModifierType.ADD_NORMAL
    rpu.modifier.std_dev = 0.03
    rpu.mapping.max_input_size = rows or 0
    rpu.mapping.max_output_size = 0
    rpu.pre_post.input_range.enable = True
    rpu.noise_model = PCMLikeNoiseModel(g_max=25.0)
    rpu.drift_compensation = GlobalDriftCompensation()
    train = convert_to_analog(nn.Sequential(_copy(base)), rpu).train()
    evaluate = convert_to_analog(nn.Sequential(_copy(base)), rpu).eval()
    evaluate.program_analog_weights()
    evaluate.drift_analog_weights(86400.0)
    return train, evaluate


def _copy(layer: nn.Linear) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device)
    out.load_state_dict(layer.state_dict())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, default=[8, 128, 768, 3072], metavar=("BATCH", "SEQ", "IN", "OUT"))
    p.add_argument("--profile", default="pcm", help="analogllm device profile (default: pcm)")
    p.add_argument("--tile", type=int, default=512, help="rows and columns of a tile for the tiled case")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per case (median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time analogllm under torch.compile")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    add_set_argument(p)
    args = p.parse_args(argv)
    overrides = parse_overrides(args.set)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    batch, seq, n_in, n_out = args.shape
    base = nn.Linear(n_in, n_out, device=device)
    x = torch.randn(batch, seq, n_in, device=device, requires_grad=True)
    grad = torch.randn(batch, seq, n_out, device=device)

    layers: dict[str, tuple[nn.Module, nn.Module]] = {"torch.nn.Linear": (_copy(base), _copy(base).eval())}
    print(f"building layers on {machine()} ...")
    variants = [(f"analogllm {args.profile}", None), (f"analogllm {args.profile} tiled {args.tile}", args.tile)]
    for name, rows in variants:
        layers[name] = _analogllm(base, rows, args.profile, compile_=False, overrides=overrides)
        if args.compile:
            layers[name + " (compiled)"] = _analogllm(base, rows, args.profile, compile_=True, overrides=overrides)
    for package, label, build in [("aihwkit_lightning", "aihwkit-lightning", _lightning), ("aihwkit", "aihwkit", _aihwkit)]:
        if importlib.util.find_spec(package) is None:
            print(f"  {label}: not installed, skipped (pip install -e '.[bench]')")
            continue
        for suffix, rows in [("", None), (f" tiled {args.tile}", args.tile)]:
            try:
                layers[label + suffix] = build(base, rows)
            except Exception as exc:  # a third-party API change must not stop our own measurements
                print(f"  {label}{suffix}: could not be configured ({type(exc).__name__}: {exc}), skipped")

    cases: dict[str, Callable[[], None]] = {}
    for name, (train, evaluate) in layers.items():
        cases[(name, "train")] = _train_step(train, x, grad)  # type: ignore[index]
        cases[(name, "eval")] = _eval_step(evaluate, x)  # type: ignore[index]
    print(f"timing {len(cases)} cases x {args.rounds} rounds, input {tuple(x.shape)} -> {n_out} ...")
    median = round_robin(cases, args.rounds, args.warmup, device)  # type: ignore[arg-type]

    ref_train, ref_eval = median[("torch.nn.Linear", "train")], median[("torch.nn.Linear", "eval")]  # type: ignore[index]
    rows_out, results = [], []
    for name in layers:
        t, e = median[(name, "train")], median[(name, "eval")]  # type: ignore[index]
        rows_out.append([name, f"{t * 1e3:.1f}", f"{t / ref_train:.2f}x", f"{e * 1e3:.1f}", f"{e / ref_eval:.2f}x"])
        results.append({"layer": name, "train_ms": t * 1e3, "train_ratio": t / ref_train, "eval_ms": e * 1e3,
                        "eval_ratio": e / ref_eval})
    print()
    print(f"input {tuple(x.shape)} -> {n_out}, float32, {machine()}, median of {args.rounds} rounds")
    print(markdown(["layer", "train fwd+bwd (ms)", "vs Linear", "eval fwd (ms)", "vs Linear"], rows_out))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "shape": args.shape, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
