"""Chip instances of a whole model: programming, ageing, deploying, and the mode every layer runs in.

A chip instance is identified by a seed: the same seed gives the same chip (on every device, in any
conversion order), different seeds give different chips. Time since programming is a second,
independent knob (drift, growing read noise). Each analogue matrix keeps its programmed state as module
buffers (:class:`~analogllm.chip.state.Chip`), so these functions only say *which* chip to be.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from analogllm.chip.state import free, is_freed
from analogllm.nn.convert import analog_matrices
from analogllm.nn.matrix import MODES, AnalogMatrix
from analogllm.ops.memory import return_freed_memory
from analogllm.ops.noise import seeded


def _require_analog(model: nn.Module) -> None:
    if getattr(model, "analog_config", None) is None:
        raise ValueError("model is not analogue: call analogllm.analogize_(model, config) first")


def program_(model: nn.Module, seed: int = 0, seconds: float = 0.0, lazy: bool = False) -> nn.Module:
    """Program ``model`` onto chip instance ``seed`` (programming noise frozen), read at ``seconds``.

    ``lazy``: only say which chip it is; each matrix is realised on its first use (the same chip, as a
    chip is a function of weights, seed, module name and time), so a job that visits one layer at a time
    (writing a map) never holds every chip at once."""
    _require_analog(model)
    for _, matrix, weight in analog_matrices(model):
        if lazy:
            matrix.chip.check_writable(matrix.name)
            matrix.require_digital()
            matrix.chip.clear()
            matrix.chip.seed, matrix.chip.seconds = seed, float(seconds)
        else:
            matrix.program(weight, seed, seconds)
    return model


def drift_(model: nn.Module, seconds: float) -> nn.Module:
    """Age the programmed chip to ``seconds`` after programming (same chip instance, same seed).

    With ``drift.compensation`` on, each layer's global drift-compensation gain is recalibrated from
    its calibration reads, as a deployed chip would do.
    """
    _require_analog(model)
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    for _, matrix, weight in analog_matrices(model):
        seed = matrix.config.seed if matrix.chip.seed is None else matrix.chip.seed
        matrix.program(weight, seed, seconds)
    return model


def deploy_(model: nn.Module, seed: int = 0, seconds: float = 0.0) -> nn.Module:
    """Program ``model`` onto chip instance ``seed`` at ``seconds`` and keep only the chip: each layer's
    digital weight is replaced by a :class:`~analogllm.chip.state.FreedWeight` right after its chip is
    realised, so the model holds one copy of every analogue weight (the chip's) and peak memory stays
    near the digital model's. The chip survives ``.to()``, ``deepcopy`` and pickling. Evaluation,
    generation and LoRA adapters trained by backprop through the chip work; training the base,
    reprogramming, drift, export, saving and physics-aware training raise. Set the DAC ranges before."""
    _require_analog(model)
    if not deployed(model):
        from analogllm.hf.prefix import hold_prefix_

        hold_prefix_(model)  # the host keeps the digital KV prefix; the weights it needs go now
    return deploy_matrices_(model, seed, seconds)


def deploy_matrices_(module: nn.Module, seed: int = 0, seconds: float = 0.0) -> nn.Module:
    """:func:`deploy_` for the analogue matrices inside ``module`` (a whole model or one decoder block of
    a model loaded block by block, :mod:`analogllm.hf.streaming`). Each digital weight is freed as soon
    as its chip is realised, so the peak is the model plus one layer's chip, not two models."""
    owners = {id(param): (owner, name) for owner in module.modules()
              for name, param in owner.named_parameters(recurse=False)}
    for _, matrix, weight in analog_matrices(module):
        if matrix.config.is_identity:
            raise ValueError("the ideal profile computes with the digital weights themselves: nothing to deploy")
        if matrix.chip.deployed:
            continue
        matrix.program(weight, seed, seconds)
        matrix.chip.deployed = True
        matrix.mode = "chip"
        owner, name = owners[id(weight if weight._base is None else weight._base)]
        param = getattr(owner, name)
        if not is_freed(param):
            setattr(owner, name, free(param))
        del weight, param
        return_freed_memory()
    return module


def deployed(model: nn.Module) -> bool:
    """Whether ``deploy_`` freed this model's digital weights."""
    return any(matrix.chip.deployed for _, matrix, _ in analog_matrices(model))


def set_mode(model: nn.Module, mode: str, include: str | None = None) -> nn.Module:
    """Run every analogue matrix of ``model`` (or those whose name contains ``include``) as ``mode``:
    ``chip`` (the programmed chip), ``hwa`` (hardware-aware training) or ``digital`` (exact)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for name, matrix, _ in analog_matrices(model):
        if include is None or include in name:
            matrix.set_mode(mode)
    for name, module in model.named_modules():
        products = getattr(module, "analog_products", None)
        if products is not None and (include is None or include in name):
            products.mode = mode
    return model


def modes(model: nn.Module) -> dict[str, str]:
    """Matrix name → its mode."""
    return {name: matrix.mode for name, matrix, _ in analog_matrices(model)}


@contextmanager
def mode(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run ``model`` in mode ``name`` inside the block; every matrix's mode is restored afterwards."""
    matrices = [m for m in model.modules() if isinstance(m, AnalogMatrix) or hasattr(m, "analog_products")]
    matrices = [getattr(m, "analog_products", m) for m in matrices]
    before = [m.mode for m in matrices]
    try:
        set_mode(model, name)
        yield model
    finally:
        for m, old in zip(matrices, before):
            m.mode = old


@torch.no_grad()
def calibrate_(model: nn.Module, input_ids: torch.Tensor, seed: int | None = None) -> nn.Module:
    """Set the chip's unset data-initialised DAC ranges from one forward on ``input_ids``, as deploying
    does once; ranges already set are kept. The read noise of that pass comes from the global RNG, or
    from ``seed`` (leaving the global RNG as it was) so that a verifier can repeat it exactly."""
    device = next(model.parameters()).device
    with seeded(seed, device):
        model(input_ids=input_ids.to(device))
    return model


def chip_info(model: nn.Module) -> dict[str, float | int | None]:
    """The seed and drift time the model's chip is at (from its first analogue matrix)."""
    for _, matrix, _ in analog_matrices(model):
        return {"seed": matrix.chip.seed, "seconds": matrix.chip.seconds}
    return {"seed": None, "seconds": 0.0}


__all__ = ["calibrate_", "chip_info", "deploy_", "deploy_matrices_", "deployed", "drift_", "mode", "modes", "program_", "set_mode"]
