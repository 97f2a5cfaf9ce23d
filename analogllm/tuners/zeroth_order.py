"""Zeroth-order training (SPSA / MeZO): gradients from forward passes only.

A chip that can only run inference can still train its adapters: perturb the parameters θ along a
random direction z, measure the loss at θ + εz and θ − εz, and step along z by the finite difference
(Spall's SPSA; MeZO, Malladi et al. NeurIPS 2023, for language models):

    ĝ = (L(θ + εz) − L(θ − εz)) / (2ε) · z,      θ ← θ − lr · mean_k ĝ_k

No backward pass, no activation storage: everything runs under ``torch.no_grad`` (memory is that of
inference). z is never stored either: each direction is regenerated from its seed when needed (MeZO's
trick), so the extra memory is one parameter tensor at a time.

On a chip every forward pass has fresh read and output noise. With loss noise σ_L per pass, the
finite difference carries an error of about σ_L/(√2·ε) per direction, on top of the true directional
derivative. So ε must be large enough that the perturbation's effect on the loss stands out of the
read noise (larger than MeZO's 1e-3 for digital models), and several directions per step average the
error down as 1/√k. :meth:`SPSA.probe_noise` measures σ_L on the hardware so that the run can report
the signal-to-noise ratio of its finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from analogllm.config.schema import check


@dataclass(frozen=True)
class ZerothOrderConfig:
    """SPSA settings.

    steps:      optimisation steps (each costs 2 · directions forward passes); ``None`` = the recipe's
                ``train.steps``.
    lr:         SGD step size on the averaged projected gradient.
    eps:        perturbation size ε (parameter units); must beat the chip's loss noise (see module doc).
    directions: random directions z averaged per step.
    noise_probe: forward passes at fixed parameters used to measure the loss noise σ_L (0 = skip).
    """

    steps: int | None = None
    lr: float = 1e-3
    eps: float = 1e-2
    directions: int = 4
    noise_probe: int = 4

    def __post_init__(self) -> None:
        check(self.steps is None or self.steps >= 1, "zeroth_order.steps", "must be >= 1 or null")
        check(self.lr > 0, "zeroth_order.lr", f"must be > 0, got {self.lr}")
        check(self.eps > 0, "zeroth_order.eps", f"must be > 0, got {self.eps}")
        check(self.directions >= 1, "zeroth_order.directions", f"must be >= 1, got {self.directions}")
        check(self.noise_probe == 0 or self.noise_probe >= 2, "zeroth_order.noise_probe", "must be 0 or >= 2")


@dataclass(frozen=True)
class SPSAStep:
    """One step: the mean of the 2·k losses, the k projected gradients, and forward passes used."""

    loss: float
    projected: tuple[float, ...]
    forwards: int


class SPSA:
    """SPSA / MeZO optimiser over ``params`` (the adapters), driven by a loss closure.

    ``loss_fn`` runs one forward pass on a fixed batch and returns the loss as a float; it is always
    called under ``torch.no_grad``. Directions come from a private generator keyed by (seed, step,
    direction), so the run is reproducible and leaves the global RNG (the chip's read noise) alone.
    """

    def __init__(self, params: list[nn.Parameter], config: ZerothOrderConfig, seed: int = 0) -> None:
        if not params:
            raise ValueError("SPSA needs at least one parameter to train")
        self.params = list(params)
        self.config = config
        self.seed = seed
        self.steps = 0
        self.forwards = 0

    def direction_seed(self, step: int, k: int) -> int:
        """The seed that regenerates direction ``k`` of step ``step`` (z is never stored)."""
        return (self.seed * 1_000_003 + step * 9_973 + k * 131 + 17) % (2**63 - 1)

    def _add_direction(self, seed: int, scale: float) -> None:
        """θ += scale · z(seed), z regenerated parameter by parameter in a fixed order."""
        gen = None
        for p in self.params:
            if gen is None or gen.device != p.device:
                gen = torch.Generator(device=p.device).manual_seed(seed)
            z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            p.add_(z, alpha=scale)

    def _loss(self, loss_fn: Callable[[], float]) -> float:
        value = float(loss_fn())
        self.forwards += 1
        if not math.isfinite(value):
            raise FloatingPointError(f"zeroth-order loss is {value}; lower zeroth_order.eps or zeroth_order.lr")
        return value

    @torch.no_grad()
    def step(self, loss_fn: Callable[[], float]) -> SPSAStep:
        """Estimate the gradient from 2·directions forward passes and take one SGD step."""
        assert not torch.is_grad_enabled()
        eps, k = self.config.eps, self.config.directions
        seeds = [self.direction_seed(self.steps, i) for i in range(k)]
        projected, losses = [], []
        for s in seeds:
            self._add_direction(s, eps)
            plus = self._loss(loss_fn)
            self._add_direction(s, -2 * eps)
            minus = self._loss(loss_fn)
            self._add_direction(s, eps)  # back to θ
            projected.append((plus - minus) / (2 * eps))
            losses += [plus, minus]
        for s, g in zip(seeds, projected):
            self._add_direction(s, -self.config.lr * g / k)
        self.steps += 1
        return SPSAStep(loss=sum(losses) / len(losses), projected=tuple(projected), forwards=2 * k)

    @torch.no_grad()
    def probe_noise(self, loss_fn: Callable[[], float], passes: int | None = None) -> tuple[float, float]:
        """(σ_L, σ_ĝ): the std of the loss over repeated forwards at fixed parameters (read noise only),
        and the resulting noise std of one projected gradient, σ_L / (√2 · ε)."""
        n = self.config.noise_probe if passes is None else passes
        if n < 2:
            raise ValueError("probe_noise needs at least 2 forward passes")
        values = torch.tensor([self._loss(loss_fn) for _ in range(n)], dtype=torch.float64)
        sigma = float(values.std())
        return sigma, sigma / (math.sqrt(2.0) * self.config.eps)


__all__ = ["SPSA", "SPSAStep", "ZerothOrderConfig"]
