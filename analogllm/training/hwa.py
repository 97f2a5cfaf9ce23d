"""Hardware-aware (HWA) training: teach a model to keep its accuracy when its matmuls run on a noisy chip.

The noise itself lives in the analogue layers: a converted model in ``train()`` mode adds weight noise
(sampled exactly in output space), output noise, per-channel weight clipping and the DAC/ADC with
straight-through gradients (:mod:`analogllm.nn.matrix`). This module adds what a training *run* needs
on top, following Analog Foundation Models (Büchel et al., NeurIPS 2025):

* data-initialised DAC input ranges (:func:`calibrate_input_ranges_`), learned afterwards with their
  own learning rate;
* weights clamped in place to ±clip_sigma·σ per output channel after every optimiser step
  (:func:`clamp_weights_`), so the matrix programmed on the chip is the matrix that was trained;
* knowledge distillation from the frozen digital model (:class:`Teacher`, :func:`distillation_loss`);
* frozen digital parts: embeddings, norms and the LM head by default (:func:`freeze_`);
* the loop (:func:`hwa_train`): LR schedule, gradient accumulation, bf16 autocast, ``accelerate`` for
  device placement and data parallelism, and checkpoints that resume the *same* run: same data order
  (a pure function of the step), optimiser, scheduler and RNG streams.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from analogllm.nn.convert import analog_matrices
from analogllm.nn.matrix import AnalogMatrix
from analogllm.ops.noise import seeded
from analogllm.ops.quant import clip_bound
from analogllm.training.config import FREEZE_GROUPS, TrainSection

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"


# ----- what is trained --------------------------------------------------------------------------------------
def frozen_parameter_names(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the parameters that ``patterns`` freeze (see ``TrainSection.freeze``).

    The groups are found by module type, not by name, because every family names them differently
    (``embed_tokens``/``wte``/``embeddings``; ``input_layernorm``/``ln_1``/``norm_f``/``q_norm``). A tied
    LM head is the embedding matrix, so freezing either freezes both.
    """
    groups = {p for p in patterns if p in FREEZE_GROUPS}
    regexes = [re.compile(p) for p in patterns if p not in FREEZE_GROUPS]
    frozen: set[int] = set()
    if "embeddings" in groups:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                frozen.update(id(p) for p in module.parameters())
    if "norms" in groups:
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                frozen.update(id(p) for p in module.parameters(recurse=False))
    if "lm_head" in groups and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        if head is not None:
            frozen.update(id(p) for p in head.parameters())
    return [
        name for name, p in model.named_parameters()
        if id(p) in frozen or any(r.search(name) for r in regexes)
    ]


def freeze_(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Make exactly the parameters not matched by ``patterns`` trainable; returns the frozen names."""
    frozen = set(frozen_parameter_names(model, patterns))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return sorted(frozen)


# ----- analogue-specific steps ------------------------------------------------------------------------------
@torch.no_grad()
def clamp_weights_(model: nn.Module) -> int:
    """Clip every analogue weight in place to ±clip_sigma·σ of its output channel (the training-time
    clipping made permanent). Returns how many matrices were clamped (those with ``clip_sigma`` set)."""
    count = 0
    for _, matrix, weight in analog_matrices(model):
        bound = clip_bound(weight, matrix.config.training.clip_sigma)
        if bound is None:
            continue
        weight.clamp_(min=-bound, max=bound)  # ``weight`` may be a view (Conv1D, experts): writes through
        count += 1
    return count


@torch.no_grad()
def calibrate_input_ranges_(
    model: nn.Module,
    blocks: torch.Tensor,
    batches: int,
    batch_size: int = 8,
    method: str = "max",
    std_alpha: float = 3.0,
    progress: bool = False,
) -> int:
    """Initialise every learned DAC input range from ``batches`` batches of ``blocks``.

    The forward passes run in ``train()`` mode (as aihwkit's ``init_from_data`` does), so each layer sees
    the inputs the analogue layers before it produce, without programming a chip. While calibrating, a
    layer's range is the running max of |x| (nothing is clipped, so later layers see undistorted
    inputs); at the end it is that max (``method="max"``) or ``std_alpha`` × the mean per-batch std of
    its inputs (``"std"``). The global RNG is left as it was. Returns the number of ranges set.
    """
    if method not in ("max", "std"):
        raise ValueError(f"calibration method must be 'max' or 'std', got {method!r}")
    matrices = [m for m in model.modules() if isinstance(m, AnalogMatrix) and m.config.dac.range == "learned"]
    if not matrices or batches == 0:
        return 0
    peak: dict[int, torch.Tensor] = {}
    std_sum: dict[int, torch.Tensor] = {}
    calls: dict[int, torch.Tensor] = {}

    def hook(module: AnalogMatrix, args: tuple, kwargs: dict) -> None:
        x = args[0].detach().float()
        expert = args[3] if len(args) > 3 else kwargs.get("expert")
        key = id(module)
        shape = module.input_range.shape
        if key not in peak:
            peak[key] = torch.zeros(shape, device=x.device)
            std_sum[key] = torch.zeros(shape, device=x.device)
            calls[key] = torch.zeros(shape, device=x.device)
        idx = () if expert is None else (expert,)
        peak[key][idx] = torch.maximum(peak[key][idx], x.abs().max())
        std_sum[key][idx] += x.std() if x.numel() > 1 else 0.0
        calls[key][idx] += 1
        module.input_range.copy_(peak[key].clamp(min=1e-8))
        module.range_ready.fill_(True)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in matrices]
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    try:
        with seeded(0, device):
            n = min(batches, math.ceil(len(blocks) / batch_size))
            for i in tqdm(range(n), desc="calibrating DAC ranges", disable=not progress, leave=False):
                model(input_ids=blocks[i * batch_size : (i + 1) * batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for m in matrices:
        key = id(m)
        if key not in peak:
            continue  # never called (e.g. a layer the data never reaches): keeps lazy initialisation
        hit = calls[key] > 0
        value = std_alpha * std_sum[key] / calls[key].clamp(min=1) if method == "std" else peak[key]
        value = torch.where(hit, value, value[hit].max())  # experts no token was routed to: the widest range
        m.input_range.copy_(value.clamp(min=1e-8))
    return len(peak)


# ----- distillation -----------------------------------------------------------------------------------------
class Teacher:
    """The frozen digital model whose output distribution the analogue student learns to reproduce.

    Frozen means: eval mode, ``requires_grad=False`` on every parameter and no autograd graph, so
    nothing in the student's backward pass can reach it.
    """

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, "analog_config", None) is not None:
            raise ValueError("the teacher must be the digital model: pass a copy taken before analogize_")
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over token positions (Hinton et al.;
    the T² keeps gradient magnitudes comparable across temperatures)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (the same definition as :func:`analogllm.eval.perplexity.evaluate_lm`)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


# ----- data order -------------------------------------------------------------------------------------------
def batch_indices(n_blocks: int, micro_step: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0) -> torch.Tensor:
    """The blocks of global micro-batch ``micro_step`` that process ``rank`` of ``world`` reads.

    Blocks are visited in epochs, each a permutation seeded by (seed, epoch); a global micro-batch is
    ``batch_size × world`` consecutive positions of that stream and rank r takes the r-th slice. It is a
    pure function of the step, so a resumed run reads exactly what the uninterrupted one would have.
    """
    start = (micro_step * world + rank) * batch_size
    positions = torch.arange(start, start + batch_size)
    epochs = positions // n_blocks
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        mask = epochs == epoch
        out[mask] = perm[positions[mask] % n_blocks]
    return out


# ----- checkpoints ------------------------------------------------------------------------------------------
def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (temporary folders ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name[len("step-"):]), default=None)


def _save_checkpoint(accelerator, output_dir: Path, step: int, losses: list[float], keep: int) -> Path:
    """Every process writes its part (its RNG state; the main process the model, optimiser and
    scheduler) into a temporary folder, which the main process then renames into place."""
    root = output_dir / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, "losses": losses}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(root.glob("step-*"), key=lambda p: int(p.name[len("step-"):]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----- the loop ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`hwa_train` did.

    steps: optimiser steps completed in total (including those before a resume);
    resumed_from: the step the call started at (0 for a fresh run);
    losses: mean training loss of every optimiser step of the whole run, averaged over processes;
    seconds: wall time of this call's loop; tokens: tokens this call trained on, over all processes.
    """

    steps: int
    resumed_from: int
    losses: tuple[float, ...]
    seconds: float
    tokens: int
    processes: int


def make_accelerator(find_unused_parameters: bool = False):
    """An ``Accelerator`` for this machine: GPUs when there are any, else CPU processes (``cpu=True``
    makes ``torchrun``/``accelerate launch --multi_gpu`` start a real gloo process group on CPU).
    ``find_unused_parameters`` is needed by data parallelism over MoE models, whose experts that receive
    no token in a step get no gradient. Mixed precision is not set here but per run
    (:func:`autocast`): accelerate fixes it once per process, and one process may train several times."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision: bf16`` (CPU and CUDA) or ``auto`` on a CUDA GPU that supports
    bf16; otherwise a no-op. (fp16 autocast does nothing on CPU, so it is not offered.)"""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def hwa_train(
    model: nn.Module,
    blocks: torch.Tensor,
    spec: TrainSection,
    *,
    teacher: Teacher | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    until: int | None = None,
    accelerator=None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``blocks`` (LongTensor [n, block_size]) as ``spec`` says.

    ``model`` is an analogue model (HWA training; convert and calibrate it first) or a digital one (plain
    training). With ``teacher`` the loss is ``w·KD + (1−w)·CE`` (``spec.distill``). Checkpoints go to
    ``output_dir/checkpoints`` every ``spec.checkpoint_every`` steps; ``resume`` continues from the newest
    one. ``until`` stops after that optimiser step (default ``spec.steps``), saving a checkpoint there
    when ``output_dir`` is given, while the LR schedule still spans ``spec.steps``: a long run can be
    split across jobs. Under ``torchrun``/``accelerate launch``
    every process calls this with the same arguments; gradients are averaged across processes.
    """
    distill = spec.distill
    if distill.enabled and teacher is None:
        raise ValueError("train.distill.enabled needs a teacher (the frozen digital model)")
    if (spec.checkpoint_every or resume) and output_dir is None:
        raise ValueError("checkpoints and resume need an output_dir")
    if len(blocks) == 0:
        raise ValueError("no training blocks")
    until = spec.steps if until is None else min(until, spec.steps)
    moe = any(hasattr(m, "analog_matrices") or getattr(m, "num_experts", 0) for m in model.modules())
    accelerator = accelerator or make_accelerator(find_unused_parameters=moe)
    world, rank = accelerator.num_processes, accelerator.process_index
    not_ready = [m for m in model.modules() if isinstance(m, AnalogMatrix) and hasattr(m, "range_ready") and not bool(m.range_ready)]
    if world > 1 and not_ready:
        raise ValueError(
            "learned DAC ranges are not initialised: with several processes each would initialise them from "
            "its own first batch; calibrate them first (analog.calibration_batches >= 1)"
        )
    from transformers import get_scheduler

    freeze_(model, spec.freeze)
    ranges = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("input_range")]
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("input_range")]
    groups = [{"params": weights, "lr": spec.lr, "weight_decay": spec.weight_decay}]
    if ranges:
        groups.append({"params": ranges, "lr": spec.lr if spec.input_range_lr is None else spec.input_range_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=spec.lr)
    schedule = "constant_with_warmup" if spec.schedule == "constant" else spec.schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=max(spec.steps, 1))
    if spec.clamp_weights:
        clamp_weights_(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # not prepared: accelerate would step it once per process
    raw = accelerator.unwrap_model(model)
    if teacher is not None:
        teacher.model.to(accelerator.device)

    # Training noise, dropout and the rest draw from the global RNG: seeded per run and process, and
    # restored afterwards, so a run is reproducible and leaves the caller's random streams as they were.
    # A resumed run replaces this state with the checkpoint's.
    with seeded(spec.seed * 1009 + rank, accelerator.device):
        start, losses = 0, []
        if resume:
            ckpt = latest_checkpoint(output_dir)  # type: ignore[arg-type]
            if ckpt is not None:
                accelerator.load_state(str(ckpt))
                state = json.loads((ckpt / TRAINER_STATE).read_text())
                start, losses = int(state["step"]), list(state["losses"])
                accelerator.wait_for_everyone()

        params = [p for g in groups for p in g["params"]]
        model.train()
        begin = time.perf_counter()
        analog = getattr(raw, "analog_config", None) is not None
        bar = tqdm(range(start, until), desc="HWA training" if analog else "training",
                   disable=not (progress and accelerator.is_main_process), initial=start, total=until)
        for step in bar:
            total = torch.zeros((), device=accelerator.device)
            for micro in range(spec.grad_accum):
                idx = batch_indices(len(blocks), step * spec.grad_accum + micro, spec.batch_size, rank, world, spec.seed)
                ids = blocks[idx].to(accelerator.device)
                sync = nullcontext() if micro == spec.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    with autocast(accelerator.device, spec.precision):
                        logits = model(input_ids=ids).logits
                    loss = lm_loss(logits, ids) if not distill.enabled or distill.weight < 1 else None
                    if distill.enabled:
                        kd = distillation_loss(logits, teacher.logits(ids), distill.temperature)  # type: ignore[union-attr]
                        loss = kd if loss is None else distill.weight * kd + (1 - distill.weight) * loss
                    accelerator.backward(loss / spec.grad_accum)
                total += loss.detach() / spec.grad_accum
            if spec.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if spec.clamp_weights:
                clamp_weights_(raw)
            losses.append(float(accelerator.reduce(total, reduction="mean")))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"training loss is {losses[-1]} at step {step + 1}; lower train.lr")
            if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0:
                _save_checkpoint(accelerator, Path(output_dir), step + 1, losses, spec.keep_checkpoints)  # type: ignore[arg-type]
        bar.close()
        stopped_early = until < spec.steps and until > start
        if stopped_early and output_dir is not None and not (spec.checkpoint_every and until % spec.checkpoint_every == 0):
            _save_checkpoint(accelerator, Path(output_dir), until, losses, spec.keep_checkpoints)  # resumable where it stopped
        seconds = time.perf_counter() - begin
        tokens = (until - start) * spec.grad_accum * spec.batch_size * world * blocks.shape[1]
    return TrainResult(steps=until, resumed_from=start, losses=tuple(losses), seconds=seconds, tokens=tokens, processes=world)


__all__ = [
    "Teacher", "TrainResult", "batch_indices", "calibrate_input_ranges_", "clamp_weights_", "distillation_loss",
    "freeze_", "frozen_parameter_names", "hwa_train", "latest_checkpoint", "lm_loss", "make_accelerator", "autocast",
]
