"""The drift plot: perplexity and token accuracy against time since programming.

Drift times span nine orders of magnitude and include 0 s, which no log axis can show, so the times
sit at evenly spaced positions labelled in human units. The digital model is a dashed reference line;
each analogue model is its mean over chip instances with a ±1 std band.
"""

from __future__ import annotations

from typing import IO

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, no GUI backend imported
import matplotlib.pyplot as plt  # noqa: E402

from analogllm.eval.report import EvalReport, format_seconds  # noqa: E402

_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def plot_report(report: EvalReport, file: str | IO[bytes]) -> None:
    """Draw ``report`` as a two-panel PNG into ``file`` (a path or a binary file object)."""
    x = list(range(len(report.drift_times)))
    labels = [format_seconds(t) for t in report.drift_times]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, metric, title, scale in (
        (axes[0], "perplexity", "Perplexity (lower is better)", 1.0),
        (axes[1], "token_accuracy", "Token accuracy, % (higher is better)", 100.0),
    ):
        digital = getattr(report.digital, metric) * scale
        ax.axhline(digital, color="black", linestyle="--", linewidth=1.2, label="digital")
        for colour, s in zip(_COLOURS, report.series):
            stats = [s.stats(t, metric) for t in report.drift_times]
            mean = [m * scale for m, _ in stats]
            std = [d * scale for _, d in stats]
            ax.plot(x, mean, marker="o", color=colour, label=s.label)
            ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=colour, alpha=0.2, linewidth=0)
        if metric == "perplexity":
            values = [digital] + [p.perplexity for s in report.series for p in s.points]
            if max(values) / max(min(values), 1e-9) > 20:
                ax.set_yscale("log")
        ax.set_xticks(x, labels)
        ax.set_xlabel("time since programming")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    chips = len(report.chip_seeds)
    fig.suptitle(f"{report.model} on {report.profile}: {report.tokens:,} held-out tokens, "
                 f"mean ± std over {chips} chip{'s' if chips > 1 else ''}")
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


__all__ = ["plot_report"]
