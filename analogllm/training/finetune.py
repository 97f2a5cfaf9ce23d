"""LoRA adapters on programmed chips: the recipe, the loop, and the measured result.

One run loads a model (a digital one, converted and mapped onto the recipe's chip, or an analogue
checkpoint such as a hardware-aware trained model), then, for every chip instance (``chip.seeds``) and
drift time (``chip.ages``), programs that chip, ages it, scores it, and for each gradient mode trains a
fresh adapter (same initialisation, same batches) and scores the chip + adapter. An optional
``baseline`` (a digital model converted to the same chip, e.g. the model before hardware-aware training)
is scored on the same chips, so one table and one plot show chip, chip + HWA and chip + HWA + LoRA
against drift time. Scores are on held-out text: the source's validation tail and ``data.heldout``.

Gradient modes:

* ``backprop``: autograd through the differentiable simulation of the deployed chip (its programmed,
  drifted weights; read noise; converters with straight-through gradients). In silico: it assumes the
  programmed weights are known.
* ``physics-aware``: forward on a :class:`~analogllm.tuners.pat.HardwareBackend` (here the simulated chip),
  backward through the digital twin (:mod:`analogllm.tuners.pat`). Needs only the target weights.
* ``zeroth-order``: SPSA / MeZO from forward passes on the backend alone (:mod:`analogllm.tuners.zeroth_order`).

Every evaluation reseeds the read noise, so a chip and its chip + LoRA are scored on the same noise
stream and their difference is the adapters', not the noise's. The base chip's fingerprint
(:func:`~analogllm.tuners.lora.chip_fingerprint`) is checked after every mode: only adapters may change.
Peak memory is the kernel's peak resident set size during each mode's training loop (CPU tensors have
no allocator statistics), reported above the level right before the loop.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from analogllm.chip import program_
from analogllm.config import AnalogConfig
from analogllm.nn.convert import analogize_
from analogllm.data import BUILTIN, token_blocks
from analogllm.eval.perplexity import LMScore, evaluate_lm
from analogllm.hf.models import load_model
from analogllm.hf.checkpoint import save_pretrained
from analogllm.hf.prefix import prefixed
from analogllm.ops.memory import return_freed_memory
from analogllm.ops.noise import seeded
from analogllm.training.config import DistillSection, check_text
from analogllm.training.hwa import Teacher, distillation_loss, lm_loss
from analogllm.training.selfgen import GENERATED, generated_blocks
from analogllm.config.schema import ConfigError, check, to_dict
from analogllm.tuners.lora import (
    ADAPTERS_DIR,
    CHIP_DIR,
    LoraSettings,
    adapter_parameters,
    attach_lora,
    calibrate_,
    check_deployed,
    chip_fingerprint,
    save_adapters,
)
from analogllm.tuners.pat import HardwareBackend, SimulatedChip, on_hardware
from analogllm.tuners.zeroth_order import SPSA, ZerothOrderConfig

Mode = Literal["backprop", "physics-aware", "zeroth-order"]
MODES: tuple[str, ...] = ("backprop", "physics-aware", "zeroth-order")
#: the smallest chip-to-digital loss gap (nats) whose recovery is reported
MIN_GAP = 0.01


@dataclass(frozen=True)
class ChipSection:
    """The chips: the device profile digital models are converted to (name or YAML path; ``null``: pcm, an
    analogue checkpoint keeping its own config) with dotted overrides (for converted models only), the chip
    instances and the drift times to adapt at, and the calibration blocks that map a digital model onto
    the chip."""

    profile: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    ages: tuple[float, ...] = (86400.0,)
    calibration_blocks: int = 16

    def __post_init__(self) -> None:
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "chip.seeds",
              "must list at least one seed, each once")
        check(len(self.ages) > 0 and all(a >= 0 for a in self.ages), "chip.ages", "must list times >= 0 seconds")
        check(self.calibration_blocks >= 0, "chip.calibration_blocks", "must be >= 0")
        if self.profile is not None or self.overrides:  # a bad profile or override is reported now, with its key
            try:
                AnalogConfig.from_profile(self.profile or "pcm", **self.overrides)
            except ConfigError as exc:
                where = "chip.profile" if str(exc).startswith("unknown profile") else "chip.overrides"
                raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class DataSection:
    """Text: ``source`` as in :func:`analogllm.data.token_blocks` for training and calibration, or
    ``generated``: ``generated_blocks`` blocks the digital baseline writes itself at ``temperature``
    (:mod:`analogllm.training.selfgen`; the HWA recipe's text when the settings match, so it is sampled
    once); ``eval_blocks`` held-out blocks of the source's validation tail (the built-in corpus's for
    ``generated``) and of every text in ``heldout``."""

    source: str = "builtin"
    block_size: int = 128
    train_blocks: int | None = None
    eval_blocks: int = 16
    heldout: tuple[str, ...] = ("shakespeare",)
    generated_blocks: int = 256
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_text(self)
        check(self.eval_blocks >= 1, "data.eval_blocks", f"must be >= 1, got {self.eval_blocks}")
        check(self.train_blocks is None or self.train_blocks >= 1, "data.train_blocks", "must be >= 1 or null")


@dataclass(frozen=True)
class TrainSection:
    """Gradient modes to run (each from the same fresh adapter), the AdamW loop of the gradient modes and
    the objective: next-token cross-entropy, or (``distill.enabled``) distillation from the digital model
    (the baseline, else the model itself when it is digital). Distillation asks the adapters to undo what
    the chip changed rather than to fit the training text, so what they learn carries over to text of
    another kind; cross-entropy on a narrow corpus also learns that corpus."""

    modes: tuple[Mode, ...] = MODES  # type: ignore[assignment]
    steps: int = 50
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    distill: DistillSection = field(default_factory=DistillSection)

    def __post_init__(self) -> None:
        check(len(self.modes) > 0, "train.modes", f"must name at least one of {', '.join(MODES)}")
        check(len(set(self.modes)) == len(self.modes), "train.modes", "lists a mode twice")
        check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "must be > 0 or null")


@dataclass(frozen=True)
class EvalSection:
    """Scoring: batch size, whether to score the digital model, the read-noise seed of every eval, and
    whether to draw the drift plot."""

    batch_size: int = 4
    digital: bool = True
    seed: int = 1234
    plot: bool = True

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class FinetuneRecipe:
    """``analogllm finetune RECIPE``: model (and its label in the tables), an optional baseline model
    converted to the same chips, chips, adapters, data, training modes, evaluation, output folder."""

    model: str = "tiny-llama"
    label: str = "chip"
    baseline: str | None = None
    baseline_label: str = "chip (baseline)"
    chip: ChipSection = field(default_factory=ChipSection)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    zeroth_order: ZerothOrderConfig = field(default_factory=ZerothOrderConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    out: str | None = None


@dataclass(frozen=True)
class ModeResult:
    """One adapter: its mode, chip instance and age, and what training it cost.

    forwards / backwards: passes over training batches (the chip runs every forward).
    peak_mib: peak resident memory during the training loop above the level right before it.
    notes: mode-specific measurements (zeroth-order: loss noise σ_L and finite-difference SNR).
    """

    mode: str
    seed: int
    seconds: float
    trainable: int
    steps: int
    forwards: int
    backwards: int
    train_seconds: float
    peak_mib: float
    rss_mib: float
    first_loss: float
    last_loss: float
    notes: dict[str, float] = field(default_factory=dict)
    adapters: str | None = None


@dataclass(frozen=True)
class FinetuneResult:
    """Scores of every row (digital, baseline chip, chip, chip + LoRA per mode) on every held-out text at
    every age over every chip instance: ``scores[row][text]`` lists (seed, age, LMScore)."""

    recipe: FinetuneRecipe
    texts: tuple[str, ...]
    digital: dict[str, LMScore]
    scores: dict[str, dict[str, list[tuple[int, float, LMScore]]]]
    modes: tuple[ModeResult, ...]

    def stats(self, row: str, text: str, age: float, metric: str = "perplexity") -> tuple[float, float]:
        """(mean, sample std over chips) of ``metric`` for ``row`` on ``text`` at ``age``."""
        values = [getattr(s, metric) for _, a, s in self.scores[row][text] if a == age]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        return mean, math.sqrt(var)

    def recovered(self, mode_row: str, text: str, age: float) -> float | None:
        """Share of the chip's loss gap to digital that the adapters recover: (chip − LoRA)/(chip − digital);
        None without a digital score or when the chip is within 0.01 nats of digital (no gap to recover:
        the ratio would only measure noise, or the adapters improving on the digital model itself)."""
        if text not in self.digital:
            return None
        chip = self.stats(self.recipe.label, text, age, "loss")[0]
        gap = chip - self.digital[text].loss
        return (chip - self.stats(mode_row, text, age, "loss")[0]) / gap if gap > MIN_GAP else None

    def table(self, text: str) -> str:
        """Perplexity (mean ± std over chip instances) of every row on ``text``, one column per age."""
        from analogllm.eval.report import format_perplexity, format_seconds
        from analogllm.tables import markdown_table

        ages = self.recipe.chip.ages
        header = ("model", *(format_seconds(a) for a in ages))
        rows = []
        if text in self.digital:
            rows.append(("digital", *(format_perplexity(self.digital[text].perplexity) for _ in ages)))
        for row in self.scores:
            cells = []
            for a in ages:
                mean, std = self.stats(row, text, a)
                cells.append(format_perplexity(mean) + (f" ± {format_perplexity(std, like=mean)}"
                                                        if len(self.recipe.chip.seeds) > 1 else ""))
            rows.append((row, *cells))
        return markdown_table(header, rows)

    def cost_table(self) -> str:
        """What each gradient mode cost per adapter (means over chips and ages) and the loss gap it closed."""
        from analogllm.tables import markdown_table

        header = ("mode", "trainable params", "steps", "forward passes", "backward passes", "time (s)",
                  "peak memory (MiB)", "loss gap recovered")
        rows = []
        for mode in self.recipe.train.modes:
            rs = [r for r in self.modes if r.mode == mode]
            rec = [self.recovered(_mode_row(self.recipe, mode), self.texts[0], a) for a in self.recipe.chip.ages]
            rec_s = "-" if any(r is None for r in rec) else " / ".join(_pct(r) for r in rec)
            rows.append((mode, f"{rs[0].trainable:,}", str(rs[0].steps), str(rs[0].forwards), str(rs[0].backwards),
                         f"{sum(r.train_seconds for r in rs) / len(rs):.0f}", f"{max(r.peak_mib for r in rs):.0f}", rec_s))
        return markdown_table(header, rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": to_dict(self.recipe), "texts": list(self.texts),
            "digital": {k: asdict(v) for k, v in self.digital.items()},
            "scores": {row: {text: [{"seed": s, "seconds": a, **asdict(score)} for s, a, score in items]
                             for text, items in by_text.items()} for row, by_text in self.scores.items()},
            "modes": [asdict(r) for r in self.modes],
        }


def _mode_row(recipe: FinetuneRecipe, mode: str) -> str:
    return f"{recipe.label} + LoRA ({mode})"


def _pct(x: float) -> str:
    """A fraction as a percentage with enough digits that a gap not fully closed never reads 100 %."""
    digits = 1
    while x < 1 and round(100 * x, digits) >= 100 and digits < 6:
        digits += 1
    return f"{100 * x:.{digits}f} %"


def _num(x: float) -> str:
    return f"{x:.4g}" if x < 1e5 else f"{x:.3e}"


# ----- memory ---------------------------------------------------------------------------------------------
def _status_mib(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in MiB, or None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _PeakMemory:
    """Peak resident memory of the block, from the kernel's high-water mark.

    CPU tensors have no allocator statistics, and a sampling thread is no option: polling /proc from a
    second Python thread slowed SmolLM2 training steps up to 15x on a busy 2-core machine. Linux resets
    the process's high-water mark (VmHWM) on ``echo 5 > /proc/self/clear_refs``, so the peak of the block
    is read once at its end. Elsewhere the lifetime peak (``ru_maxrss``) is the best available.
    """

    def __enter__(self) -> _PeakMemory:
        return_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.start = _status_mib("VmRSS") or 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        hwm = _status_mib("VmHWM") if self.exact else None
        self.peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- the loop -------------------------------------------------------------------------------------------
def _batch_stream(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Random batches from a private generator: every mode sees the same batches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield blocks[torch.randint(0, len(blocks), (batch_size,), generator=gen)]


def _loss(model: torch.nn.Module, ids: torch.Tensor, target: torch.Tensor | None, distill: DistillSection) -> torch.Tensor:
    """The adapters' objective on one batch: cross-entropy, or with the teacher's logits ``target``
    ``w·KD + (1−w)·CE`` (``distill``)."""
    logits = model(input_ids=ids).logits
    if target is None:
        return lm_loss(logits, ids)
    kd = distillation_loss(logits, target, distill.temperature)
    return kd if distill.weight == 1 else distill.weight * kd + (1 - distill.weight) * lm_loss(logits, ids)


def train_adapters(
    model: torch.nn.Module,
    mode: str,
    blocks: torch.Tensor,
    train: TrainSection,
    zeroth_order: ZerothOrderConfig,
    backend: HardwareBackend | None = None,
    progress: bool = False,
    teacher: Teacher | None = None,
) -> dict[str, Any]:
    """Train the adapters of a chip-LoRA ``model`` (from :func:`attach_lora`) in ``mode``; with a
    ``teacher`` (the digital model) by distillation as ``train.distill`` says, else by cross-entropy.

    Returns the counts (steps, forwards, backwards), the first/last training loss and mode notes. The
    base chip is checked to be the deployed, frozen chip before and after. The chip's read noise comes
    from a stream seeded by ``train.seed``, equal for every mode; the caller's random streams are left
    as they were.
    """
    with seeded(train.seed + 1):
        return _train_adapters(model, mode, blocks, train, zeroth_order, backend, progress, teacher)


def _train_adapters(model, mode, blocks, train, zeroth_order, backend, progress, teacher) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    params = [p for _, p in adapter_parameters(model)]
    if not params:
        raise ValueError("the model has no trainable adapter parameters; attach them with attach_lora")
    if train.distill.enabled and teacher is None:
        raise ValueError("train.distill.enabled needs the digital teacher model (teacher=Teacher(digital))")
    teacher = teacher if train.distill.enabled else None

    def batch(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(ids, the teacher's logits or None) batches of one private stream."""
        return ((ids, None if teacher is None else teacher.logits(ids))
                for ids in _batch_stream(blocks, train.batch_size, seed))

    check_deployed(model)
    if mode == "zeroth-order":
        info = _zeroth_order(model, params, batch, train, zeroth_order, backend, progress)
    else:
        info = _gradient(model, params, mode, batch(train.seed), train, backend, progress)
    check_deployed(model)
    return info


def _zeroth_order(model, params, batch, train, zeroth_order, backend, progress) -> dict[str, Any]:
    """SPSA from forward passes on the backend; notes the loss noise and the finite-difference SNR."""
    steps = zeroth_order.steps or train.steps
    model.eval()  # forward passes only: no dropout, analogue adapters read as programmed
    spsa = SPSA(params, zeroth_order, seed=train.seed)
    losses: list[float] = []
    notes: dict[str, float] = {}
    batches = batch(train.seed)
    with torch.no_grad(), on_hardware(model, backend):
        if zeroth_order.noise_probe:
            probe, probe_target = next(batch(train.seed + 7))
            sigma_l, sigma_g = spsa.probe_noise(lambda: _loss(model, probe, probe_target, train.distill))
            notes.update(loss_noise=sigma_l, grad_noise=sigma_g)
        bar = tqdm(range(steps), desc="zeroth-order", disable=not progress, leave=False)
        signal = 0.0
        for _ in bar:
            ids, target = next(batches)
            step = spsa.step(lambda: _loss(model, ids, target, train.distill))
            losses.append(step.loss)
            signal += sum(abs(g) for g in step.projected) / len(step.projected)
            bar.set_postfix(loss=f"{step.loss:.3f}")
    notes["mean_abs_projected_grad"] = signal / steps
    if "grad_noise" in notes and notes["grad_noise"] > 0:
        notes["snr"] = notes["mean_abs_projected_grad"] / notes["grad_noise"]
    return {"steps": steps, "forwards": spsa.forwards, "backwards": 0, "first_loss": losses[0],
            "last_loss": losses[-1], "notes": notes}


def _gradient(model, params, mode, batches, train, backend, progress) -> dict[str, Any]:
    """AdamW on the adapters: backprop through the simulated chip, or physics-aware on the backend."""
    model.train()  # dropout only: the base stays the programmed chip (its mode is "chip")
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    losses: list[float] = []
    with on_hardware(model, backend) if mode == "physics-aware" else nullcontext():
        bar = tqdm(range(train.steps), desc=mode, disable=not progress, leave=False)
        for _ in bar:
            ids, target = next(batches)
            loss = _loss(model, ids, target, train.distill)
            loss.backward()
            if train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"{mode}: training loss is {losses[-1]}; lower train.lr")
    model.eval()
    return {"steps": train.steps, "forwards": train.steps, "backwards": train.steps, "first_loss": losses[0],
            "last_loss": losses[-1], "notes": {}}


def score(model: torch.nn.Module, blocks: torch.Tensor, recipe: FinetuneRecipe, desc: str, progress: bool) -> LMScore:
    """Perplexity, loss and token accuracy on ``blocks`` under the recipe's read-noise seed, so every score
    of a run (chip, chip + each adapter) sees the same noise stream."""
    with seeded(recipe.eval.seed):  # the same read-noise stream for every score
        return evaluate_lm(model, blocks, batch_size=recipe.eval.batch_size, progress=progress, desc=desc)


def recipe_texts(recipe: FinetuneRecipe, tokenizer, digital: torch.nn.Module | None = None,
                 progress: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(training blocks, held-out text name → blocks); ``digital`` writes the training text of
    ``data.source: generated``."""
    d = recipe.data
    source = BUILTIN if d.source == GENERATED else d.source
    if d.source == GENERATED:
        if digital is None:
            raise ConfigError("data.source: generated: the digital model writes the training text; name it as "
                              "`baseline` (an analogue checkpoint cannot)")
        train = generated_blocks(digital, tokenizer, d.generated_blocks, d.block_size, d.temperature,
                                 recipe.train.seed, progress)[: d.train_blocks]
    else:
        train = token_blocks(tokenizer, source, block_size=d.block_size, split="train", max_blocks=d.train_blocks)
    texts = {source: token_blocks(tokenizer, source, block_size=d.block_size, split="validation",
                                  max_blocks=d.eval_blocks)}
    for name in d.heldout:
        texts[name] = token_blocks(tokenizer, name, block_size=d.block_size, split="all", max_blocks=d.eval_blocks)
    return train, texts


def _analogue(name: str, recipe: FinetuneRecipe, train: torch.Tensor, progress: bool) -> torch.nn.Module:
    """``name`` as an analogue model: an analogue checkpoint as saved (its own config), or a digital model
    converted to the recipe's chip and mapped onto it with ``chip.calibration_blocks`` training blocks."""
    model, _ = load_model(name)
    if getattr(model, "analog_config", None) is not None:
        if recipe.chip.profile is not None:
            raise ConfigError(f"chip.profile: {name} is an analogue checkpoint with its own config; leave "
                              "chip.profile empty (chip.overrides apply to the digital models converted beside it)")
        return model
    config = AnalogConfig.from_profile(recipe.chip.profile or "pcm", **recipe.chip.overrides)
    n = recipe.chip.calibration_blocks
    calibration = train[torch.linspace(0, len(train) - 1, min(n, len(train))).long()] if n else None
    return analogize_(model, config, calibration=calibration, progress=progress)


def _check_teacher(recipe: FinetuneRecipe, digital: torch.nn.Module | None) -> None:
    """Refuse ``train.distill`` without a digital model to distil from."""
    if recipe.train.distill.enabled and digital is None:
        raise ConfigError(f"train.distill.enabled: {recipe.model} is an analogue checkpoint; name its digital "
                          "model as `baseline` so the adapters have a teacher")


def _program(model: torch.nn.Module, seed: int, age: float, calibration: torch.Tensor) -> None:
    program_(model, seed, age)
    calibrate_(model, calibration, seed=seed)  # unset learned DAC ranges (no mapping) from one read


def finetune(recipe: FinetuneRecipe, progress: bool = True, log: Callable[[str], None] = print) -> FinetuneResult:
    """Run ``recipe`` (see the module docstring)."""
    unknown = [m for m in recipe.train.modes if m not in MODES]
    if unknown:
        raise ConfigError(f"train.modes: unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    out = Path(recipe.out) if recipe.out else None
    model, tokenizer = load_model(recipe.model)
    digital_model = load_model(recipe.baseline)[0] if recipe.baseline else (
        None if getattr(model, "analog_config", None) is not None else model)
    train, texts = recipe_texts(recipe, tokenizer, digital_model, progress)
    written = " (written by the digital model)" if recipe.data.source == GENERATED else ""
    log(f"{recipe.model}: {len(train)} training blocks{written}; held-out: "
        + ", ".join(f"{k} ({len(v)} blocks)" for k, v in texts.items()))
    _check_teacher(recipe, digital_model)  # before minutes of mapping
    chip = _analogue(recipe.model, recipe, train, progress)
    baseline = _analogue(recipe.baseline, recipe, train, progress) if recipe.baseline else None
    kv_prefix = chip.analog_config.kv_prefix
    with prefixed(digital_model, kv_prefix if digital_model is not None else ()):  # the chip's context
        digital = {k: score(digital_model, v, recipe, f"digital ({k})", progress)
                   for k, v in texts.items()} if recipe.eval.digital and digital_model is not None else {}
    # the distillation teacher: the digital model scored beside the chips, with the chip's KV prefix
    teacher = Teacher(digital_model, kv_prefix) if recipe.train.distill.enabled else None
    if out is not None:  # the base the adapters sit beside (their folders name chip seed and age)
        save_pretrained(chip, out / CHIP_DIR, tokenizer=tokenizer)
    rows = ([recipe.baseline_label] if baseline is not None else []) + [recipe.label]
    rows += [_mode_row(recipe, m) for m in recipe.train.modes]
    scores: dict[str, dict[str, list]] = {r: {k: [] for k in texts} for r in rows}
    results = []
    calibration = train[: recipe.train.batch_size]
    for seed in recipe.chip.seeds:
        for age in recipe.chip.ages:
            for label, m in ((recipe.baseline_label, baseline), (recipe.label, chip)):
                if m is None:
                    continue
                _program(m, seed, age, calibration)
                for k, v in texts.items():
                    scores[label][k].append((seed, age, score(m, v, recipe, f"{label} ({k})", progress)))
            log(f"chip {seed} at {age:g} s: {recipe.label} perplexity "
                f"{_num(scores[recipe.label][next(iter(texts))][-1][2].perplexity)}")
            for mode in recipe.train.modes:
                save = None if out is None else (
                    lambda peft_model, mode, info, seed=seed, age=age:
                    save_adapters(peft_model, out / ADAPTERS_DIR / f"{mode}-chip{seed}-t{age:g}"))
                results.append(adapt(chip, mode, seed, age, train, texts, scores, recipe, save, progress, log,
                                     teacher))
    result = FinetuneResult(recipe=recipe, texts=tuple(texts), digital=digital, scores=scores, modes=tuple(results))
    if out is not None:
        _write_json(out / "results.json", result.to_dict())
        (out / "results.md").write_text(report_markdown(result) + "\n")
        if recipe.eval.plot:
            plot_recovery(result, out / "drift.png")
    return result


def adapt(chip, mode, seed, age, train, texts, scores, recipe, save, progress, log, teacher=None) -> ModeResult:
    """Train and score one fresh adapter in ``mode`` beside ``chip`` (programmed or read back at seed, age),
    append its scores to ``scores`` and hand it to ``save(peft_model, mode, info)`` (returning the folder).
    ``teacher``: the digital model that ``train.distill`` distils from."""
    fingerprint = chip_fingerprint(chip)
    peft_model = attach_lora(chip, recipe.lora)
    trainable = sum(p.numel() for _, p in adapter_parameters(peft_model))
    backend = SimulatedChip(peft_model) if mode != "backprop" else None
    start = time.perf_counter()
    with _PeakMemory() as memory:
        info = train_adapters(peft_model, mode, train, recipe.train, recipe.zeroth_order, backend, progress, teacher)
    seconds = time.perf_counter() - start
    if chip_fingerprint(peft_model) != fingerprint:
        raise RuntimeError(f"{mode}: the base chip changed during adapter training")
    row = _mode_row(recipe, mode)
    for k, v in texts.items():
        scores.setdefault(row, {t: [] for t in texts})[k].append((seed, age, score(peft_model, v, recipe, f"{row} ({k})", progress)))
    saved = None
    if save is not None:
        latest = {k: asdict(v[-1][2]) for k, v in ((k, scores[row][k]) for k in texts)}
        saved = str(save(peft_model, mode, {"scores": latest, **info, "train_seconds": seconds}))
    log(f"chip {seed} at {age:g} s + LoRA ({mode}): perplexity {_num(scores[row][next(iter(texts))][-1][2].perplexity)}, "
        f"train loss {info['first_loss']:.3f} → {info['last_loss']:.3f}, {seconds:.0f} s")
    peft_model.unload()  # the bare base again (no merge: the chip is untouched)
    return ModeResult(mode=mode, seed=seed, seconds=age, trainable=trainable, train_seconds=seconds,
                      peak_mib=memory.peak - memory.start, rss_mib=memory.peak, adapters=saved, **info)


def report_markdown(result: FinetuneResult) -> str:
    """The result's tables: perplexity against drift time on every held-out text, then the costs."""
    seeds = len(result.recipe.chip.seeds)
    spread = f"mean ± std over {seeds} chip instances" if seeds > 1 else "one chip instance"
    out = []
    for text in result.texts:
        out += [f"Perplexity on {text} ({spread})", "", result.table(text), ""]
    return "\n".join(out + ["Adapters", "", result.cost_table()])


def plot_recovery(result: FinetuneResult, path: Path) -> Path:
    """Perplexity against drift time, one panel per held-out text, one line per row (mean ± std)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analogllm.eval.report import format_seconds
    from analogllm.fileio import atomic_write_bytes

    ages = result.recipe.chip.ages
    x = list(range(len(ages)))
    fig, axes = plt.subplots(1, len(result.texts), figsize=(5.5 * len(result.texts), 4.2), constrained_layout=True,
                             squeeze=False)
    for ax, text in zip(axes[0], result.texts):
        if text in result.digital:
            ax.axhline(result.digital[text].perplexity, color="black", linestyle="--", label="digital")
        for row in result.scores:
            stats = [result.stats(row, text, a) for a in ages]
            mean = [m for m, _ in stats]
            std = [s for _, s in stats]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=row)
        ax.set_yscale("log")
        ax.set_xticks(x, [format_seconds(a) for a in ages])
        ax.set_xlabel("time since programming")
        ax.set_title(f"perplexity on {text}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "MODES", "ChipSection", "DataSection", "EvalSection", "FinetuneRecipe", "FinetuneResult", "ModeResult",
    "TrainSection", "adapt", "finetune", "plot_recovery", "recipe_texts", "report_markdown", "score", "train_adapters",
]
