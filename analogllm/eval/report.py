"""Evaluation reports: the numbers as JSON, the tables as Markdown, the curves as a PNG.

One :class:`EvalReport` holds the digital score and one :class:`~analogllm.eval.sweep.Series` per
analogue model (e.g. before and after HWA training). Every file is written atomically (temporary file,
then rename), so an interrupted run never leaves a half-written report beside a complete one.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from analogllm.fileio import atomic_write_bytes
from analogllm.eval.perplexity import LMScore
from analogllm.eval.sweep import ChipScore, Series

_UNITS = ((31_536_000.0, "year"), (86_400.0, "day"), (3_600.0, "h"), (60.0, "min"), (1.0, "s"))


def format_seconds(seconds: float) -> str:
    """0 → "0 s", 3600 → "1 h", 86400 → "1 day", 315360000 → "10 years"."""
    if seconds == 0:
        return "0 s"
    for size, unit in _UNITS:
        if seconds >= size:
            value = seconds / size
            text = f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.3g}"
            plural = "s" if unit in ("year", "day") and text != "1" else ""
            return f"{text} {unit}{plural}"
    return f"{seconds:.3g} s"


def format_perplexity(value: float, like: float | None = None) -> str:
    """Readable at every scale: 14.80, 431.2, 7.56e+07. ``like``: format as that value would be (a
    standard deviation in the style of its mean: 1,837.5 ± 72.3)."""
    ref = value if like is None else like
    if ref >= 1e5:
        return f"{value:.3g}"
    return f"{value:,.1f}" if ref >= 100 else f"{value:.2f}"


@dataclass(frozen=True)
class EvalReport:
    """Digital and analogue scores of one recipe on the same held-out blocks."""

    model: str
    profile: str
    blocks: int
    tokens: int
    drift_times: tuple[float, ...]
    chip_seeds: tuple[int, ...]
    digital: LMScore
    series: tuple[Series, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def series_named(self, label: str) -> Series:
        for s in self.series:
            if s.label == label:
                return s
        raise KeyError(f"no series {label!r}; have: {', '.join(s.label for s in self.series)}")

    # ----- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        series = {}
        for s in self.series:
            summary = []
            for t in self.drift_times:
                row: dict[str, float] = {"seconds": t}
                for metric in ("perplexity", "token_accuracy", "loss"):
                    row[f"{metric}_mean"], row[f"{metric}_std"] = s.stats(t, metric)
                summary.append(row)
            series[s.label] = {"summary": summary, "chips": [asdict(p) for p in s.points]}
        return {
            "model": self.model, "profile": self.profile, "blocks": self.blocks, "tokens": self.tokens,
            "drift_times": list(self.drift_times), "chip_seeds": list(self.chip_seeds),
            "digital": asdict(self.digital), "series": series, "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        series = tuple(
            Series(label, tuple(ChipScore(**p) for p in body["chips"])) for label, body in data["series"].items()
        )
        return cls(
            model=data["model"], profile=data["profile"], blocks=data["blocks"], tokens=data["tokens"],
            drift_times=tuple(data["drift_times"]), chip_seeds=tuple(data["chip_seeds"]),
            digital=LMScore(**data["digital"]), series=series, meta=data.get("meta", {}),
        )

    # ----- tables ---------------------------------------------------------------------------------------
    def markdown(self) -> str:
        """Perplexity and token-accuracy tables: one row per model, one column per drift time."""
        from analogllm.tables import markdown_table

        header = ("model", *(format_seconds(t) for t in self.drift_times))
        chips = len(self.chip_seeds)
        spread = f"mean ± std over {chips} chip instances" if chips > 1 else "one chip instance"
        out = [
            f"{self.model} on the {self.profile} profile: {self.blocks} held-out blocks ({self.tokens:,} predicted tokens), "
            f"analogue rows: {spread}.",
            "",
            "Perplexity (lower is better)",
            "",
        ]
        rows = [("digital", *(format_perplexity(self.digital.perplexity) for _ in self.drift_times))]
        for s in self.series:
            cells = []
            for t in self.drift_times:
                mean, std = s.stats(t, "perplexity")
                cells.append(format_perplexity(mean) + (f" ± {format_perplexity(std, like=mean)}" if chips > 1 else ""))
            rows.append((s.label, *cells))
        out += [markdown_table(header, rows), "", "Token accuracy (higher is better)", ""]
        rows = [("digital", *(f"{100 * self.digital.token_accuracy:.1f} %" for _ in self.drift_times))]
        for s in self.series:
            cells = []
            for t in self.drift_times:
                mean, std = s.stats(t, "token_accuracy")
                cells.append(f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if chips > 1 else "") + " %")
            rows.append((s.label, *cells))
        out.append(markdown_table(header, rows))
        training = self.meta.get("training")
        if training:
            out += ["", f"HWA training: {training['steps']} steps, {training['seconds']:.0f} s wall time on "
                        f"{training['processes']} process(es), {training['tokens']:,} tokens."]
        if "total_seconds" in self.meta:
            out.append(f"Whole run (load, evaluate, train, evaluate): {self.meta['total_seconds']:.0f} s.")
        return "\n".join(out)


def write_report(report: EvalReport, out_dir: Path, stem: str = "eval", plot: bool = True) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (when ``plot``) ``<stem>.png``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    atomic_write_bytes(paths["json"], json.dumps(report.to_dict(), indent=2).encode())
    atomic_write_bytes(paths["markdown"], (report.markdown() + "\n").encode())
    if plot:
        from analogllm.eval.plot import plot_report

        paths["plot"] = out_dir / f"{stem}.png"
        buffer = io.BytesIO()
        plot_report(report, buffer)
        atomic_write_bytes(paths["plot"], buffer.getvalue())
    return paths


__all__ = ["EvalReport", "format_perplexity", "format_seconds", "write_report"]
