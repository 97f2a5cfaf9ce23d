"""Timing helpers shared by the benchmark scripts.

Cases are timed round-robin (one run of each case per round, many rounds, median per case), so a
machine that speeds up or slows down during the run (turbo, another process) shifts every case alike
and the ratios stay honest.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import analogllm as al

#: the read path the other toolkits simulate, pinned so the ratios compare like with like: drift
#: compensation as a digital gain after the ADC (aihwkit's GlobalDriftCompensation), no measured
#: low-rank correction, no digital KV prefix (the pcm profile turns on the latter two and pulse
#: compensation for quality; ``--set`` puts them back)
READ_PATH = {"drift.compensation_at": "digital", "mapping.correction_rank": 0, "kv_prefix": []}


def bench_config(profile: str, **overrides: object) -> al.AnalogConfig:
    """``profile`` on the pinned :data:`READ_PATH`, then ``overrides``."""
    return al.AnalogConfig.from_profile(profile, **{**READ_PATH, **overrides})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(cases: dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of every case, measured interleaved."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads"
