"""Where each model family lets a mapping fold a transform exactly, found by module names.

Two kinds of knowledge live here, both small per-family tables:

* **rescaling groups**: analogue layers that read the same activation, and the module that produces it
  when a per-channel factor can be moved into that producer exactly: a norm's weight (RMSNorm,
  LayerNorm weight and bias), or the output rows of a linear whose output reaches the readers through
  per-channel linear operations only (``v_proj`` → attention → ``o_proj``; ``up_proj`` → gate product →
  ``down_proj``). Every other analogue layer is a group of its own without a producer: its rescaling is a
  digital per-channel multiply in front of the DAC (:class:`~analogllm.nn.transform.InputTransform`).
* **residual-stream structure** of the pre-norm transformer families (Llama, Qwen, Mistral, Phi-3), whose
  residual stream can be rotated exactly (:mod:`analogllm.mapping.rotate`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

#: pre-norm transformers with RMSNorm (weight · x / rms), no bias on the residual path, separate or
#: fused projections: their residual stream rotates exactly
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2")
FUSED_LIKE = ("phi3",)


@dataclass
class Group:
    """Analogue layers reading one activation, and how a per-channel factor s reaches them.

    ``fold(s)`` divides the producer's output channels by s in place (None: no exact producer, so the
    readers get a digital input scale); ``expand(s)`` maps s from the producer's channels to the readers'
    input channels (grouped-query attention repeats a value head for several query heads); ``reduce(v)``
    maps a per-reader-input statistic back to the producer's channels (the max over repeated heads).
    """

    name: str
    readers: list[str]
    fold: Callable[[torch.Tensor], None] | None = None
    expand: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda s: s)
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda v: v)


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def _norm_fold(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    @torch.no_grad()
    def fold(s: torch.Tensor) -> None:
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
    return fold


def _rows_fold(linear: nn.Module, start: int, size: int, transposed: bool = False) -> Callable[[torch.Tensor], None]:
    """Divide output channels [start, start + size) of a linear (weight (out, in), or GPT-2's (in, out))."""
    @torch.no_grad()
    def fold(s: torch.Tensor) -> None:
        w = linear.weight
        if transposed:
            w[:, start:start + size].div_(s.to(w.dtype)[None, :])
        else:
            w[start:start + size].div_(s.to(w.dtype)[:, None])
        if getattr(linear, "bias", None) is not None:
            linear.bias[start:start + size].div_(s.to(linear.bias.dtype))
    return fold


def _heads(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _gqa(config) -> tuple[Callable, Callable]:
    """(expand, reduce) between value channels (kv·d) and attention-output channels (heads·d)."""
    heads, kv, d = _heads(config)
    rep = heads // kv

    def expand(s: torch.Tensor) -> torch.Tensor:
        return s.view(kv, 1, d).expand(kv, rep, d).reshape(-1)

    def reduce(v: torch.Tensor) -> torch.Tensor:
        return v.view(kv, rep, d).amax(1).reshape(-1)

    return expand, reduce


def rescale_groups(model: nn.Module, analog: set[str]) -> list[Group]:
    """The rescaling groups of ``model``: exact folds where the family has them, and one digital-scale
    group for every other analogue layer in ``analog`` (module names)."""
    modules = dict(model.named_modules())
    kind = model_type(model)
    groups: list[Group] = []
    if kind in LLAMA_LIKE + FUSED_LIKE:
        config = model.config
        heads, kv, d = _heads(config)
        expand, reduce = _gqa(config)
        for name, module in modules.items():
            if not re.fullmatch(r".*layers\.\d+", name):
                continue
            att, mlp = f"{name}.self_attn", f"{name}.mlp"
            if kind in LLAMA_LIKE:
                qkv = [f"{att}.{p}_proj" for p in "qkv"]
                groups.append(Group(f"{name}.input_layernorm", qkv, _norm_fold(modules[f"{name}.input_layernorm"])))
                groups.append(Group(f"{att}.v_proj", [f"{att}.o_proj"], _rows_fold(modules[f"{att}.v_proj"], 0, kv * d),
                                    expand, reduce))
                groups.append(Group(f"{name}.post_attention_layernorm", [f"{mlp}.gate_proj", f"{mlp}.up_proj"],
                                    _norm_fold(modules[f"{name}.post_attention_layernorm"])))
                inter = modules[f"{mlp}.up_proj"].out_features
                groups.append(Group(f"{mlp}.up_proj", [f"{mlp}.down_proj"], _rows_fold(modules[f"{mlp}.up_proj"], 0, inter)))
            else:  # phi3: fused qkv_proj (q, k, v rows) and gate_up_proj (gate rows, then up rows)
                groups.append(Group(f"{name}.input_layernorm", [f"{att}.qkv_proj"],
                                    _norm_fold(modules[f"{name}.input_layernorm"])))
                groups.append(Group(f"{att}.qkv_proj", [f"{att}.o_proj"],
                                    _rows_fold(modules[f"{att}.qkv_proj"], (heads + kv) * d, kv * d), expand, reduce))
                groups.append(Group(f"{name}.post_attention_layernorm", [f"{mlp}.gate_up_proj"],
                                    _norm_fold(modules[f"{name}.post_attention_layernorm"])))
                inter = modules[f"{mlp}.down_proj"].in_features
                groups.append(Group(f"{mlp}.gate_up_proj", [f"{mlp}.down_proj"],
                                    _rows_fold(modules[f"{mlp}.gate_up_proj"], inter, inter)))
    elif kind == "gpt2":
        hidden = model.config.n_embd
        for name in modules:
            if not re.fullmatch(r".*\.h\.\d+", name):
                continue
            groups.append(Group(f"{name}.ln_1", [f"{name}.attn.c_attn"], _norm_fold(modules[f"{name}.ln_1"])))
            groups.append(Group(f"{name}.attn.c_attn", [f"{name}.attn.c_proj"],
                                _rows_fold(modules[f"{name}.attn.c_attn"], 2 * hidden, hidden, transposed=True)))
            groups.append(Group(f"{name}.ln_2", [f"{name}.mlp.c_fc"], _norm_fold(modules[f"{name}.ln_2"])))
    groups = [g for g in groups if all(r in analog for r in g.readers)]
    covered = {r for g in groups for r in g.readers}
    groups += [Group(name, [name]) for name in sorted(analog - covered)]
    return groups


__all__ = ["FUSED_LIKE", "Group", "LLAMA_LIKE", "model_type", "rescale_groups"]
