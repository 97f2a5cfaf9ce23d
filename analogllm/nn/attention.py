"""Optional analogue attention products (QKᵀ and AV), off by default.

In attention both operands are activations, so on a chip one of them must be written into an array
for every sequence (or computed in a charge/photonic domain). When ``analog_attention`` is on, both
products go through the same converters as weight matmuls: each operand is normalised and DAC-quantised
(per token for Q, K and the attention probabilities; per feature for V), the product gets output noise
and the ADC, and the result is scaled back. Softmax and masking stay digital. It plugs in through
transformers' own ``AttentionInterface`` hook, so every attention-based family picks it up.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from analogllm.config import AnalogConfig
from analogllm.ops.quant import adc_step, clamp_round, dac_levels

_EPS = 1e-12


class AnalogProducts(nn.Module):
    """Converters and noise for an activation × activation product."""

    def __init__(self, config: AnalogConfig) -> None:
        super().__init__()
        self.config = config
        self.mode = "chip"  # as the model's matrices (analogllm.set_mode): "hwa" uses the training noise

    def _dac(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = x.detach().abs().amax(dim, keepdim=True).clamp(min=_EPS)
        return clamp_round(x / r, 1.0, dac_levels(self.config.dac.bits)), r

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b for a [..., n, k] (normalised per row) and b [..., k, m] (normalised per column)."""
        an, ra = self._dac(a, -1)
        bn, rb = self._dac(b, -2)
        y = torch.matmul(an, bn)
        if self.mode == "digital":
            return torch.matmul(a, b)
        noise = self.config.training.output_noise if self.mode == "hwa" else self.config.output.noise
        if noise > 0:
            y = y + torch.randn_like(y) * noise
        adc = self.config.adc
        if adc.bits is not None:
            y = clamp_round(y, adc.bound, adc_step(adc.bits, adc.bound))
        return y * ra * rb


def analog_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Eager attention with both products on the chip (the ``AttentionInterface`` signature)."""
    products: AnalogProducts = module.analog_products
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = products.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = products.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register("analog", analog_attention_forward)
AttentionMaskInterface.register("analog", eager_mask)  # an explicit additive mask, as eager attention uses


def enable_analog_attention(model: nn.Module, config: AnalogConfig) -> list[str]:
    """Route the model's attention products through :class:`AnalogProducts`; returns the modules."""
    names = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "config") and config.selects(name):
            module.analog_products = AnalogProducts(config)
            names.append(name)
    if not names:
        raise ValueError("analog_attention: the model has no attention modules that use transformers' attention interface")
    model.set_attn_implementation("analog")
    return names
