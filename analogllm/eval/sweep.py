"""Scoring an analogue model across chip instances and drift times.

A deployed analogue model is a random object twice over: each chip instance has its own programming
noise (fixed by a seed), and each chip ages after programming (drift, growing read noise). A single
number hides both, so every analogue score here is a grid: chip seeds × drift times, each point scored
with :func:`~analogllm.eval.perplexity.evaluate_lm` on the same held-out blocks, and summarised as
mean ± standard deviation over chips at each time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from analogllm.chip import program_
from analogllm.eval.perplexity import evaluate_lm
from analogllm.ops.noise import seeded

METRICS = ("perplexity", "token_accuracy", "loss")


@dataclass(frozen=True)
class ChipScore:
    """One chip instance (``seed``) read ``seconds`` after programming."""

    seed: int
    seconds: float
    loss: float
    perplexity: float
    token_accuracy: float


@dataclass(frozen=True)
class Series:
    """All chip scores of one model."""

    label: str
    points: tuple[ChipScore, ...]

    def at(self, seconds: float) -> list[ChipScore]:
        return [p for p in self.points if p.seconds == seconds]

    def stats(self, seconds: float, metric: str) -> tuple[float, float]:
        """(mean, standard deviation over chips) of ``metric`` at ``seconds``; the sample std (n − 1),
        0 for a single chip."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        values = [getattr(p, metric) for p in self.at(seconds)]
        if not values:
            raise ValueError(f"{self.label}: no scores at t = {seconds} s")
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        return mean, math.sqrt(var)


def drift_sweep(
    model: nn.Module,
    blocks: torch.Tensor,
    times: tuple[float, ...] | list[float],
    seeds: tuple[int, ...] | list[int],
    batch_size: int = 8,
    label: str = "analogue",
    progress: bool = False,
) -> Series:
    """Program ``model`` as each chip in ``seeds``, age it to each of ``times`` and score it on ``blocks``
    (:func:`drift_sweeps` with one text)."""
    return drift_sweeps(model, {"text": blocks}, times, seeds, batch_size, label, progress)["text"]


def drift_sweeps(
    model: nn.Module,
    texts: dict[str, torch.Tensor],
    times: tuple[float, ...] | list[float],
    seeds: tuple[int, ...] | list[int],
    batch_size: int = 8,
    label: str = "analogue",
    progress: bool = False,
) -> dict[str, Series]:
    """Program ``model`` as each chip in ``seeds``, age it to each of ``times`` and score it on every text
    (name → token blocks): one programming per (chip, time), however many texts, since programming a
    large model costs more than scoring it.

    The read noise of each (chip, time) point is drawn from its own seeded stream (the global RNG is
    restored afterwards), the same for every text, so a sweep is repeatable and two models swept alike
    see the same noise draws wherever their shapes agree.
    """
    if getattr(model, "analog_config", None) is None:
        raise ValueError("drift_sweep needs an analogue model: call analogllm.analogize_ first")
    device = next(model.parameters()).device
    points: dict[str, list[ChipScore]] = {name: [] for name in texts}
    grid = [(s, float(t)) for s in seeds for t in times]
    for seed, seconds in tqdm(grid, desc=f"{label}: chips × drift times", disable=not progress):
        program_(model, seed=seed, seconds=seconds)
        for name, blocks in texts.items():
            with seeded((seed * 1_000_003 + int(seconds)) % (2**31), device):
                score = evaluate_lm(model, blocks, batch_size)
            points[name].append(ChipScore(seed, seconds, score.loss, score.perplexity, score.token_accuracy))
    return {name: Series(label=label, points=tuple(p)) for name, p in points.items()}


__all__ = ["METRICS", "ChipScore", "Series", "drift_sweep", "drift_sweeps"]
