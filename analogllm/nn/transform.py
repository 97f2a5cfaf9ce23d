"""The digital periphery in front of a layer's DAC: a per-channel input scale and an online rotation.

Mapping a model onto static converters (:mod:`analogllm.mapping`) sometimes needs a transform of the
activations that cannot be folded into a preceding layer: a per-input-channel scale where no norm or
linear precedes the layer (SmoothQuant/NORA-style rescaling), or a Hadamard rotation of an input that a
nonlinearity produced (the MLP's down projection, QuaRot-style). The weight absorbs the inverse once,
``W ← W · diag(s) · R``, so in exact arithmetic the layer computes the same ``x Wᵀ``; the chip, however,
now sees ``(x / s) R``, whose channels are far more even.

Costs, per token: the scale is one multiply per input; the rotation is a fast Walsh–Hadamard transform
(about n·log2 n additions) or, for orders without a Hadamard construction, a dense n × n product. Both
run digitally, before the DAC; :meth:`InputTransform.macs_per_token` states them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from analogllm.ops.hadamard import Rotation


class InputTransform(nn.Module):
    """x ↦ (x · inv_scale) R, applied before the DAC (buffers move and save with the model)."""

    def __init__(self, in_features: int, scale: bool = False, rotation_seed: int | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.inv_scale: torch.Tensor | None
        if scale:
            self.register_buffer("inv_scale", torch.ones(in_features))
        else:
            self.inv_scale = None
        self.rotation = Rotation(in_features, rotation_seed) if rotation_seed is not None else None
        self.rotation_seed = rotation_seed

    def spec(self) -> dict[str, Any]:
        """What is needed to rebuild this transform before its buffers are loaded."""
        return {"scale": self.inv_scale is not None, "rotation_seed": self.rotation_seed}

    def extra_repr(self) -> str:
        return f"scale={self.inv_scale is not None}, rotation={self.rotation is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_scale is not None:
            x = x * self.inv_scale.to(x.dtype)
        if self.rotation is not None:
            x = self.rotation(x)
        return x

    @torch.no_grad()
    def absorb(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight that computes the same product on transformed inputs: W · diag(1/inv_scale) · R,
        in float64 and back, so folding adds no error beyond one rounding."""
        w = weight.double()
        if self.inv_scale is not None:
            w = w / self.inv_scale.double()
        if self.rotation is not None:
            w = self.rotation.exact(w)
        return w.to(weight.dtype)

    def macs_per_token(self) -> int:
        """Digital operations per token that this transform adds in front of the DAC."""
        ops = self.in_features if self.inv_scale is not None else 0
        return ops + (self.rotation.macs_per_token() if self.rotation is not None else 0)


__all__ = ["InputTransform"]
