"""The hardware-aware training recipe: one YAML file that says what to train, on which chip, how, and
how to score it.

A recipe is a frozen dataclass validated by :mod:`analogllm.config.schema`, so a typo or a wrong type in the
YAML (or in ``--set key=value``) is one error that names the key. Sections follow the run:

    model ─(pretrain: digital warm-up for randomly initialised built-in models)─► analog: convert to a
    device profile, data-initialise the DAC ranges ─► train: HWA training ─► eval: perplexity and token
    accuracy of the digital and analogue models at drift times × chip instances
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from analogllm.config import AnalogConfig
from analogllm.config.schema import ConfigError, check

#: Drift times reported by default: 0 s, 1 hour, 1 day, 1 year, 10 years after programming.
DRIFT_TIMES: tuple[float, ...] = (0.0, 3600.0, 86400.0, 31_536_000.0, 315_360_000.0)

#: Names in ``train.freeze`` that stand for groups of modules rather than regexes on parameter names.
FREEZE_GROUPS: tuple[str, ...] = ("embeddings", "norms", "lm_head")


@dataclass(frozen=True)
class PretrainSection:
    """Digital warm-up before conversion, for built-in tiny models that start from random weights (they
    would otherwise have nothing to lose on the chip). The result is cached, keyed by everything that
    determines it. ``steps: 0`` (the default) uses the model as loaded."""

    steps: int = 0
    lr: float = 3e-3
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.steps >= 0, "pretrain.steps", f"must be >= 0, got {self.steps}")
        check(self.lr > 0, "pretrain.lr", f"must be > 0, got {self.lr}")
        check(self.batch_size >= 1, "pretrain.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class AnalogSection:
    """The chip: a device profile (built-in name or YAML path) with dotted overrides such as
    ``{training.weight_noise: 0.05}`` or ``{mapping.rotate: false}``, and how much text maps the model
    onto it.

    calibration_blocks: training blocks given to ``analogize_`` as calibration text: the model is mapped
        onto the converters (rotations, rescaling, DAC and ADC ranges, as the profile's ``mapping``
        section says; :mod:`analogllm.mapping`). The same blocks on every process, so data-parallel
        replicas agree. 0: no mapping; learned DAC ranges then start from the first batch's abs-max.
    """

    profile: str = "pcm"
    overrides: dict[str, Any] = field(default_factory=dict)
    calibration_blocks: int = 16

    def __post_init__(self) -> None:
        check(self.calibration_blocks >= 0, "analog.calibration_blocks", "must be >= 0")
        self.config()  # a bad profile or override is a recipe error, reported now with its key

    def config(self) -> AnalogConfig:
        """The :class:`AnalogConfig` this section describes."""
        try:
            return AnalogConfig.from_profile(self.profile, **self.overrides)
        except ConfigError as exc:
            where = "analog.profile" if str(exc).startswith("unknown profile") else "analog.overrides"
            raise ConfigError(f"{where}: {exc}") from None


def check_text(data: Any) -> None:
    """The checks every recipe's data section shares (HWA and finetune): block size and self-generation."""
    check(data.block_size >= 2, "data.block_size", f"must be >= 2, got {data.block_size}")
    check(data.generated_blocks >= 1, "data.generated_blocks", f"must be >= 1, got {data.generated_blocks}")
    check(data.temperature > 0, "data.temperature", f"must be > 0, got {data.temperature}")


@dataclass(frozen=True)
class DataSection:
    """Text for training and calibration (see :func:`analogllm.data.token_blocks`): the built-in offline
    corpus, a local text/json/parquet file or folder, a Hub dataset name, or ``generated``: text the
    digital model writes itself (``generated_blocks`` blocks sampled at ``temperature``; Analog Foundation
    Models), so no corpus is needed. Evaluation uses the held-out validation tail of the source (of
    the built-in corpus for ``generated``) and the held-out texts of ``eval.heldout``."""

    source: str = "builtin"
    text_column: str = "text"
    hub_split: str = "train"
    block_size: int = 128
    validation_fraction: float = 0.1
    max_train_blocks: int | None = None
    generated_blocks: int = 256
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_text(self)
        check(0 < self.validation_fraction < 1, "data.validation_fraction", "must lie in (0, 1)")
        check(self.max_train_blocks is None or self.max_train_blocks >= 1, "data.max_train_blocks", "must be >= 1 or null")


@dataclass(frozen=True)
class DistillSection:
    """Knowledge distillation from the frozen digital model (Analog Foundation Models use T = 1).

    weight: share of the distillation loss in the total, the rest being next-token cross-entropy
    (1.0 = pure distillation, which needs no labels and keeps the model's own behaviour).
    """

    enabled: bool = False
    temperature: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        check(self.temperature > 0, "train.distill.temperature", f"must be > 0, got {self.temperature}")
        check(0 <= self.weight <= 1, "train.distill.weight", f"must lie in [0, 1], got {self.weight}")


@dataclass(frozen=True)
class TrainSection:
    """The training loop.

    hardware_aware: ``true`` trains the converted model in ``train()`` mode (training noise, clipping,
        converters with straight-through gradients); ``false`` trains the digital model and converts it
        afterwards: the plain-training baseline at the same budget.
    batch_size: blocks per micro-batch per process; one optimiser step sees
        ``batch_size × grad_accum × processes`` blocks.
    input_range_lr: learning rate of the learned DAC ranges (``null`` = ``lr``). They are single
        scalars of order 1–100, so they usually want a far larger rate than the weights.
    clamp_weights: clip every analogue weight in place to ±clip_sigma·σ of its output channel after each
        optimiser step (and once before the first), as Analog Foundation Models do, so that the matrix
        programmed on the chip is the one that was trained.
    freeze: parameters kept fixed: the groups ``embeddings``, ``norms``, ``lm_head`` (found by module
        type, whatever the model calls them) and/or regular expressions on parameter names.
    precision: ``bf16`` autocast (CUDA with bf16 support, and CPU), ``auto`` (bf16 where supported,
        else fp32) or ``no``.
    checkpoint_every: save a resumable checkpoint every N optimiser steps (0 = none); the newest
        ``keep_checkpoints`` are kept.
    fsdp: shard the parameters, gradients and optimiser state across the processes (FSDP2
        ``fully_shard``, each decoder layer a unit) instead of replicating them (data parallel). Needs
        several processes (``torchrun`` / ``accelerate launch``); ``accelerate launch --use_fsdp
        --fsdp_version 2`` turns it on too. Checkpoints are then sharded too, and ``OUTPUT/final`` is the
        full analogue checkpoint, as from one process.
    zero3: the same with DeepSpeed ZeRO stage 3 (every parameter partitioned flat, gathered module by
        module; needs ``pip install 'analogllm[zero3]'``); ``accelerate launch --use_deepspeed
        --zero_stage 3`` turns it on too. See :mod:`analogllm.training.sharding`.
    """

    steps: int = 100
    lr: float = 1e-4
    input_range_lr: float | None = None
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    precision: Literal["no", "bf16", "auto"] = "no"
    hardware_aware: bool = True
    clamp_weights: bool = True
    freeze: tuple[str, ...] = FREEZE_GROUPS
    distill: DistillSection = field(default_factory=DistillSection)
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    fsdp: bool = False
    zero3: bool = False

    def __post_init__(self) -> None:
        check(self.steps >= 0, "train.steps", f"must be >= 0, got {self.steps}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.input_range_lr is None or self.input_range_lr >= 0, "train.input_range_lr", "must be >= 0 or null")
        check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0 or null")
        check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        check(self.log_every >= 1, "train.log_every", "must be >= 1")
        for i, pattern in enumerate(self.freeze):
            if pattern in FREEZE_GROUPS:
                continue
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    f"train.freeze[{i}]: {pattern!r} is neither a group ({', '.join(FREEZE_GROUPS)}) "
                    f"nor a valid regular expression ({exc})"
                ) from None


@dataclass(frozen=True)
class EvalSection:
    """Scoring: drift times (seconds after programming) × chip instances (seeds), on the first
    ``max_blocks`` held-out blocks of the training source's validation tail and of every text in
    ``heldout`` (sources nothing is trained or calibrated on, scored whole; the built-in default is a
    text of another kind, :data:`analogllm.data.HELDOUT`). Read noise is reseeded per (chip, time), so
    runs are repeatable."""

    drift_times: tuple[float, ...] = DRIFT_TIMES
    chip_seeds: tuple[int, ...] = (0, 1, 2)
    max_blocks: int = 16
    batch_size: int = 8
    plot: bool = True
    heldout: tuple[str, ...] = ("shakespeare",)

    def __post_init__(self) -> None:
        check(len(self.drift_times) > 0, "eval.drift_times", "must list at least one time")
        check(all(t >= 0 for t in self.drift_times), "eval.drift_times", "must be >= 0 seconds")
        check(len(set(self.drift_times)) == len(self.drift_times), "eval.drift_times", "lists a time twice")
        check(len(self.chip_seeds) > 0, "eval.chip_seeds", "must list at least one seed")
        check(len(set(self.chip_seeds)) == len(self.chip_seeds), "eval.chip_seeds", "lists a seed twice")
        check(self.max_blocks >= 1, "eval.max_blocks", f"must be >= 1, got {self.max_blocks}")
        check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class HWARecipe:
    """A complete hardware-aware training and evaluation run (``recipes/*.yaml``).

    model: a built-in name (``analogllm models``), a local ``save_pretrained`` folder or a Hub id.
    output_dir: where checkpoints, the trained analogue model (``final/``) and the reports go.
    """

    model: str = "tiny-llama"
    description: str = ""
    output_dir: str = "runs/hwa"
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    analog: AnalogSection = field(default_factory=AnalogSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "must name a model")
        check(bool(self.output_dir), "output_dir", "must not be empty")
        check(not self.train.distill.enabled or self.train.hardware_aware, "train.distill.enabled",
              "distillation needs hardware_aware: true (the teacher is the digital model itself)")
        for key in ("fsdp", "zero3"):
            check(not getattr(self.train, key) or self.train.hardware_aware, f"train.{key}",
                  "sharded training needs hardware_aware: true (the plain baseline converts the model after "
                  "training, which a sharded model cannot be)")

    def check_files(self) -> None:
        """Fail now, naming the key, when a path in the recipe does not exist (instead of after the
        model has loaded or halfway through a run)."""
        from analogllm.data import BUILTIN

        source = self.data.source
        local = source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in (".txt", ".json", ".jsonl", ".parquet")
        if source != BUILTIN and local and not Path(source).expanduser().exists():
            raise FileNotFoundError(f"data.source: no such file or directory: {source!r}")
        if self.model.startswith(("/", ".", "~")) and not Path(self.model).expanduser().is_dir():
            raise FileNotFoundError(f"model: no such model folder: {self.model!r}")


def load_hwa_recipe(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> HWARecipe:
    """Read and validate an HWA recipe (built-in name or YAML path) and apply dotted overrides, e.g.
    ``{"train.steps": 10, "analog.overrides.adc.bits": 6}`` (:func:`analogllm.recipes.load_recipe`)."""
    from analogllm.recipes import load_recipe

    return load_recipe(HWARecipe, name_or_path, overrides)


__all__ = [
    "DRIFT_TIMES", "FREEZE_GROUPS", "AnalogSection", "DataSection", "DistillSection", "EvalSection",
    "HWARecipe", "PretrainSection", "TrainSection", "load_hwa_recipe",
]
