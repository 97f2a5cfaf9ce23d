"""Mixture-of-Experts expert weights on the chip.

Transformers stores the experts of a MoE block as 3-D parameters (E, out, in) and runs them with
grouped matmuls, so there is no ``nn.Linear`` to swap. The adapter keeps the parameters and swaps the
experts module's ``forward`` for one that routes each expert's tokens through that expert's analogue
matrix. Each expert is its own set of arrays: one :class:`AnalogMatrix` per projection holds all E chip
matrices, programmed in one batched call. The loop is over experts that received tokens (as in
transformers' eager path), never over matrix elements.
"""

from __future__ import annotations

import torch
from torch import nn

from analogllm.config import AnalogConfig
from analogllm.nn.matrix import AnalogMatrix, beside


def is_experts(module: nn.Module) -> bool:
    """A transformers experts block: 3-D ``down_proj`` plus ``gate_up_proj`` or ``up_proj`` parameters."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in (down, up))


class AnalogExperts(nn.Module):
    """Mixin class swapped onto an experts module (see :func:`to_analog_experts`)."""

    analog_up: AnalogMatrix
    analog_down: AnalogMatrix

    def _up_name(self) -> str:
        return "gate_up_proj" if hasattr(self, "gate_up_proj") else "up_proj"

    def _matrix(self, name: str) -> torch.Tensor:
        """The parameter as (E, out, in), whatever layout the model stores it in."""
        w = getattr(self, name)
        return w.transpose(-1, -2) if getattr(self, "is_transposed", False) else w

    def analog_matrices(self) -> list[tuple[AnalogMatrix, torch.Tensor]]:
        return [(self.analog_up, self._matrix(self._up_name())), (self.analog_down, self._matrix("down_proj"))]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        up_name = self._up_name()
        up_w, down_w = self._matrix(up_name), self._matrix("down_proj")
        has_bias = getattr(self, "has_bias", False)
        out = torch.zeros_like(hidden_states)
        num_experts = up_w.shape[0]
        with torch.no_grad():
            hit = torch.bincount(top_k_index.flatten(), minlength=num_experts).nonzero().flatten().tolist()
        for e in hit:
            if e >= num_experts:  # expert-parallel sentinel
                continue
            token_idx, pos = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            h = self.analog_up(x, up_w, getattr(self, f"{up_name}_bias")[e] if has_bias else None, expert=e)
            if up_name == "gate_up_proj":
                h = self._apply_gate(h) if hasattr(self, "_apply_gate") else _gate(self, h)
            else:
                h = self.act_fn(h)
            h = self.analog_down(h, down_w, self.down_proj_bias[e] if has_bias else None, expert=e)
            out.index_add_(0, token_idx, (h * top_k_weights[token_idx, pos, None]).to(out.dtype))
        return out


def _gate(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _analog_class(cls: type) -> type:
    """The analogue subclass of an experts class, made once and kept in this module under its name, so
    that pickling finds it (a class made on the fly is otherwise not importable)."""
    name = f"Analog{cls.__name__}"
    made = globals().get(name)
    if made is None or cls not in made.__mro__:
        made = type(name, (AnalogExperts, cls), {"forward": AnalogExperts.forward, "__module__": __name__,
                                                 "__qualname__": name})
        globals()[name] = made
    return made


def to_analog_experts(module: nn.Module, config: AnalogConfig, name: str) -> nn.Module:
    """Swap ``module``'s class for an analogue subclass of it, in place (parameters untouched)."""
    module.__class__ = _analog_class(type(module))
    e, _, up_in = module._matrix(module._up_name()).shape
    down_in = module._matrix("down_proj").shape[-1]
    module.analog_up = beside(AnalogMatrix(config, f"{name}.up", up_in, experts=e), module.down_proj)
    module.analog_down = beside(AnalogMatrix(config, f"{name}.down", down_in, experts=e), module.down_proj)
    return module
