"""Chip instances: programming a converted model onto one sampled chip, and ageing it.

A chip instance is everything that is random but fixed once the weights are written: programming
noise, device-to-device variation, drift exponents, mesh phase errors. It is identified by a seed,
so the same seed gives the same chip and different seeds give different chips. Time since
programming is a second, independent knob (drift, growing read noise).
"""

from __future__ import annotations

import torch
from torch import nn

from analogllm.nn.convert import analog_matrices
from analogllm.ops.noise import seeded


def _require_analog(model: nn.Module) -> None:
    if getattr(model, "analog_config", None) is None:
        raise ValueError("model is not analogue: call analogllm.analogize_(model, config) first")


def program_(model: nn.Module, seed: int = 0, seconds: float = 0.0) -> nn.Module:
    """Program ``model`` onto chip instance ``seed`` (programming noise frozen), read at ``seconds``."""
    _require_analog(model)
    for _, matrix, weight in analog_matrices(model):
        matrix.program(weight, seed, seconds)
    return model


def drift_(model: nn.Module, seconds: float) -> nn.Module:
    """Age the programmed chip to ``seconds`` after programming (same chip instance, same seed).

    With ``drift.compensation`` on, each layer's global drift-compensation scalar is recomputed
    from its calibration read, as a deployed chip would do.
    """
    _require_analog(model)
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    for _, matrix, weight in analog_matrices(model):
        seed = matrix.config.seed if matrix.seed is None else matrix.seed
        matrix.program(weight, seed, seconds)
    return model


def deploy_(model: nn.Module, seed: int = 0, seconds: float = 0.0) -> nn.Module:
    """Program ``model`` onto chip instance ``seed`` at ``seconds`` and keep only the chip: each layer's
    digital weight is freed right after its chip is realised, so the model holds one copy of every
    analogue weight (the chip's) and peak memory stays near the digital model's. This is a deployed
    chip that is only read: eval, generation and LoRA adapters trained by backprop through the chip
    work; training the base, reprogramming, drift, export, saving and physics-aware training (whose
    backward needs the digital twin) raise. Set the DAC ranges (``calibrate_``) before, if data-initialised."""
    _require_analog(model)
    for _, matrix, weight in analog_matrices(model):
        if not matrix.deployed:
            matrix.release(weight, seed, seconds)
    return model


def deployed(model: nn.Module) -> bool:
    """Whether ``deploy_`` freed this model's digital weights."""
    return any(matrix.deployed for _, matrix, _ in analog_matrices(model))


@torch.no_grad()
def calibrate_(model: nn.Module, input_ids: torch.Tensor, seed: int | None = None) -> nn.Module:
    """Set the chip's unset data-initialised DAC ranges from one eval forward on ``input_ids``, as
    deploying does once; ranges already set are kept. The read noise of that pass comes from the global
    RNG, or from ``seed`` (leaving the global RNG as it was) so that a verifier can repeat it exactly."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with seeded(seed, device):
            model(input_ids=input_ids.to(device))
    finally:
        model.train(was)
    return model


def chip_info(model: nn.Module) -> dict[str, float | int | None]:
    """The seed and drift time the model's chip is at (from its first analogue matrix)."""
    for _, matrix, _ in analog_matrices(model):
        return {"seed": matrix.seed, "seconds": matrix.seconds}
    return {"seed": None, "seconds": 0.0}
