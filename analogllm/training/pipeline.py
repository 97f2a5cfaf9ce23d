"""A recipe, run end to end: base model → analogue model → HWA training → evaluation under drift.

The three CLI commands are thin wrappers around these functions:

* :func:`run_train` (``analogllm train``) trains and writes the analogue checkpoint ``OUTPUT/final``;
* :func:`run_eval` (``analogllm eval``) scores the digital model, the analogue model before HWA training
  and, when it exists, the trained one, at every drift time × chip instance;
* :func:`run_quickstart` (``analogllm quickstart``) does evaluate → train → evaluate in one process and
  returns the before/after report.

The "before" model is always the base model converted and calibrated exactly as training starts from,
so before and after differ only by the training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from analogllm.nn.convert import analogize_
from analogllm.ops.noise import seeded
from analogllm.data import BUILTIN, cache_dir, token_blocks
from analogllm.eval.perplexity import evaluate_lm
from analogllm.eval.report import EvalReport, write_report
from analogllm.fileio import atomic_dir
from analogllm.eval.sweep import drift_sweeps
from analogllm.hf.models import load_model
from analogllm.hf.checkpoint import from_pretrained, save_pretrained
from analogllm.hf.prefix import prefixed, resolve_prefix
from analogllm.config.schema import to_dict
from analogllm.training.config import HWARecipe
from analogllm.training.hwa import Teacher, TrainResult, hwa_train, unwrap
from analogllm.training.sharding import check_launch, full_state_dict, launch_processes, sharding_requested
from analogllm.training.selfgen import GENERATED, generated_blocks

FINAL = "final"
BEFORE = "analogue"
AFTER = "analogue + HWA"


# ----- data and models --------------------------------------------------------------------------------------
def blocks(recipe: HWARecipe, tokenizer: PreTrainedTokenizerBase, split: str,
           model: nn.Module | None = None, progress: bool = False) -> torch.Tensor:
    """Training blocks (for ``data.source: generated``, written by the digital ``model``), or the first
    ``eval.max_blocks`` validation blocks of the source (of the built-in corpus for ``generated``)."""
    d = recipe.data
    if d.source == GENERATED and split == "train":
        if model is None:
            raise ValueError("data.source: generated needs the digital model to write the training text")
        return generated_blocks(model, tokenizer, d.generated_blocks, d.block_size, d.temperature, recipe.train.seed,
                                progress)
    source = BUILTIN if d.source == GENERATED else d.source
    return token_blocks(
        tokenizer, source, block_size=d.block_size, split=split, validation_fraction=d.validation_fraction,
        text_column=d.text_column, hub_split=d.hub_split,
        max_blocks=recipe.eval.max_blocks if split == "validation" else d.max_train_blocks,
    )


def eval_texts(recipe: HWARecipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Every held-out text a recipe is scored on: the validation tail of its source, then each of
    ``eval.heldout`` whole; name → the first ``eval.max_blocks`` blocks."""
    d = recipe.data
    texts = {(BUILTIN if d.source == GENERATED else d.source): blocks(recipe, tokenizer, "validation")}
    for name in recipe.eval.heldout:
        texts[name] = token_blocks(tokenizer, name, block_size=d.block_size, split="all", text_column=d.text_column,
                                   hub_split=d.hub_split, max_blocks=recipe.eval.max_blocks)
    return texts


def load_base(recipe: HWARecipe, progress: bool = True) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The digital model the recipe starts from, pre-trained digitally when ``pretrain.steps > 0``.

    The pre-trained model is cached under the analogllm cache, keyed by every field that determines
    it, so ``train``, ``eval`` and ``quickstart`` of one recipe share it and it is trained once. Under
    several processes the main process trains it while the others wait, then all read the cache.
    """
    recipe.check_files()
    pre = recipe.pretrain
    if pre.steps == 0:
        return load_model(recipe.model, seed=pre.seed)
    key = hashlib.sha256(json.dumps([recipe.model, to_dict(pre), to_dict(recipe.data)], sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir() / "pretrained" / f"{Path(recipe.model).name}-{key}"
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():
        if not target.is_dir():
            model, tokenizer = load_model(recipe.model, seed=pre.seed)
            _pretrain(model, blocks(recipe, tokenizer, "train"), pre.steps, pre.lr, pre.batch_size, pre.seed, progress)
            with atomic_dir(target, keep_existing=True) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        return load_model(str(target))


def _pretrain(model: nn.Module, train: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int, progress: bool) -> None:
    """Plain digital next-token training (one process): gives a randomly initialised model the
    language skill that analogue noise then erodes."""
    from analogllm.training.hwa import batch_indices, lm_loss
    from transformers import get_scheduler

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)
    with seeded(seed):
        for step in tqdm(range(steps), desc="digital pre-training", disable=not progress):
            ids = train[batch_indices(len(train), step, batch_size, seed=seed)]
            loss = lm_loss(model(input_ids=ids).logits, ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()


def to_analog(model: nn.Module, recipe: HWARecipe, train: torch.Tensor, progress: bool = True) -> nn.Module:
    """Convert ``model`` in place to the recipe's chip, mapped onto it with ``analog.calibration_blocks``
    evenly spaced training blocks; with ``progress``, the mapping report is printed (main process)."""
    from accelerate import PartialState

    n = recipe.analog.calibration_blocks
    calibration = train[torch.linspace(0, len(train) - 1, min(n, len(train))).long()] if n else None
    analogize_(model, recipe.analog.config(), calibration=calibration, progress=progress)
    report = model.analog_report.mapping
    if progress and report is not None and PartialState().is_main_process:
        tqdm.write(report.summary())
    return model.eval()


def _kv_prefix(model: nn.Module, recipe: HWARecipe) -> tuple[int, ...]:
    """The KV prefix ids the recipe's chip gives the digital ``model`` (``"bos"`` resolved), which its
    teacher and its digital reference read too."""
    return resolve_prefix(model, recipe.analog.config().kv_prefix)[0]


# ----- train ------------------------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    result: TrainResult
    checkpoint: Path | None


def _warn_repeated_generation(recipe: HWARecipe, n_blocks: int) -> None:
    """Warn when the run reads the self-generated blocks more than once. Distillation on a second pass
    fits the generated text rather than the chip: SmolLM2 on pcm, 120 steps over 256 blocks, scored
    1.24x on Shakespeare at 0 s against 1.21x after 60 steps (docs/training.md). The processes come from
    the launch's environment (:func:`launch_processes`): creating accelerate's state here, before the
    training loop sets it up, would fix it without the run's plugins."""
    t = recipe.train
    passes = t.steps * t.grad_accum * t.batch_size * launch_processes() / n_blocks
    if recipe.data.source == GENERATED and passes > 1 and os.environ.get("RANK", "0") == "0":
        warnings.warn(f"train: {t.steps} steps read the {n_blocks} generated blocks {passes:.1f} times; beyond one "
                      f"pass distillation fits the generated text, not the chip. Raise data.generated_blocks to "
                      f"at least {math.ceil(passes * n_blocks)} (about 1.2 s per 128-token block for a 135M model "
                      "on 2 cores) or train fewer steps.", stacklevel=2)


def run_train(
    recipe: HWARecipe,
    *,
    resume: bool = False,
    until: int | None = None,
    base: tuple[nn.Module, PreTrainedTokenizerBase] | None = None,
    progress: bool = True,
) -> TrainOutcome:
    """Train as the recipe says and write the analogue checkpoint to ``OUTPUT/final`` (main process).

    With ``hardware_aware: false`` the digital model is trained and only then converted: the baseline.
    ``base`` passes an already loaded base model (it is not modified). With ``train.fsdp`` or
    ``train.zero3`` the model is trained sharded; the whole model is gathered into ``OUTPUT/final`` and
    every process returns it as loaded from there (a run stopped early by ``until`` returns the sharded
    model).
    """
    if kind := sharding_requested(recipe.train):
        check_launch(kind)
    model, tokenizer = load_base(recipe, progress) if base is None else (copy.deepcopy(base[0]), base[1])
    train = blocks(recipe, tokenizer, "train", model, progress)
    spec = recipe.train
    _warn_repeated_generation(recipe, len(train))
    teacher = Teacher(copy.deepcopy(model), _kv_prefix(model, recipe)) if spec.distill.enabled else None
    if spec.hardware_aware:
        to_analog(model, recipe, train, progress)
    out = Path(recipe.output_dir)
    result = hwa_train(model, train, spec, teacher=teacher, output_dir=out, resume=resume, until=until, progress=progress)
    from accelerate import PartialState

    state = PartialState()
    model = unwrap(model)
    if not spec.hardware_aware:
        to_analog(model, recipe, train, progress)
    checkpoint = None
    if result.steps == spec.steps:
        checkpoint = out / FINAL
        weights = full_state_dict(model, result.sharding) if result.sharded else None  # every process takes part
        if state.is_main_process:
            save_pretrained(model, checkpoint, tokenizer=tokenizer, state_dict=weights)
            meta = {"steps": result.steps, "seconds": result.seconds, "processes": result.processes,
                    "sharded": result.sharded, "sharding": result.sharding, "tokens": result.tokens,
                    "final_loss": result.losses[-1] if result.losses else None}
            (checkpoint / "training.json").write_text(json.dumps(meta, indent=2))
        del weights
        state.wait_for_everyone()
        if result.sharded:  # every process continues with the whole trained model, as written
            model = from_pretrained(checkpoint)
    return TrainOutcome(model=model.eval(), tokenizer=tokenizer, result=result, checkpoint=checkpoint)


# ----- evaluate ---------------------------------------------------------------------------------------------
def evaluate_recipe(
    recipe: HWARecipe,
    base: tuple[nn.Module, PreTrainedTokenizerBase],
    trained: nn.Module | None = None,
    *,
    before: bool = True,
    progress: bool = True,
    extra: dict | None = None,
) -> list[EvalReport]:
    """Score the digital base model, the converted base model (``before``) and ``trained`` on every
    held-out text (:func:`eval_texts`); one report per text, the training source's first."""
    model, tokenizer = base
    ev = recipe.eval
    texts = eval_texts(recipe, tokenizer)
    analog = to_analog(copy.deepcopy(model), recipe, blocks(recipe, tokenizer, "train", model), progress) if before else None
    sweeps = [drift_sweeps(m, texts, ev.drift_times, ev.chip_seeds, ev.batch_size, label=label, progress=progress)
              for label, m in ((BEFORE, analog), (AFTER, trained)) if m is not None]
    reports = []
    with prefixed(model, _kv_prefix(model, recipe)):  # the digital reference reads the chip's context
        digitals = {name: evaluate_lm(model, val, ev.batch_size, progress=progress, desc=f"digital ({name})")
                    for name, val in texts.items()}
    for name, val in texts.items():
        digital = digitals[name]
        reports.append(EvalReport(
            model=recipe.model, profile=recipe.analog.profile, blocks=len(val), tokens=digital.tokens,
            drift_times=ev.drift_times, chip_seeds=ev.chip_seeds, digital=digital,
            series=tuple(sweep[name] for sweep in sweeps),
            meta={"text": name, "recipe": to_dict(recipe), **(extra or {})},
        ))
    return reports


def _write(reports: list[EvalReport], recipe: HWARecipe) -> dict[str, Path]:
    """``eval.{json,md,png}`` for the training source's text, ``eval-<text>.*`` for each held-out text."""
    paths: dict[str, Path] = {}
    for i, report in enumerate(reports):
        stem = "eval" if i == 0 else f"eval-{Path(report.meta['text']).stem}"
        for kind, path in write_report(report, Path(recipe.output_dir), stem, plot=recipe.eval.plot).items():
            paths[kind if i == 0 else f"{kind} ({report.meta['text']})"] = path
    return paths


def run_eval(recipe: HWARecipe, checkpoint: str | os.PathLike | None = None,
             progress: bool = True) -> tuple[list[EvalReport], dict[str, Path]]:
    """``analogllm eval``: before (and after, from ``checkpoint`` or ``OUTPUT/final`` when present), on
    every held-out text; writes the reports (:func:`_write`) to the output directory."""
    base = load_base(recipe, progress)
    path = Path(checkpoint) if checkpoint is not None else Path(recipe.output_dir) / FINAL
    if checkpoint is not None and not path.is_dir():
        raise FileNotFoundError(f"--checkpoint: no such checkpoint folder: {str(path)!r}")
    trained, extra = None, {}
    if path.is_dir():
        trained = from_pretrained(path)
        info = path / "training.json"
        extra = {"training": json.loads(info.read_text())} if info.is_file() else {}
    reports = evaluate_recipe(recipe, base, trained, progress=progress, extra=extra)
    return reports, _write(reports, recipe)


def run_quickstart(recipe: HWARecipe, progress: bool = True) -> tuple[list[EvalReport], dict[str, Path]]:
    """Evaluate → HWA-train → evaluate, in one process; the reports hold the before/after tables."""
    if kind := sharding_requested(recipe.train):
        check_launch(kind)
    start = time.perf_counter()
    base = load_base(recipe, progress)
    before = evaluate_recipe(recipe, base, progress=progress)
    outcome = run_train(recipe, base=base, progress=progress)
    after = evaluate_recipe(recipe, base, outcome.model, before=False, progress=progress)
    r = outcome.result
    extra = {"training": {"steps": r.steps, "seconds": r.seconds, "processes": r.processes, "tokens": r.tokens,
                          "final_loss": r.losses[-1] if r.losses else None},
             "total_seconds": time.perf_counter() - start}
    reports = [EvalReport(
        model=b.model, profile=b.profile, blocks=b.blocks, tokens=b.tokens, drift_times=b.drift_times,
        chip_seeds=b.chip_seeds, digital=b.digital, series=b.series + a.series, meta={**b.meta, **extra},
    ) for b, a in zip(before, after)]
    return reports, _write(reports, recipe)


__all__ = ["AFTER", "BEFORE", "FINAL", "GENERATED", "TrainOutcome", "blocks", "eval_texts", "evaluate_recipe",
           "load_base", "run_eval", "run_quickstart", "run_train", "to_analog"]
