"""Analogue drop-ins for the 2-D matmul carriers: ``nn.Linear`` and GPT-2's ``Conv1D``.

Both are subclasses of the module they replace and keep its parameters (the very same tensors), so
peft, accelerate, optimisers and ``state_dict`` keep working; only ``forward`` goes through the chip.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from analogllm.config import AnalogConfig
from analogllm.nn.matrix import AnalogMatrix, beside


class AnalogLinear(nn.Linear):
    """``nn.Linear`` whose matmul runs through an :class:`AnalogMatrix`."""

    analog: AnalogMatrix

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        config: AnalogConfig | None = None,
        name: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.analog = beside(AnalogMatrix(config or AnalogConfig(), name, in_features), self.weight)

    @classmethod
    def from_linear(cls, module: nn.Linear, config: AnalogConfig, name: str) -> AnalogLinear:
        """Turn ``module`` (called ``name`` in its model) into an AnalogLinear in place (same parameter
        objects, same hooks)."""
        module.__class__ = cls
        module.analog = beside(AnalogMatrix(config, name, module.in_features), module.weight)
        return module  # type: ignore[return-value]

    def analog_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.analog(input, self.weight, self.bias)


class AnalogConv1D(Conv1D):
    """GPT-2's ``Conv1D`` (a linear layer with a transposed (in, out) weight) on the chip."""

    analog: AnalogMatrix

    @classmethod
    def from_conv1d(cls, module: Conv1D, config: AnalogConfig, name: str) -> AnalogConv1D:
        module.__class__ = cls
        module.analog = beside(AnalogMatrix(config, name, module.weight.shape[0]), module.weight)
        return module  # type: ignore[return-value]

    def analog_weight(self) -> torch.Tensor:
        return self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.analog(x, self.weight.t(), self.bias)
