"""Hardware-aware (HWA) training: teach a model to keep its accuracy when its matmuls run on a noisy chip.

The noise itself lives in the analogue layers: a converted model in ``train()`` mode adds weight noise
(sampled exactly in output space), output noise, per-channel weight clipping and the DAC/ADC with
straight-through gradients (:mod:`analogllm.nn.matrix`). This module adds what a training *run* needs
on top, following Analog Foundation Models (Büchel et al., NeurIPS 2025):

* converter ranges set from data by the mapping's one calibrator (:mod:`analogllm.mapping.ranges`),
  learned afterwards with their own learning rate (DAC ranges, and ADC ranges with
  ``training.learn_adc``);
* drift-aware training noise: with ``training.noise: device`` every step draws the deployment time whose
  device statistics the noise follows from ``training.drift_times`` (:func:`sample_deployment_time_`);
* weights clamped in place to ±clip_sigma·σ per output channel after every optimiser step
  (:func:`clamp_weights_`), so the matrix programmed on the chip is the matrix that was trained;
* knowledge distillation from the frozen digital model (:class:`Teacher`, :func:`distillation_loss`);
* frozen digital parts: embeddings, norms and the LM head by default (:func:`freeze_`);
* the loop (:func:`hwa_train`): LR schedule, gradient accumulation, bf16 autocast, ``accelerate`` for
  device placement and data parallelism, and checkpoints that resume the *same* run: same data order
  (a pure function of the step), optimiser, scheduler and RNG streams;
* sharded training (``train.fsdp``: FSDP2, ``train.zero3``: DeepSpeed ZeRO-3), on CPU processes (gloo)
  too (:mod:`analogllm.training.sharding`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from analogllm.hf.prefix import attach_prefix
from analogllm.config.schema import ConfigError
from analogllm.nn.convert import own_matrices
from analogllm.nn.matrix import AnalogMatrix
from analogllm.chip.program import mode, modes
from analogllm.ops.noise import seeded
from analogllm.ops.quant import clip_bound
from analogllm.training.config import FREEZE_GROUPS, TrainSection
from analogllm.training.sharding import (
    Sharding, accelerator_sharding, average_grads_, checkpoint_sharding, gathered, partition_zero3_, plugin_for, sharding_requested,
    update_master_, use_sharding,
)

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
def clamp_weights_(model: nn.Module, sharding: Sharding | None = None) -> int:
    """Clip every analogue weight in place to ±clip_sigma·σ of its output channel (the training-time
    clipping made permanent). Returns how many matrices were clamped (those with ``clip_sigma`` set).
    A model sharded by FSDP is clamped shard by shard, with the statistics of whole channels; one
    partitioned by ZeRO-3 (``sharding="zero3"``) one layer at a time, its weights gathered whole."""
    count = 0
    for module in model.modules():
        if all(m.config.training.clip_sigma is None for _, m, _ in own_matrices(module)):
            continue
        with gathered(module, sharding):
            for _, matrix, weight in own_matrices(module):  # taken inside: views of the gathered parameters
                sigma = matrix.config.training.clip_sigma
                if sigma is None:
                    continue
                if _is_dtensor(weight):
                    _clamp_shard_(weight, sigma)
                else:
                    bound = clip_bound(weight, sigma)
                    weight.clamp_(min=-bound, max=bound)  # ``weight`` may be a view (Conv1D, experts): writes through
                count += 1
            if sharding == "zero3":
                update_master_([p for p in module.parameters() if p.dim() >= 2])
    return count


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _clamp_shard_(weight, sigma: float) -> None:
    """Clamp this process's shard of a sharded (…, out, in) weight. Where every output channel lies whole
    on one process (``nn.Linear`` and expert weights are sharded on their first dimension) the shard's
    own rows give the bounds; a weight sharded along its input dimension (GPT-2's ``Conv1D``, stored
    (in, out)) gathers the whole matrix for them (a collective, in the same order on every process)."""
    from torch.distributed.tensor import Shard

    local = weight.to_local()  # a view of the shard: in-place writes reach the parameter
    split = any(isinstance(p, Shard) and p.dim % weight.dim() == weight.dim() - 1 for p in weight.placements)
    bound = clip_bound(weight.full_tensor() if split else local, sigma)
    local.clamp_(min=-bound, max=bound)


# ----- distillation -----------------------------------------------------------------------------------------
class Teacher:
    """The frozen digital model whose output distribution the analogue student learns to reproduce.

    Frozen means: eval mode, ``requires_grad=False`` on every parameter and no autograd graph, so
    nothing in the student's backward pass can reach it. An analogue model qualifies only with every
    matrix in ``digital`` mode (its exact targets, e.g. the model a chip map was exported from).
    """

    def __init__(self, model: nn.Module, kv_prefix: Sequence[int] = ()) -> None:
        """``kv_prefix``: the student's digital KV prefix (``AnalogConfig.kv_prefix``), given to the teacher
        too, so both predict the same text after the same context."""
        if getattr(model, "analog_config", None) is not None and set(modes(model).values()) - {"digital"}:
            raise ValueError("the teacher must be the digital model: pass a copy taken before analogize_ "
                             "(or an analogue copy with set_mode(copy, 'digital'))")
        self.model = model.eval().requires_grad_(False)
        if kv_prefix and getattr(model, "analog_config", None) is None:  # an analogue copy has its own
            attach_prefix(self.model, kv_prefix)

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
    seconds: wall time of this call's loop; tokens: tokens this call trained on, over all processes;
    sharding: how it was sharded, ``"fsdp"``, ``"zero3"`` or None (the model is left sharded:
    :func:`analogllm.training.sharding.full_state_dict` gathers it); ``sharded``: whether it was.
    """

    steps: int
    resumed_from: int
    losses: tuple[float, ...]
    seconds: float
    tokens: int
    processes: int
    sharding: Sharding | None = None

    @property
    def sharded(self) -> bool:
        return self.sharding is not None


def make_accelerator(find_unused_parameters: bool = False, sharding: tuple[Sharding, object] | None = None):
    """An ``Accelerator`` for this machine: GPUs when there are any, else CPU processes (``cpu=True``
    makes ``torchrun``/``accelerate launch --multi_gpu`` start a real gloo process group on CPU).
    ``find_unused_parameters`` is needed by data parallelism over MoE models, whose experts that receive
    no token in a step get no gradient. Mixed precision is not set here but per run
    (:func:`autocast`): accelerate fixes it once per process, and one process may train several times.
    ``sharding`` (kind, plugin: :func:`~analogllm.training.sharding.plugin_for`) shards the model instead
    of replicating it (:func:`~analogllm.training.sharding.use_sharding`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    if sharding is not None:
        use_sharding(accelerator, *sharding)
    return accelerator


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision: bf16`` (CPU and CUDA) or ``auto`` on a CUDA GPU that supports
    bf16; otherwise a no-op. (fp16 autocast does nothing on CPU, so it is not offered.)"""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _optimizer(model: nn.Module, spec: TrainSection):
    """AdamW over the trainable parameters (after ``spec.freeze``), converter ranges in a group of their
    own (rate ``input_range_lr``, no weight decay), and the LR schedule. ADC ranges train only with
    ``training.learn_adc``."""
    from transformers import get_scheduler

    freeze_(model, spec.freeze)
    for m in model.modules():
        if isinstance(m, AnalogMatrix) and hasattr(m, "output_range"):
            m.output_range.requires_grad_(m.config.training.learn_adc and not m.chip.deployed)
    is_range = lambda n: n.endswith(("input_range", "output_range"))  # noqa: E731
    ranges = [p for n, p in model.named_parameters() if p.requires_grad and is_range(n)]
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not is_range(n)]
    groups = [{"params": weights, "lr": spec.lr, "weight_decay": spec.weight_decay}]
    if ranges:
        groups.append({"params": ranges, "lr": spec.lr if spec.input_range_lr is None else spec.input_range_lr,
                       "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=spec.lr)
    schedule = "constant_with_warmup" if spec.schedule == "constant" else spec.schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=max(spec.steps, 1))
    return optimizer, scheduler


def sample_deployment_time_(model: nn.Module, step: int, seed: int = 0) -> float | None:
    """Drift-aware training: set the deployment time whose device statistics this step's training noise
    follows (``training.noise: device``), one of ``training.drift_times`` drawn per step from a stream
    seeded by (seed, step), the same on every process. Returns the time, or None when no matrix uses it."""
    matrices = [m for m in model.modules() if isinstance(m, AnalogMatrix) and m.config.training.noise == "device"]
    if not matrices:
        return None
    times = matrices[0].config.training.drift_times or (0.0,)
    pick = int(torch.randint(len(times), (1,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step)))
    for m in matrices:
        m.train_seconds = float(times[pick])
    return float(times[pick])


def _resume(accelerator, output_dir) -> tuple[int, list[float]]:
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        return 0, []
    run = accelerator_sharding(accelerator)
    written = checkpoint_sharding(ckpt)
    if run != written:
        how = lambda k: f"train.{k}: true" if k else "train.fsdp: false and train.zero3: false"  # noqa: E731
        raise ConfigError(f"train.{run or written}: {ckpt} was written by a "
                          f"{'sharded (' + written + ')' if written else 'replicated'} run; resume it with {how(written)}")
    accelerator.load_state(str(ckpt))
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    accelerator.wait_for_everyone()
    return int(state["step"]), list(state["losses"])


def _step(model, raw, blocks, spec: TrainSection, step: int, teacher, accelerator, optimizer, scheduler,
          whole: list[nn.Parameter] | None = None, sharding: Sharding | None = None) -> float:
    """One optimiser step (``grad_accum`` micro-batches); returns its loss averaged over processes.
    ``whole``: under FSDP, the trainable parameters left out of sharding (their gradients are averaged
    here). Under ZeRO-3 (``sharding``) the engine itself accumulates, averages, clips and steps."""
    distill = spec.distill
    zero3 = sharding == "zero3"
    world, rank = accelerator.num_processes, accelerator.process_index
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
                kd = distillation_loss(logits, teacher.logits(ids), distill.temperature)
                loss = kd if loss is None else distill.weight * kd + (1 - distill.weight) * loss
            if zero3:  # the engine divides by grad_accum and steps on the last micro-batch
                model.backward(loss)
                model.step()
            else:
                accelerator.backward(loss / spec.grad_accum)
        total += loss.detach() / spec.grad_accum
    if whole is not None:
        average_grads_(whole, world)
    if spec.max_grad_norm is not None and not zero3:
        # sharded: all the model's parameters, so that accelerate takes its DTensor-aware path
        params = list(model.parameters()) if whole is not None else [p for g in optimizer.param_groups for p in g["params"]]
        accelerator.clip_grad_norm_(params, spec.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if spec.clamp_weights:
        clamp_weights_(raw, sharding)
    return float(accelerator.reduce(total, reduction="mean"))


def _check_run(blocks: torch.Tensor, spec: TrainSection, teacher: Teacher | None,
               output_dir: str | os.PathLike | None, resume: bool) -> None:
    """Refuse arguments that cannot make a run, before any process group or optimiser is set up."""
    if spec.distill.enabled and teacher is None:
        raise ValueError("train.distill.enabled needs a teacher (the frozen digital model)")
    if (spec.checkpoint_every or resume) and output_dir is None:
        raise ValueError("checkpoints and resume need an output_dir")
    if len(blocks) == 0:
        raise ValueError("no training blocks")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP or DeepSpeed wrapper (FSDP2 shards in place and wraps nothing). Not
    ``accelerator.unwrap_model``: that imports DeepSpeed whenever it is installed, which costs seconds and
    prints DeepSpeed's accelerator warning on every run that does not use it."""
    return getattr(model, "module", model)


def _prepare(model: nn.Module, spec: TrainSection, teacher: Teacher | None, accelerator):
    """The accelerator (one for this machine unless given; MoE models need ``find_unused_parameters``;
    sharding as :func:`~analogllm.training.sharding.sharding_requested` says), with the model (partitioned
    first under ZeRO-3), optimiser and scheduler prepared on it and the teacher on its device. Returns
    (accelerator, prepared model, unwrapped model, optimizer, scheduler, the parameters FSDP leaves
    whole or None, the sharding or None)."""
    moe = any(hasattr(m, "analog_matrices") or getattr(m, "num_experts", 0) for m in model.modules())
    kind = sharding_requested(spec) or (accelerator_sharding(accelerator) if accelerator is not None else None)
    plugin = plugin_for(kind, model, spec) if kind else None
    if accelerator is None:
        accelerator = make_accelerator(find_unused_parameters=moe, sharding=(kind, plugin) if kind else None)
    elif plugin is not None:
        use_sharding(accelerator, kind, plugin)
    not_ready = [m for m in model.modules() if isinstance(m, AnalogMatrix) and m.config.dac.range == "learned"
                 and not m.range_set]
    if accelerator.num_processes > 1 and not_ready:
        raise ValueError(
            "learned DAC ranges are not initialised: with several processes each would initialise them from "
            "its own first batch; calibrate them first (analog.calibration_batches >= 1)"
        )
    if kind == "zero3":
        partition_zero3_(model, plugin)
    optimizer, scheduler = _optimizer(model, spec)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # not prepared: accelerate would step it once per process
    raw = unwrap(model)
    if teacher is not None:
        teacher.model.to(accelerator.device)
    whole = None
    if kind == "fsdp":
        whole = [p for m in plugin.ignored_modules for p in m.parameters(recurse=False) if p.requires_grad]
    return accelerator, model, raw, optimizer, scheduler, whole, kind


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
    _check_run(blocks, spec, teacher, output_dir, resume)
    until = spec.steps if until is None else min(until, spec.steps)
    accelerator, model, raw, optimizer, scheduler, whole, kind = _prepare(model, spec, teacher, accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index

    # Training noise, dropout and the rest draw from the global RNG: seeded per run and process, and
    # restored afterwards, so a run is reproducible and leaves the caller's random streams as they were.
    # A resumed run replaces this state with the checkpoint's.
    analog = getattr(raw, "analog_config", None) is not None
    with seeded(spec.seed * 1009 + rank, accelerator.device), (mode(raw, "hwa") if analog else nullcontext()):
        start, losses = _resume(accelerator, output_dir) if resume else (0, [])
        model.train()
        begin = time.perf_counter()
        bar = tqdm(range(start, until), desc="HWA training" if analog else "training",
                   disable=not (progress and accelerator.is_main_process), initial=start, total=until)
        for step in bar:
            sample_deployment_time_(raw, step, spec.seed)
            losses.append(_step(model, raw, blocks, spec, step, teacher, accelerator, optimizer, scheduler, whole, kind))
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
    return TrainResult(steps=until, resumed_from=start, losses=tuple(losses), seconds=seconds, tokens=tokens,
                       processes=world, sharding=kind)


__all__ = [
    "Teacher", "TrainResult", "autocast", "batch_indices", "clamp_weights_", "distillation_loss", "freeze_",
    "frozen_parameter_names", "hwa_train", "latest_checkpoint", "lm_loss", "make_accelerator", "sample_deployment_time_", "unwrap",
]
