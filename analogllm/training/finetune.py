"""Fine-tuning LoRA adapters on a programmed chip: the recipe, the loop, and the measured result.

One run converts a model, programs one chip instance, ages it to the recipe's drift time, and then,
for each gradient mode in the recipe, trains a fresh adapter (same initialisation, same batches, same
chip) and scores it on held-out text:

* ``backprop``: autograd through the differentiable simulation of the deployed chip (its programmed,
  drifted weights; read noise; converters with straight-through gradients). In silico: it assumes the
  programmed weights are known.
* ``physics-aware``: forward on a :class:`~analogllm.tuners.pat.HardwareBackend` (here the simulated chip),
  backward through the digital twin (:mod:`analogllm.tuners.pat`). Needs only the target weights.
* ``zeroth-order``: SPSA / MeZO from forward passes on the backend alone (:mod:`analogllm.tuners.zeroth_order`).

Every evaluation reseeds the read noise, so the chip and each chip + LoRA are scored on the same noise
stream and their difference is the adapters', not the noise's. The base chip's fingerprint
(:func:`~analogllm.tuners.lora.chip_fingerprint`) is checked after every mode: only adapters may change.
Peak memory is the kernel's peak resident set size during each mode's training loop (CPU tensors have
no allocator statistics), reported above the level right before the loop.
"""

from __future__ import annotations

import ctypes
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
from analogllm.data import token_blocks
from analogllm.eval.perplexity import LMScore, evaluate_lm
from analogllm.hf.models import load_model
from analogllm.hf.checkpoint import save_pretrained
from analogllm.ops.noise import seeded
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


@dataclass(frozen=True)
class ChipSection:
    """The chip: a device profile (name or YAML path) with dotted overrides, one instance, one age."""

    profile: str = "pcm"
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    seconds: float = 86400.0

    def __post_init__(self) -> None:
        check(self.seconds >= 0, "chip.seconds", f"must be >= 0, got {self.seconds}")


@dataclass(frozen=True)
class DataSection:
    """Text: ``source`` as in :func:`analogllm.data.token_blocks`; ``eval_blocks`` held-out blocks."""

    source: str = "builtin"
    block_size: int = 128
    train_blocks: int | None = None
    eval_blocks: int = 16

    def __post_init__(self) -> None:
        check(self.block_size >= 2, "data.block_size", f"must be >= 2, got {self.block_size}")
        check(self.eval_blocks >= 1, "data.eval_blocks", f"must be >= 1, got {self.eval_blocks}")
        check(self.train_blocks is None or self.train_blocks >= 1, "data.train_blocks", "must be >= 1 or null")


@dataclass(frozen=True)
class TrainSection:
    """Gradient modes to run (each from the same fresh adapter) and the AdamW loop of the gradient modes."""

    modes: tuple[Mode, ...] = MODES  # type: ignore[assignment]
    steps: int = 50
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check(len(self.modes) > 0, "train.modes", f"must name at least one of {', '.join(MODES)}")
        check(len(set(self.modes)) == len(self.modes), "train.modes", "lists a mode twice")
        check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "must be > 0 or null")


@dataclass(frozen=True)
class EvalSection:
    """Scoring: batch size, whether to score the digital model first, the read-noise seed of every eval."""

    batch_size: int = 4
    digital: bool = True
    seed: int = 1234

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class FinetuneRecipe:
    """``analogllm finetune RECIPE``: model, chip, adapters, data, training modes, evaluation, output."""

    model: str = "tiny-llama"
    chip: ChipSection = field(default_factory=ChipSection)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    zeroth_order: ZerothOrderConfig = field(default_factory=ZerothOrderConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    out: str | None = None


@dataclass(frozen=True)
class ModeResult:
    """One gradient mode: its score and what it cost.

    forwards / backwards: passes over training batches (the chip runs every forward).
    peak_mib: peak resident memory during the training loop above the level right before it.
    notes: mode-specific measurements (zeroth-order: loss noise σ_L and finite-difference SNR).
    """

    mode: str
    score: LMScore
    trainable: int
    steps: int
    forwards: int
    backwards: int
    seconds: float
    peak_mib: float
    rss_mib: float
    first_loss: float
    last_loss: float
    notes: dict[str, float] = field(default_factory=dict)
    adapters: str | None = None


@dataclass(frozen=True)
class FinetuneResult:
    recipe: FinetuneRecipe
    digital: LMScore | None
    chip: LMScore
    modes: tuple[ModeResult, ...]
    fingerprint: str

    def recovered(self, result: ModeResult) -> tuple[float, float] | None:
        """Fraction of the noise-induced gap that the adapters recover, in perplexity and in loss:
        (chip − chip+LoRA) / (chip − digital). ``None`` without a digital score."""
        if self.digital is None:
            return None
        gap_ppl = self.chip.perplexity - self.digital.perplexity
        gap_loss = self.chip.loss - self.digital.loss
        ppl = (self.chip.perplexity - result.score.perplexity) / gap_ppl if gap_ppl else math.nan
        loss = (self.chip.loss - result.score.loss) / gap_loss if gap_loss else math.nan
        return ppl, loss

    def table(self, digital_label: str = "digital", chip_label: str = "analogue chip") -> str:
        """The measured table in Markdown (a read-back run names its rows after the map and the chip)."""
        from analogllm.cli.core import markdown_table

        header = ("model", "perplexity", "loss", "token acc.", "gap recovered (ppl / loss)", "trainable params", "steps",
                  "forward passes", "backward passes", "peak memory (MiB)", "time (s)")
        rows: list[tuple[str, ...]] = []
        if self.digital is not None:
            rows.append((digital_label, _num(self.digital.perplexity), f"{self.digital.loss:.3f}",
                         _pct(self.digital.token_accuracy), "-", "-", "-", "-", "-", "-", "-"))
        rows.append((chip_label, _num(self.chip.perplexity), f"{self.chip.loss:.3f}",
                     _pct(self.chip.token_accuracy), "0 %", "-", "-", "-", "-", "-", "-"))
        for r in self.modes:
            rec = self.recovered(r)
            frac = "-" if rec is None else f"{_pct(rec[0])} / {_pct(rec[1])}"
            rows.append((f"chip + LoRA ({r.mode})", _num(r.score.perplexity), f"{r.score.loss:.3f}",
                         _pct(r.score.token_accuracy), frac,
                         f"{r.trainable:,}", str(r.steps), str(r.forwards), str(r.backwards), f"{r.peak_mib:.0f}",
                         f"{r.seconds:.0f}"))
        return markdown_table(header, rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": to_dict(self.recipe),
            "digital": None if self.digital is None else asdict(self.digital),
            "chip": asdict(self.chip),
            "fingerprint": self.fingerprint,
            "modes": [{**asdict(r), "recovered": self.recovered(r)} for r in self.modes],
        }


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


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc), so a mode's peak is not hidden by the previous one's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak resident memory of the block, from the kernel's high-water mark.

    CPU tensors have no allocator statistics, and a sampling thread is no option: polling /proc from a
    second Python thread slowed SmolLM2 training steps up to 15x on a busy 2-core machine. Linux resets
    the process's high-water mark (VmHWM) on ``echo 5 > /proc/self/clear_refs``, so the peak of the block
    is read once at its end. Elsewhere the lifetime peak (``ru_maxrss``) is the best available.
    """

    def __enter__(self) -> _PeakMemory:
        _release_free_memory()
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


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def train_adapters(
    model: torch.nn.Module,
    mode: str,
    blocks: torch.Tensor,
    train: TrainSection,
    zeroth_order: ZerothOrderConfig,
    backend: HardwareBackend | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the adapters of a chip-LoRA ``model`` (from :func:`attach_lora`) in ``mode``.

    Returns the counts (steps, forwards, backwards), the first/last training loss and mode notes. The
    base chip is checked to be the deployed, frozen chip before and after. The chip's read noise comes
    from a stream seeded by ``train.seed``, equal for every mode; the caller's random streams are left
    as they were.
    """
    with seeded(train.seed + 1):
        return _train_adapters(model, mode, blocks, train, zeroth_order, backend, progress)


def _train_adapters(model, mode, blocks, train, zeroth_order, backend, progress) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    params = [p for _, p in adapter_parameters(model)]
    if not params:
        raise ValueError("the model has no trainable adapter parameters; attach them with attach_lora")
    batches = _batch_stream(blocks, train.batch_size, train.seed)
    losses: list[float] = []
    notes: dict[str, float] = {}
    forwards = backwards = 0

    if mode == "zeroth-order":
        steps = zeroth_order.steps or train.steps
        model.eval()  # forward passes only: no dropout, analogue adapters read as programmed
        check_deployed(model)
        spsa = SPSA(params, zeroth_order, seed=train.seed)
        with torch.no_grad(), on_hardware(model, backend):
            if zeroth_order.noise_probe:
                probe_batch = next(_batch_stream(blocks, train.batch_size, train.seed + 7))
                sigma_l, sigma_g = spsa.probe_noise(lambda: _lm_loss(model, probe_batch))
                notes.update(loss_noise=sigma_l, grad_noise=sigma_g)
            bar = tqdm(range(steps), desc="zeroth-order", disable=not progress, leave=False)
            signal = 0.0
            for _ in bar:
                ids = next(batches)
                step = spsa.step(lambda: _lm_loss(model, ids))
                losses.append(step.loss)
                signal += sum(abs(g) for g in step.projected) / len(step.projected)
                bar.set_postfix(loss=f"{step.loss:.3f}")
            forwards = spsa.forwards
            notes["mean_abs_projected_grad"] = signal / steps
            if "grad_noise" in notes and notes["grad_noise"] > 0:
                notes["snr"] = notes["mean_abs_projected_grad"] / notes["grad_noise"]
    else:
        steps = train.steps
        model.train()  # dropout only: the base stays the programmed chip (its mode is "chip")
        check_deployed(model)
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        context = on_hardware(model, backend) if mode == "physics-aware" else nullcontext()
        with context:
            bar = tqdm(range(steps), desc=mode, disable=not progress, leave=False)
            for _ in bar:
                ids = next(batches)
                loss = _lm_loss(model, ids)
                loss.backward()
                if train.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                forwards += 1
                backwards += 1
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"{mode}: training loss is {losses[-1]}; lower train.lr")
        model.eval()
    check_deployed(model)
    return {"steps": steps, "forwards": forwards, "backwards": backwards, "first_loss": losses[0],
            "last_loss": losses[-1], "notes": notes}


def score(model: torch.nn.Module, blocks: torch.Tensor, recipe: FinetuneRecipe, desc: str, progress: bool) -> LMScore:
    """Perplexity, loss and token accuracy on ``blocks`` under the recipe's read-noise seed, so every
    score of a run (chip, chip + each adapter) sees the same noise stream."""
    with seeded(recipe.eval.seed):  # the same read-noise stream for every score
        return evaluate_lm(model, blocks, batch_size=recipe.eval.batch_size, progress=progress, desc=desc)


def finetune(recipe: FinetuneRecipe, progress: bool = True, log: Callable[[str], None] = print) -> FinetuneResult:
    """Run ``recipe``: digital score, chip score, then one adapter per mode (see the module docstring)."""
    unknown = [m for m in recipe.train.modes if m not in MODES]
    if unknown:
        raise ConfigError(f"train.modes: unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    config = AnalogConfig.from_profile(recipe.chip.profile, **recipe.chip.overrides)
    model, tokenizer = load_model(recipe.model)
    train_blocks, val_blocks = recipe_blocks(recipe, tokenizer, log)
    digital = score(model, val_blocks, recipe, "digital", progress) if recipe.eval.digital else None
    if digital is not None:
        log(f"digital: perplexity {_num(digital.perplexity)}")

    t0 = time.perf_counter()
    analogize_(model, config)
    program_(model, recipe.chip.seed, recipe.chip.seconds)
    calibrate_(model, train_blocks[: recipe.train.batch_size], seed=recipe.chip.seed)
    log(f"programmed chip {recipe.chip.seed} ({config.name}) at t = {recipe.chip.seconds:g} s "
        f"in {time.perf_counter() - t0:.0f} s")
    chip = score(model, val_blocks, recipe, "chip", progress)
    log(f"analogue chip: perplexity {_num(chip.perplexity)}")
    fingerprint = chip_fingerprint(model)

    out = Path(recipe.out) if recipe.out else None
    if out is not None:
        save_pretrained(model, out / CHIP_DIR, tokenizer=tokenizer)

    def save(peft_model: torch.nn.Module, mode: str, result: dict[str, Any]) -> str:
        assert out is not None
        return str(save_adapters(peft_model, out / ADAPTERS_DIR / mode))

    _, results = run_modes(model, recipe, train_blocks, val_blocks, fingerprint, save if out else None, progress, log)
    result = FinetuneResult(recipe=recipe, digital=digital, chip=chip, modes=tuple(results), fingerprint=fingerprint)
    if out is not None:
        _write_json(out / "results.json", result.to_dict())
    return result


def recipe_blocks(recipe: FinetuneRecipe, tokenizer: Any,
                  log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) token blocks of the recipe's data section."""
    data = recipe.data
    train_blocks = token_blocks(tokenizer, data.source, block_size=data.block_size, split="train",
                                max_blocks=data.train_blocks)
    val_blocks = token_blocks(tokenizer, data.source, block_size=data.block_size, split="validation",
                              max_blocks=data.eval_blocks)
    log(f"{recipe.model}: {len(train_blocks)} training and {len(val_blocks)} evaluation blocks of "
        f"{data.block_size} tokens")
    return train_blocks, val_blocks


def run_modes(
    model: torch.nn.Module,
    recipe: FinetuneRecipe,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    fingerprint: str,
    save: Callable[[torch.nn.Module, str, dict[str, Any]], str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[torch.nn.Module, list[ModeResult]]:
    """Train one fresh adapter per mode of the recipe beside the chip of ``model`` (programmed or read
    back), score each, and hand it to ``save(peft_model, mode, info)`` (returning where it went).

    Returns the bare base model again (adapters unloaded, never merged) and the per-mode results; the
    base chip's ``fingerprint`` is checked after every mode, since only adapters may change.
    """
    results = []
    for mode in recipe.train.modes:
        peft_model = attach_lora(model, recipe.lora)
        trainable = sum(p.numel() for _, p in adapter_parameters(peft_model))
        backend = SimulatedChip(peft_model) if mode != "backprop" else None
        start = time.perf_counter()
        with _PeakMemory() as memory:
            info = train_adapters(peft_model, mode, train_blocks, recipe.train, recipe.zeroth_order, backend, progress)
        seconds = time.perf_counter() - start
        if chip_fingerprint(peft_model) != fingerprint:
            raise RuntimeError(f"{mode}: the base chip changed during adapter training")
        result_score = score(peft_model, val_blocks, recipe, f"chip + LoRA ({mode})", progress)
        saved = None
        if save is not None:
            saved = save(peft_model, mode, {"score": asdict(result_score), **info, "seconds": seconds})
        results.append(ModeResult(
            mode=mode, score=result_score, trainable=trainable, seconds=seconds, peak_mib=memory.peak - memory.start,
            rss_mib=memory.peak, adapters=saved, **info,
        ))
        log(f"chip + LoRA ({mode}): perplexity {_num(result_score.perplexity)}, train loss {info['first_loss']:.3f} → "
            f"{info['last_loss']:.3f}, {info['forwards']} forward passes, {seconds:.0f} s")
        model = peft_model.unload()  # the bare base again (no merge: the chip is untouched)
    return model, results


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
    "TrainSection", "finetune", "recipe_blocks", "run_modes", "score", "train_adapters",
]
