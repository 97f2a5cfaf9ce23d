"""Sharded HWA training: parameters, gradients and optimiser state split across processes, not replicated.

Two engines, both through accelerate, both on CPU processes (gloo) as well as GPUs:

* **FSDP2** (``train.fsdp``, or ``accelerate launch --use_fsdp --fsdp_version 2``): ``fully_shard``, one
  unit per decoder layer; the analogue layers' converter ranges stay whole (:func:`fsdp_plugin`).
* **DeepSpeed ZeRO-3** (``train.zero3``, or ``accelerate launch --use_deepspeed --zero_stage 3``): every
  parameter partitioned flat across the processes and gathered module by module for its forward and
  backward (:func:`zero3_plugin`). The converted model is partitioned where it stands, after conversion
  and calibration (:func:`partition_zero3_`): mapping needs whole weights, so a model is never
  partitioned at load.

accelerate engages either plugin only on accelerators (its CPU processes always replicate with DDP),
while both engines shard over gloo too; so the accelerator's state is switched here, on CPU and GPU
alike (:func:`use_sharding`). The whole model is gathered back by :func:`full_state_dict`.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn

from analogllm.config.schema import ConfigError
from analogllm.nn.matrix import AnalogMatrix
from analogllm.training.config import TrainSection

Sharding = Literal["fsdp", "zero3"]
LAUNCH = {"fsdp": "torchrun --nproc_per_node 2 -m analogllm train RECIPE --set train.fsdp=true",
          "zero3": "torchrun --nproc_per_node 2 -m analogllm train RECIPE --set train.zero3=true"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def sharding_requested(spec: TrainSection) -> Sharding | None:
    """How this run shards the model: ``train.fsdp`` / ``train.zero3``, or what ``accelerate launch
    --use_fsdp`` / ``--use_deepspeed`` asked for; None for a replicated (data-parallel) run."""
    fsdp = spec.fsdp or _env_flag("ACCELERATE_USE_FSDP")
    zero3 = spec.zero3 or _env_flag("ACCELERATE_USE_DEEPSPEED")
    if fsdp and zero3:
        raise ConfigError("train.fsdp and train.zero3 (or accelerate launch --use_fsdp and --use_deepspeed) "
                          "both shard the model; choose one")
    return "fsdp" if fsdp else "zero3" if zero3 else None


def launch_processes() -> int:
    """The processes of this launch, from the environment ``torchrun`` / ``accelerate launch`` set
    (``WORLD_SIZE``; 1 when launched plainly), readable before accelerate's state exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch(kind: Sharding, processes: int | None = None) -> None:
    """Refuse what cannot shard, before anything is loaded: a single process (nothing to shard across;
    ``processes`` defaults to this launch's ``WORLD_SIZE``), FSDP1, a ZeRO stage other than 3, and
    ZeRO-3 without DeepSpeed installed."""
    if kind == "fsdp" and _env_flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "2") != "2":
        raise ConfigError("accelerate launch --use_fsdp: analogue models shard with FSDP2 only; add --fsdp_version 2")
    if kind == "zero3":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3") if _env_flag("ACCELERATE_USE_DEEPSPEED") else "3"
        if stage != "3":
            raise ConfigError(f"accelerate launch --use_deepspeed --zero_stage {stage}: analogue models shard "
                              "with ZeRO stage 3 only; add --zero_stage 3 (or use data parallelism: no flag)")
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"train.zero3 needs DeepSpeed ({err}); install it with: pip install 'analogllm[zero3]'") from None
    if processes is None:
        processes = launch_processes()
    if processes < 2:
        raise ConfigError(f"train.{kind}: sharding needs several processes; launch with {LAUNCH[kind]}")


def plugin_for(kind: Sharding, model: nn.Module, spec: TrainSection):
    return fsdp_plugin(model) if kind == "fsdp" else zero3_plugin(spec)


def fsdp_plugin(model: nn.Module):
    """accelerate's FSDP plugin as analogue models need it: FSDP2 (``fully_shard``), one unit per decoder
    layer (the model's ``_no_split_modules``) plus the embeddings / final norm / LM head and the root,
    parameters resharded after each forward, sharded (DCP) checkpoints.

    The parameters of every :class:`AnalogMatrix` (the learned DAC ranges, scalars that FSDP2 cannot
    shard, and the ADC ranges) are left out of sharding: they stay whole and identical on every
    process, and :func:`analogllm.training.hwa.hwa_train` averages their gradients itself
    (:func:`average_grads_`). The chip buffers are not parameters and are never sharded (nor saved)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(getattr(model, "_no_split_modules", None) or []),
        state_dict_type="SHARDED_STATE_DICT",
        cpu_offload=False,
        cpu_ram_efficient_loading=False,
        activation_checkpointing=False,
        ignored_modules=[m for m in model.modules() if isinstance(m, AnalogMatrix)],
    )


def zero3_plugin(spec: TrainSection):
    """accelerate's DeepSpeed plugin for ZeRO stage 3 as this loop drives it: the engine accumulates
    ``grad_accum`` micro-batches and clips at ``max_grad_norm`` itself; fp32 master weights (``bf16``
    runs autocast the forward, :func:`analogllm.training.hwa.autocast`, as without DeepSpeed); every
    parameter partitioned, however small (persistence threshold 0), so that the memory bound holds for
    any model and a small one shards too; whole weights gathered on save, so ``OUTPUT/final`` is the
    ordinary analogue checkpoint. ``zero3_init_flag`` is off: the model is built whole and partitioned
    after conversion (:func:`partition_zero3_`)."""
    from accelerate.utils import DeepSpeedPlugin

    config = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.max_grad_norm or 0.0,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, in two groups (weights, converter ranges)
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)


_DISTRIBUTED = {"fsdp": "FSDP", "zero3": "DEEPSPEED"}  # accelerate's DistributedType of each


def accelerator_sharding(accelerator) -> Sharding | None:
    """How an accelerator shards (from its distributed type), None when it replicates."""
    return next((k for k, v in _DISTRIBUTED.items() if accelerator.distributed_type.value == v), None)


def use_sharding(accelerator, kind: Sharding, plugin) -> None:
    """Make ``accelerator`` shard with ``plugin`` (in the process-wide state too, which accelerate copies
    into the accelerator's whenever it is asked for)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    check_launch(kind, accelerator.num_processes)
    distributed = DistributedType(_DISTRIBUTED[kind])
    PartialState().distributed_type = distributed
    accelerator.state.distributed_type = distributed
    if kind == "fsdp":
        accelerator.state.fsdp_plugin = plugin
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    plugin.set_mixed_precision("no")
    accelerator.deepspeed_engine_wrapped = None  # what Accelerator() sets up when DeepSpeed is on from the start
    accelerator.state.deepspeed_plugins = {"default": plugin}
    plugin.select(_from_accelerator_state=True)
    # selecting it makes transformers build every later model partitioned (zero.Init at load); the
    # model here is partitioned by hand after conversion, and what loads later (the final checkpoint
    # for evaluation) must load whole
    unset_hf_deepspeed_config()


def partition_zero3_(model: nn.Module, plugin) -> None:
    """Partition a converted model's parameters across the processes, in place (``deepspeed.zero.Init``
    on the built module: every process converted the same model, so no weights are sent).

    DeepSpeed moves every parameter as bytes (``view(torch.uint8)``), which a 0-dim tensor cannot do,
    so the scalar DAC range of every non-expert matrix becomes shape (1,) first; the layer reads it as
    a scalar either way, and :func:`full_state_dict` gives it back its own shape."""
    import deepspeed

    for m in model.modules():
        if isinstance(m, AnalogMatrix) and isinstance(getattr(m, "input_range", None), nn.Parameter) \
                and m.input_range.dim() == 0:
            m.input_range.data = m.input_range.data.reshape(1)
    deepspeed.zero.Init(module=model, config_dict_or_path=plugin.deepspeed_config)


def gathered(module: nn.Module, kind: Sharding | None):
    """A context in which ``module``'s own parameters (and its children's) are whole on every process;
    changes made inside are kept (ZeRO-3 partitions them again from the main process's copy, which
    every process computed alike). A no-op unless the model is partitioned by ZeRO-3."""
    from contextlib import nullcontext

    if kind != "zero3":
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)


def update_master_(params: list[nn.Parameter]) -> None:
    """Copy an in-place change of whole (gathered) ZeRO-3 parameters into the optimiser's own fp32
    partitions: ZeRO-3 keeps a master copy of every trainable partition and writes it over the model's
    weights at its next step, which would undo the change (the weight clamp). Called inside
    :func:`gathered`, on every process."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_full_fp32_param

    world = dist.get_world_size()
    for p in params:
        if not p.requires_grad:
            continue
        if p.numel() % world:  # DeepSpeed's setter cannot fill a padded last partition
            raise ConfigError(f"train.clamp_weights with train.zero3: a weight of {p.numel()} elements does not "
                              f"split evenly over {world} processes; use another process count or train.fsdp")
        safe_set_full_fp32_param(p, p.data)


def full_state_dict(model: nn.Module, kind: Sharding) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, as plain CPU tensors on the main process (``{}`` on the
    others). A collective: every process calls it. What ``save_pretrained(..., state_dict=)`` writes.
    ZeRO-3 gathers one module's parameters at a time, so no process ever holds the whole model twice."""
    import torch.distributed as dist

    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    import deepspeed

    main = dist.get_rank() == 0
    whole: dict[int, torch.Tensor] = {}
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in whole]
        if own:
            with deepspeed.zero.GatheredParameters(own):
                for p in own:
                    whole[id(p)] = p.detach().to("cpu", copy=True) if main else torch.empty(0)
    if not main:
        return {}
    state = {k: whole.get(id(t), t.detach().cpu()) for k, t in model.state_dict(keep_vars=True).items()}
    for name, m in model.named_modules():
        key = f"{name}.input_range" if name else "input_range"
        if isinstance(m, AnalogMatrix) and m.experts is None and key in state:
            state[key] = state[key].reshape(())  # partition_zero3_ made it (1,)
    return state


def average_grads_(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of the parameters FSDP leaves whole (the converter ranges) over processes,
    as data parallelism would: one all-reduce of them all (a missing gradient counts as zero)."""
    import torch.distributed as dist

    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def checkpoint_sharding(ckpt) -> Sharding | None:
    """How the training checkpoint folder ``ckpt`` was written: FSDP's sharded model folder, DeepSpeed's
    engine folder, or neither (a replicated run)."""
    from accelerate.utils.constants import FSDP_MODEL_NAME, MODEL_NAME

    if (ckpt / f"{FSDP_MODEL_NAME}_0").is_dir():
        return "fsdp"
    return "zero3" if (ckpt / MODEL_NAME).is_dir() else None


__all__ = ["LAUNCH", "Sharding", "accelerator_sharding", "average_grads_", "check_launch", "checkpoint_sharding", "fsdp_plugin", "launch_processes",
           "full_state_dict", "gathered", "partition_zero3_", "plugin_for", "sharding_requested", "update_master_",
           "use_sharding", "zero3_plugin"]
