"""``analogllm convert-map``: a map in another tool's format, and a Fusion export back into a map.

    analogllm convert-map /tmp/map --to fusion   --out /tmp/map-fusion     # aihwkit Fusion CSV + sidecar
    analogllm convert-map /tmp/map --to crosssim --out /tmp/map-crosssim   # CrossSim [G+, G-] per array
    analogllm convert-map /tmp/map-fusion --to analogllm --out /tmp/map2   # Fusion CSV + sidecar -> map

A separate command rather than ``export --format``: ``export`` turns a *model* into a map (loading,
converting, programming, calibrating), while these read an existing map (checked by ``load_map``
first) or a Fusion export, and need no model at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("fusion", "crosssim", "analogllm")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-map", help="write a crossbar map as Fusion CSV or CrossSim arrays, or a Fusion "
                                           "export back as a map",
                       description="Convert between the analogllm map format and other tools' formats: IBM "
                                   "Fusion CSV (aihwkit fusion_export layout) with a sign/scale sidecar, CrossSim "
                                   "per-array conductance files, and back from Fusion to an analogllm map.")
    p.add_argument("source", type=Path, help="an analogllm map folder (--to fusion/crosssim) or a Fusion export "
                                             "folder (--to analogllm)")
    p.add_argument("--to", choices=FORMATS, required=True, help="output format")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.set_defaults(func=run_convert_map)


def run_convert_map(args: argparse.Namespace) -> int:
    from analogllm.export.crosssim import export_crosssim
    from analogllm.export.fusion import export_fusion, import_fusion

    if args.to == "fusion":
        out = export_fusion(args.source, args.out)
    elif args.to == "crosssim":
        out = export_crosssim(args.source, args.out)
    else:
        out = import_fusion(args.source, args.out)
    files = [f for f in out.rglob("*") if f.is_file()]
    print(f"wrote {out}: {len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB ({args.to})")
    return 0
