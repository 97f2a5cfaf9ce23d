"""Cost reports: JSON (every count and energy, unit in the key), Markdown tables, a PNG breakdown.

``cost.json`` keys carry their unit (``_pJ``, ``_J``, ``_s``, ``_mm2``, ``_um2``): the totals are sums of
the per-layer and per-part rows, and the per-token energy is given both in pJ and in J. The files are
written atomically into one folder (``write_report``), which is refused when it already holds
something that is not a cost report.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from analogllm.cost.estimate import PJ, CostReport
from analogllm.fileio import atomic_dir

FORMAT = "analogllm-cost"
VERSION = 1
FILES = ("cost.json", "cost.md", "cost.png")


def _si(value: float, unit: str) -> str:
    """1.23e-6, "J" → "1.23 µJ" (three significant digits)."""
    if value == 0:
        return f"0 {unit}"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "µ"), (1e-9, "n"), (1e-12, "p"), (1e-15, "f")):
        if abs(value) >= factor * 0.9995:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value / 1e-15:.3g} f{unit}"


def _count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3g} G"
    if n >= 1e6:
        return f"{n / 1e6:.3g} M"
    if n >= 1e4:
        return f"{n / 1e3:.3g} k"
    return f"{int(n):,}" if float(n).is_integer() else f"{n:.3g}"


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def to_dict(report: CostReport) -> dict[str, Any]:
    w, hw = report.workload, report.hardware
    totals = w.totals()
    layers = []
    for r in report.layers:
        c = r.counts
        layers.append({
            **c.to_dict(), "shape": [c.experts, c.out, c.inp],
            "energy_pJ": r.energy_pj, "energy_total_pJ": r.total_pj, "latency_s": r.latency_s,
            "array_area_um2": r.array_area_um2, "area_mm2": r.area_mm2,
        })
    digital = [{**r.op.to_dict(), "energy_pJ": r.energy_pj, "energy_total_pJ": r.total_pj, "latency_s": r.latency_s}
               for r in report.digital]
    breakdown = report.breakdown_pj
    total_macs = totals["macs"] + totals["digital_macs"]
    out: dict[str, Any] = {
        "format": FORMAT,
        "format_version": VERSION,
        "model": {"source": w.source, "model_type": w.model_type, "family": w.family},
        "input": w.input,
        "target": w.target,
        "device": w.device,
        "context_tokens": w.context,
        "unit": "per generated token (one decode step, batch 1)",
        "hardware": hw.to_dict(),
        "assumptions": list(report.assumptions),
        "layers": layers,
        "digital": digital,
        "totals": {
            **totals,
            "total_macs": total_macs,
            "area_mm2": report.area_mm2,
            "chips": report.chips,
            "phase_holding_W": report.holding_w,
            "energy_breakdown_pJ": breakdown,
            "energy_per_token_pJ": report.energy_pj,
            "energy_per_token_J": report.energy_j,
            "latency_per_token_s": report.latency_s,
            "tokens_per_s": report.tokens_per_s,
            "tokens_per_s_pipelined": report.tokens_per_s_pipelined,
            "tops_per_w_effective": 2 * total_macs / report.energy_pj if report.energy_pj else None,
        },
    }
    if report.products_pj:
        out["attention_products"] = {"energy_pJ": report.products_pj, "latency_s": report.products_latency_s,
                                     "note": "writing K and V into arrays every token is not counted"}
    b = report.baseline
    if b is not None:
        out["baseline"] = {
            "hardware": b.profile.to_dict(), "ops": b.ops, "bytes": b.bytes, "energy_pJ": b.energy_pj,
            "energy_per_token_J": b.energy_j, "energy_at_tdp_J": b.energy_at_tdp_j,
            "latency_per_token_s": b.latency_s, "tokens_per_s": 1.0 / b.latency_s,
        }
    return out


def _summary_table(report: CostReport, t: dict[str, int]) -> str:
    """Each headline quantity on the chip and, where it means something, on the GPU baseline."""
    w, hw, b = report.workload, report.hardware, report.baseline
    gpu = (lambda s: s) if b is not None else (lambda s: "-")  # noqa: E731
    rows = [
        ("energy per token", _si(report.energy_j, "J"), gpu(_si(b.energy_j, "J") if b else "")),
        ("latency per token", _si(report.latency_s, "s"), gpu(_si(b.latency_s, "s") if b else "")),
        ("tokens/s, one stream", f"{report.tokens_per_s:,.0f}", gpu(f"{1 / b.latency_s:,.0f}" if b else "")),
        ("tokens/s, pipelined streams", f"{report.tokens_per_s_pipelined:,.0f}", "-"),
        ("MACs per token (analogue + digital)", f"{_count(t['analog_macs'])} + {_count(t['macs'] - t['analog_macs'] + t['digital_macs'])}",
         gpu(_count(b.ops / 2) if b else "")),
        ("arrays" if w.target == "crossbar" else "meshes", f"{t['arrays']:,}", "-"),
        ("area", f"{report.area_mm2:,.1f} mm²" + (f" ({report.chips} chip{'s' if report.chips > 1 else ''} of the anchor size)" if report.chips else ""), "-"),
    ]
    if b is not None:
        rows.append(("GPU energy at TDP × latency (upper bound)", "-", _si(b.energy_at_tdp_j, "J")))
        rows.append(("energy ratio GPU / analogue", f"{b.energy_j / report.energy_j:.3g}×", "-"))
    if report.holding_w:
        rows.append(("phase-shifter holding power", _si(report.holding_w, "W"), "-"))
    return markdown_table(("quantity", f"{hw.name}", f"GPU ({b.profile.name})" if b else "GPU"), rows)


def _layer_table(report: CostReport, t: dict[str, int]) -> str:
    """The analogue layers, one row each, then their totals."""
    target = report.workload.target
    header = ("layer", "shape", "tiles", "arrays", "MACs", "reads", "DAC", "ADC", "periph. FLOPs", "area mm²",
              "energy", "latency")
    rows = []
    for r in report.layers:
        c = r.counts
        shape = f"{c.experts}×{c.out}×{c.inp}" if c.experts > 1 else f"{c.out}×{c.inp}"
        grid = f"{c.tiles}×{c.col_blocks}" + (f"×{c.in_blocks}" if target == "photonic" else "")
        rows.append((c.name + ("" if c.analog else " (weight-side)"), shape, grid, f"{c.arrays:,}",
                     _count(c.macs), f"{c.array_reads:,}", f"{c.dac_conversions:,}", f"{c.adc_conversions:,}",
                     f"{c.periphery_flops:,}", f"{r.area_mm2:.3g}", _si(r.total_pj * PJ, "J"),
                     _si(r.latency_s, "s")))
    rows.append(("**total**", "", "", f"{t['arrays']:,}", _count(sum(r.counts.macs for r in report.layers)),
                 f"{t['array_reads']:,}", f"{sum(r.counts.dac_conversions for r in report.layers):,}",
                 f"{sum(r.counts.adc_conversions for r in report.layers):,}", f"{t['periphery_flops']:,}",
                 f"{report.area_mm2:.4g}", _si(sum(r.total_pj for r in report.layers) * PJ, "J"),
                 _si(sum(r.latency_s for r in report.layers), "s")))
    return markdown_table(header, rows)


def _digital_table(report: CostReport, t: dict[str, int]) -> str:
    """The digital parts, one row each, then their totals (DRAM traffic in bytes)."""
    hw = report.hardware
    bpv = hw.digital.bytes_per_value if hw.digital else 2
    rows = [(r.op.name, _count(r.op.flops), _count(r.op.dram_values * bpv), _si(r.total_pj * PJ, "J"),
             _si(r.latency_s, "s"), r.op.note) for r in report.digital]
    rows.append(("**total**", _count(t["digital_flops"]), _count(t["dram_values"] * bpv),
                 _si(sum(r.total_pj for r in report.digital) * PJ, "J"),
                 _si(sum(r.latency_s for r in report.digital), "s"), ""))
    return markdown_table(("part", "FLOPs", "DRAM bytes", "energy", "latency", "note"), rows)


def markdown(report: CostReport) -> str:
    """The tables ``analogllm cost`` prints and writes to ``cost.md``."""
    w, hw = report.workload, report.hardware
    t = w.totals()
    lines = [
        f"# Cost per token: {w.source or w.model_type} on {hw.name} ({w.target}, {w.device} profile)",
        "",
        f"{hw.description}. One decode step at {w.context} tokens of context, batch 1; input: {w.input}.",
        "",
        "## Summary",
        "",
        _summary_table(report, t),
        "",
    ]

    lines += ["## Energy by component", ""]
    total = report.energy_pj
    comp = sorted(report.breakdown_pj.items(), key=lambda kv: -kv[1])
    lines += [markdown_table(("component", "energy / token", "share"),
                             [(k, _si(v * PJ, "J"), f"{100 * v / total:.1f} %") for k, v in comp]), ""]

    lines += ["## Analogue layers", "", _layer_table(report, t), ""]
    lines += ["## Digital parts", "", _digital_table(report, t), ""]
    if report.products_pj:
        lines += [f"Attention products on the chip: {_si(sum(report.products_pj.values()) * PJ, 'J')} per token "
                  "(writing K and V into arrays is not counted).", ""]

    lines += ["## Assumptions", ""] + [f"- {a}" for a in report.assumptions] + [""]
    lines += ["## Sources", ""]
    for profile in (hw, *([report.baseline.profile] if report.baseline else [])):
        lines += [f"{profile.name}:", ""] + [f"- `{k}` = {v_num}: {profile.sources[k]}"
                                             for k, v_num in profile.numbers().items()] + [""]
    return "\n".join(lines).rstrip() + "\n"


def plot(report: CostReport, file: Any) -> None:
    """Energy per token by component (log axis, with the chip's total and the GPU's as reference lines)
    and the latency split, as a PNG into ``file`` (a path or a binary file object)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True, width_ratios=(3, 2))
    ax = axes[0]
    parts = sorted(((k, v * PJ) for k, v in report.breakdown_pj.items() if v > 0), key=lambda kv: kv[1])
    ax.barh([k for k, _ in parts], [v for _, v in parts], color="tab:blue")
    ax.axvline(report.energy_j, color="tab:blue", linestyle="--", linewidth=1.2,
               label=f"{report.hardware.name} total {_si(report.energy_j, 'J')}")
    if report.baseline is not None:
        ax.axvline(report.baseline.energy_j, color="black", linestyle=":", linewidth=1.5,
                   label=f"{report.baseline.profile.name} total {_si(report.baseline.energy_j, 'J')}")
    ax.set_xscale("log")
    ax.set_xlabel("energy per token (J, log scale)")
    ax.set_title("Energy per token by component")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)

    ax = axes[1]
    split = {"analogue layers": sum(r.latency_s for r in report.layers),
             "digital parts": sum(r.latency_s for r in report.digital),
             "attention products": report.products_latency_s}
    labels = [k for k, v in split.items() if v > 0]
    ax.bar(labels, [split[k] * 1e6 for k in labels], color=["tab:blue", "tab:orange", "tab:green"][: len(labels)])
    if report.baseline is not None:
        ax.axhline(report.baseline.latency_s * 1e6, color="black", linestyle=":", linewidth=1.5,
                   label=f"{report.baseline.profile.name} {_si(report.baseline.latency_s, 's')}")
        ax.legend(fontsize=8)
    ax.set_ylabel("latency per token (µs)")
    ax.set_title(f"Latency {_si(report.latency_s, 's')} per token ({report.tokens_per_s:,.0f} tokens/s)")
    ax.grid(True, axis="y", alpha=0.3)
    w = report.workload
    fig.suptitle(f"{w.source or w.model_type} on {report.hardware.name}, context {w.context}: "
                 f"{_si(report.energy_j, 'J')} per token")
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)


def check_destination(out: Path) -> None:
    """Refuse a file, or a non-empty folder that is not an earlier cost report."""
    if out.is_file():
        raise ValueError(f"{out} is a file; choose an output folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "cost.json").read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        extra = {p.name for p in out.iterdir()} - set(FILES)
        if not ours or extra:
            raise ValueError(f"{out} exists and is not an analogllm cost report; choose another folder or remove it")


def write_report(report: CostReport, out: str | Path) -> dict[str, Path]:
    """Write cost.json, cost.md and cost.png into ``out`` at once (a temporary folder renamed into place)."""
    out = Path(out)
    check_destination(out)
    data = json.dumps(to_dict(report), indent=1, allow_nan=False).encode()
    text = markdown(report).encode()
    png = io.BytesIO()
    plot(report, png)
    with atomic_dir(out) as tmp:
        (tmp / "cost.json").write_bytes(data)
        (tmp / "cost.md").write_bytes(text)
        (tmp / "cost.png").write_bytes(png.getvalue())
    return {name: out / name for name in FILES}


__all__ = ["FILES", "FORMAT", "check_destination", "markdown", "plot", "to_dict", "write_report"]
