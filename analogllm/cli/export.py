"""``analogllm export`` and ``analogllm verify``.

Both commands rebuild the analogue model the same way, so a map can be verified on a machine that
only has the model's source: an analogue checkpoint folder (``analogllm convert --out``) is loaded
as saved; any other model (built-in name, local folder, Hub id) is converted with ``--profile``. The
chip instance is the checkpoint's (or ``--seed``); verify programs the instance the map records.

Learned DAC ranges initialise from the first data a model sees. A model that has seen none (a fresh
conversion) is calibrated here on the first built-in-corpus training blocks, under a fixed random
seed, and the manifest records how, so that verify can calibrate its copy identically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from torch import nn

from analogllm.cli.args import add_set_argument, parse_overrides
from analogllm.config import AnalogConfig

CALIBRATION_SEED = 0


def register(sub: argparse._SubParsersAction) -> None:
    from analogllm.export.writer import TARGETS

    p = sub.add_parser("export", help="write the deployment map of an analogue model (crossbar or photonic)")
    p.add_argument("model",
                   help="analogue checkpoint folder, or a built-in name / model path converted with --profile")
    p.add_argument("--target", choices=list(TARGETS), default=None,
                   help="crossbar (pcm, rram) or photonic; default: the one the model's device is")
    p.add_argument("--out", type=Path, required=True, help="map folder to write (replaced atomically if it is a map)")
    p.add_argument("--profile", default=None,
                   help="device profile when MODEL is not an analogue checkpoint (default: pcm)")
    add_set_argument(p)
    p.add_argument("--seed", type=int, default=None, help="chip instance (default: the checkpoint's, else 0)")
    p.add_argument("--levels", type=int, default=None, help="crossbar level grid of a PCM map (default 256)")
    p.add_argument("--calibration-blocks", type=int, default=4,
                   help="built-in-corpus blocks that initialise unset learned DAC ranges (default 4)")
    p.set_defaults(func=run_export)

    p = sub.add_parser("verify", help="check that a map reproduces its analogue model (exit 1 when it does not)")
    p.add_argument("map", type=Path, help="map folder written by `analogllm export`")
    p.add_argument("--model", default=None, help="the model the map came from (default: the source in the manifest)")
    p.add_argument("--blocks", type=int, default=8, help="held-out built-in-corpus blocks to run (default 8)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block (default 128)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest relative logit and perplexity difference that passes (default 1e-3)")
    p.set_defaults(func=run_verify)


def calibrate(model: nn.Module, tokenizer: Any, blocks: int, block_size: int = 128) -> dict[str, Any] | None:
    """Initialise unset learned DAC ranges with one forward pass on built-in training blocks.

    Returns the calibration record for the manifest, or None when every range was already set.
    """
    from analogllm.chip import calibrate_
    from analogllm.data import token_blocks
    from analogllm.export.manifest import analog_layers

    unset = [layer for layer in analog_layers(model) if layer.placement == "analog"
             and layer.matrix.config.dac.range == "learned" and not layer.matrix.range_set]
    if not unset:
        return None
    if blocks < 1:
        raise ValueError("the model's learned DAC ranges are unset and --calibration-blocks is 0")
    ids = token_blocks(tokenizer, split="train", block_size=block_size, max_blocks=blocks)
    calibrate_(model.eval(), ids, seed=CALIBRATION_SEED)
    return {"what": "learned DAC ranges initialised by one forward pass", "source": "builtin", "split": "train",
            "blocks": int(ids.shape[0]), "block_size": block_size, "seed": CALIBRATION_SEED}


def run_export(args: argparse.Namespace) -> int:
    from analogllm.chip import program_
    from analogllm.export.writer import export_map
    from analogllm.hf.checkpoint import is_analog_checkpoint, load_analog_model

    overrides = parse_overrides(args.set)
    config = None
    if args.profile is not None or overrides:
        config = AnalogConfig.from_profile(args.profile or "pcm", **overrides)
    if config is not None and is_analog_checkpoint(Path(args.model).expanduser()):
        raise ValueError(f"{args.model} is an analogue checkpoint with its own config; drop --profile/--set "
                         "(or convert the digital model again)")
    start = time.perf_counter()
    model, tokenizer, is_checkpoint = load_analog_model(args.model, config)
    if args.seed is not None or not is_checkpoint:
        # lazily: each layer is realised as it is written, so the export never holds every chip at once
        program_(model, seed=0 if args.seed is None else args.seed, lazy=True)
    calibration = calibrate(model, tokenizer, args.calibration_blocks)
    source = str(Path(args.model).expanduser().resolve()) if Path(args.model).expanduser().is_dir() else args.model
    loaded = time.perf_counter()
    out = export_map(model, args.out, args.target, levels=args.levels, source=source, calibration=calibration)
    done = time.perf_counter()
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    from analogllm.export.manifest import read_manifest

    totals = read_manifest(out)["totals"]
    print(f"wrote {out}: {totals['layers']} layers, {totals['tiles']} tiles, {totals['weights']:,} weights, "
          f"{size / 2**20:.1f} MiB; load {loaded - start:.1f} s, export {done - loaded:.1f} s")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from analogllm.export.manifest import analog_layers, load_map
    from analogllm.export.verify import verify_map
    from analogllm.hf.checkpoint import load_analog_model

    amap = load_map(args.map)  # a corrupt map fails here, before any model is loaded
    source = args.model or amap.manifest["model"].get("source")
    if not source:
        raise ValueError(f"{args.map}: the manifest records no model source; pass --model")
    model, tokenizer, _ = load_analog_model(source, amap.config)
    for layer in analog_layers(model):  # the chip instance the map was exported from
        if layer.name in amap.layers:
            record = amap.layers[layer.name].record
            layer.matrix.program(layer.weight, record["seed"], record["seconds"])
    calibration = amap.manifest.get("calibration")
    if calibration:
        calibrate(model, tokenizer, calibration["blocks"], calibration["block_size"])
    report = verify_map(args.map, model, tokenizer, max_blocks=args.blocks, block_size=args.block_size,
                    tolerance=args.tolerance, progress=True)
    print(report.summary())
    return 0 if report.passed else 1
