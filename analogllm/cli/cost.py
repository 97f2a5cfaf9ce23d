"""``analogllm cost``: what one generated token costs on the chip a map (or a converted model) targets.

    analogllm cost smollm2-135m --profile pcm                 # convert in memory, price on pcm-hermes
    analogllm cost /tmp/smol_map --context 2048 --out report  # from a map; writes cost.json/.md/.png
    analogllm cost tiny-llama --profile photonic --hardware my-chip.yaml

A map folder is read through its manifest (no layer file is opened: the tile grid is in the manifest)
and the model's architecture comes from the source the manifest records (or ``--model``). Anything else
is a model — an analogue checkpoint folder as saved, or a built-in name / Hugging Face model converted
with ``--profile`` in memory; nothing is programmed. Both give the same counts for the same model and
profile.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analogllm.cli.args import add_set_argument, parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    from analogllm.cost.counts import DEFAULT_CONTEXT
    from analogllm.cost.hardware import BASELINE, hardware_names

    p = sub.add_parser("cost", help="energy, latency, throughput and area per generated token on the chip",
                       description="Count what one decode step does per analogue layer (MACs, array reads, "
                                   "DAC/ADC conversions, arrays) and in the model's digital parts, and price it "
                                   "with a hardware cost profile whose every number cites its source; compare "
                                   "with a GPU running the same token.")
    p.add_argument("source", metavar="MAP_OR_MODEL",
                   help="a map folder (analogllm export), an analogue checkpoint, or a model converted with --profile")
    p.add_argument("--profile", default=None,
                   help="device profile when MAP_OR_MODEL is a model that is not analogue yet (default: pcm)")
    add_set_argument(p)
    p.add_argument("--hardware", default=None,
                   help=f"cost profile: built-in ({', '.join(n for n in hardware_names() if n != BASELINE)}) or a "
                        "YAML file; default: the one for the map's device")
    p.add_argument("--baseline", default=BASELINE,
                   help=f"GPU profile to compare with (default {BASELINE}; 'none' to skip)")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                   help=f"tokens already in the KV cache when the token is generated (default {DEFAULT_CONTEXT})")
    p.add_argument("--model", default=None,
                   help="for a map: the model whose architecture to count (default: the source in its manifest)")
    p.add_argument("--out", type=Path, default=None,
                   help="write cost.json, cost.md and cost.png into this folder (default: only print the tables)")
    p.set_defaults(func=run_cost)


def run_cost(args: argparse.Namespace) -> int:
    from analogllm.config import AnalogConfig
    from analogllm.cost import estimate, load_hardware, markdown, write_report
    from analogllm.cost.counts import hf_config_for, workload_from_manifest, workload_from_model
    from analogllm.cost.hardware import default_hardware
    from analogllm.cost.report import check_destination
    from analogllm.export.manifest import MANIFEST_NAME, read_manifest

    if args.context < 0:
        raise ValueError(f"--context must be >= 0, got {args.context}")
    if args.out is not None:
        check_destination(args.out)  # before any model is loaded
    # profiles first: a bad YAML fails at once, not after loading a model
    hardware = load_hardware(args.hardware) if args.hardware else None
    baseline = None if str(args.baseline).lower() == "none" else load_hardware(args.baseline)
    path = Path(args.source).expanduser()
    if (path / MANIFEST_NAME).is_file():
        if args.profile is not None or args.set:
            raise ValueError(f"{args.source} is a map with its own profile; drop --profile/--set")
        manifest = read_manifest(path)
        source = args.model or manifest.get("model", {}).get("source")
        if not source:
            raise ValueError(f"{path}: the manifest records no model source; pass --model")
        workload = workload_from_manifest(manifest, hf_config_for(source), args.context)
    else:
        from analogllm.hf.checkpoint import load_analog_model
        from analogllm.hf.checkpoint import is_analog_checkpoint

        overrides = parse_overrides(args.set)
        config = AnalogConfig.from_profile(args.profile or "pcm", **overrides) if (args.profile or overrides) else None
        if config is not None and is_analog_checkpoint(path):
            raise ValueError(f"{args.source} is an analogue checkpoint with its own config; drop --profile/--set")
        model, _, _ = load_analog_model(args.source, config)
        workload = workload_from_model(model, args.context, source=args.source)
    if hardware is None:
        hardware = load_hardware(default_hardware(workload.device))
    report = estimate(workload, hardware, baseline)
    print(markdown(report))
    if args.out is not None:
        paths = write_report(report, args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
