"""Quality on the chip as the ratio to digital perplexity, from the reports runs already wrote.

    python scripts/quality_table.py runs/smollm2-pcm-hwa runs/finetune-smollm2 runs/smollm2-rram-mapped

Reads every ``eval*.json`` of an ``analogllm eval`` / ``quickstart`` output folder and the
``results.json`` of an ``analogllm finetune`` folder, and prints one Markdown table per held-out text:
a row per (run, model row), a column per drift time, each cell the mean ± std over chip instances of
perplexity(chip) / perplexity(digital), with the absolute perplexity beside it. The ratio is taken per
chip instance (each against the same digital score), so the spread is that of the chips.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analogllm.eval.report import format_seconds  # noqa: E402
from analogllm.tables import markdown_table  # noqa: E402


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _eval_rows(folder: Path) -> dict[str, dict[tuple[str, str], dict[float, list[float]]]]:
    """text → (run, row) → seconds → perplexities of the chips, plus the digital one under ("", "digital")."""
    out: dict[str, dict] = defaultdict(dict)
    for file in sorted(folder.glob("eval*.json")):
        report = json.loads(file.read_text())
        text = report["meta"].get("text", file.stem)
        rows = out[text]
        rows[("", "digital")] = {None: [report["digital"]["perplexity"]]}
        for label, series in report["series"].items():
            by_time: dict[float, list[float]] = defaultdict(list)
            for chip in series["chips"]:
                by_time[float(chip["seconds"])].append(chip["perplexity"])
            rows[(f"{folder.name} ({report['profile']})", label)] = dict(by_time)
    return out


def _finetune_rows(folder: Path) -> dict[str, dict[tuple[str, str], dict[float, list[float]]]]:
    result = json.loads((folder / "results.json").read_text())
    out: dict[str, dict] = defaultdict(dict)
    for text, score in result["digital"].items():
        out[text][("", "digital")] = {None: [score["perplexity"]]}
    for row, by_text in result["scores"].items():
        for text, items in by_text.items():
            by_time: dict[float, list[float]] = defaultdict(list)
            for item in items:
                by_time[float(item["seconds"])].append(item["perplexity"])
            out[text][(folder.name, row)] = dict(by_time)
    return out


def tables(folders: list[Path]) -> str:
    merged: dict[str, dict] = defaultdict(dict)
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"{folder}: no such run folder")
        found = _finetune_rows(folder) if (folder / "results.json").is_file() else _eval_rows(folder)
        if not found:
            raise SystemExit(f"{folder}: no eval*.json or results.json here")
        for text, rows in found.items():
            for key, value in rows.items():
                if key == ("", "digital") and key in merged[text]:
                    continue  # the first run's digital score is the reference for the text
                merged[text][key] = value
    parts = []
    for text, rows in merged.items():
        digital = rows.pop(("", "digital"))[None][0]
        times = sorted({t for r in rows.values() for t in r})
        header = ("run", "model", *(format_seconds(t) for t in times))
        body = []
        for (run, row), by_time in rows.items():
            cells = []
            for t in times:
                if t not in by_time:
                    cells.append("-")
                    continue
                mean, std = _stats([p / digital for p in by_time[t]])
                ppl = _stats(by_time[t])[0]
                cells.append(f"{mean:.2f}× ± {std:.2f} ({ppl:.1f})")
            body.append((run, row, *cells))
        parts.append(f"{text}: ratio to digital perplexity {digital:.2f} (mean ± std over chips; perplexity)\n\n"
                     + markdown_table(header, body))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="output folders of eval/quickstart or finetune runs")
    print(tables(p.parse_args(argv).runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
