"""Weight-side physics for weights that a model reads directly, without calling their module.

Mamba's ``dt_proj.weight @ x`` and other raw reads bypass any module swap: a swapped layer there
changes nothing. A ``torch.nn.utils.parametrize`` parametrization reaches every read of the weight,
so programming noise, drift, levels and clipping still apply. Converters (DAC/ADC) live on the output
side and cannot be applied to a raw read; the conversion report marks such weights ``weight-side``.
"""

from __future__ import annotations

import torch
from torch import nn

from analogllm.config import AnalogConfig
from analogllm.nn.matrix import AnalogMatrix
from analogllm.ops.quant import clip_bound


class AnalogWeight(nn.Module):
    """Parametrization: ``weight ↦`` the weight as the chip holds it.

    chip (the matrix's mode): the realised matrix of the programmed (and drifted) chip instance;
    hwa: clipped, with fresh Gaussian weight noise (σ × channel abs-max) at every read;
    digital: the weight itself.
    """

    def __init__(self, config: AnalogConfig, name: str, in_features: int) -> None:
        super().__init__()
        self.analog = AnalogMatrix(config, name, in_features)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mode = self.analog.mode
        if mode == "digital" or weight.is_meta:  # (a model being built on the meta device has no chip yet)
            return weight
        if mode == "chip":
            return self.analog.realised_weight(weight).to(weight.dtype)
        self.analog.require_digital()
        tr = self.analog.config.training
        bound = clip_bound(weight, tr.clip_sigma)
        if bound is not None:
            weight = weight.clamp(-bound, bound)
        if tr.weight_noise > 0:
            channel_max = weight.detach().abs().amax(-1, keepdim=True)
            weight = weight + torch.randn_like(weight) * channel_max * tr.weight_noise
        return weight


def to_weight_side(module: nn.Module, config: AnalogConfig, module_name: str, name: str = "weight") -> nn.Module:
    """Register :class:`AnalogWeight` on ``module.<name>`` (``module_name``: the module's name in its model)."""
    from torch.nn.utils import parametrize

    weight = getattr(module, name)
    parametrize.register_parametrization(module, name, AnalogWeight(config, f"{module_name}.{name}", weight.shape[-1]))
    return module
