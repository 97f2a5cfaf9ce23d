"""Core commands: ``analogllm profiles`` and ``analogllm convert``."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from analogllm.config import AnalogConfig, profile_names, profile_parameters
from analogllm.cli.args import add_set_argument, parse_overrides
from analogllm.tables import markdown_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="list the built-in device profiles and their key parameters")
    p.add_argument("--sources", action="store_true",
                   help="print every parameter of every profile with the source of its value")
    p.set_defaults(func=run_profiles)

    p = sub.add_parser("convert", help="convert a model (id, path or built-in name) into an analogue checkpoint")
    p.add_argument("model", help="Hugging Face id or local path, or a built-in name (see `analogllm models`)")
    p.add_argument("--profile", default="pcm", help="device profile name or YAML file (default: pcm)")
    add_set_argument(p)
    p.add_argument("--include", nargs="*", default=None, help="regexes of module names to convert")
    p.add_argument("--exclude", nargs="*", default=None, help="regexes of module names to keep digital")
    p.add_argument("--seed", type=int, default=0, help="chip instance to program (default 0)")
    p.add_argument("--calibration", default="builtin",
                   help="text that maps the model onto the chip: 'builtin' (default), a local file or folder, or a Hub dataset")
    p.add_argument("--calibration-blocks", type=int, default=16,
                   help="calibration blocks of 128 tokens (default 16; 0 = no mapping, abs-max DAC ranges on first use)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the analogue checkpoint here (an existing folder must be empty or an earlier checkpoint)")
    p.set_defaults(func=run_convert)

    p = sub.add_parser("models", help="list the built-in models")
    p.set_defaults(func=run_models)


def profile_rows() -> list[tuple[str, ...]]:
    """One row of key parameters per built-in profile."""
    rows = []
    for name in profile_names():
        c = AnalogConfig.from_profile(name)
        tiles = f"{c.tiling.rows}×{c.tiling.cols}" if c.tiling.rows else "none"
        rows.append((name, c.device.kind, str(c.dac.bits), str(c.adc.bits), tiles, str(c.output.noise),
                     str(c.training.weight_noise), c.device.summary()))
    return rows


def source_rows() -> list[tuple[str, ...]]:
    """(profile, parameter, value, source) for every parameter of every built-in profile; "—" where
    the profile cites nothing for it. Cells are Markdown-escaped."""
    rows = []
    for name in profile_names():
        for key, value, source in profile_parameters(name):
            shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
            cells = (name, key, shown.removesuffix("\n...").removesuffix("..."), source or "—")
            rows.append(tuple(c.replace("|", "\\|") for c in cells))  # a literal | inside a Markdown cell
    return rows


def run_profiles(args: argparse.Namespace) -> int:
    if args.sources:
        print(markdown_table(("profile", "parameter", "value", "source"), source_rows()))
        return 0
    header = ("profile", "device", "DAC bits", "ADC bits", "tiles", "out noise", "train noise", "device parameters")
    print(markdown_table(header, profile_rows()))
    return 0


def run_models(args: argparse.Namespace) -> int:
    from analogllm.hf.models import list_models

    for name in list_models():
        print(name)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from analogllm.chip import program_
    from analogllm.data import calibration_blocks
    from analogllm.hf.checkpoint import check_destination, save_pretrained
    from analogllm.hf.models import load_model
    from analogllm.nn.convert import analogize_

    config = AnalogConfig.from_profile(args.profile, **parse_overrides(args.set))
    if args.calibration_blocks < 0:
        raise ValueError(f"--calibration-blocks must be >= 0, got {args.calibration_blocks}")
    if args.out is not None:
        check_destination(args.out)  # before minutes of work, not after
    model, tokenizer = load_model(args.model)
    calibration = calibration_blocks(tokenizer, args.calibration, args.calibration_blocks)
    analogize_(model, config, include=args.include, exclude=args.exclude, calibration=calibration, progress=True)
    program_(model, seed=args.seed)
    print(model.analog_report.table())
    if args.out is not None:
        save_pretrained(model, args.out, tokenizer=tokenizer)
        print(f"\nwrote analogue checkpoint to {args.out}")
    return 0
