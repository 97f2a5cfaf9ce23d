"""Model surgery: put every weight-carrying matmul of a model through the analogue path.

``analogize_`` walks the model once and consults one table of adapters (module type → converter), in
the style of torchao's ``quantize_`` and Brevitas' layer map. Family rules add what a type table
cannot see: weights that a model reads directly (Mamba's ``dt_proj.weight``) get weight-side physics
through a parametrization. Everything not converted is listed as digital with the reason, so
``analogllm convert`` can print what runs where.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
import torch

from torch import nn
from transformers.pytorch_utils import Conv1D

from analogllm.config import AnalogConfig
from analogllm.nn.experts import is_experts, to_analog_experts
from analogllm.nn.linear import AnalogConv1D, AnalogLinear
from analogllm.nn.matrix import AnalogMatrix
from analogllm.nn.weight import to_weight_side

Converter = Callable[[nn.Module, AnalogConfig, str], nn.Module]


@dataclass(frozen=True)
class Adapter:
    """One row of the adapter table: which modules it takes and how it converts them (given the
    module's name, which identifies its matrices on a chip)."""

    name: str
    matches: Callable[[nn.Module], bool]
    convert: Converter


#: The one table of analogue adapters, tried in order. Extend it with :func:`register_adapter`.
ADAPTERS: list[Adapter] = [
    Adapter("linear", lambda m: type(m) is nn.Linear, AnalogLinear.from_linear),
    Adapter("conv1d", lambda m: type(m) is Conv1D, AnalogConv1D.from_conv1d),
    Adapter("experts", is_experts, to_analog_experts),
]

#: Per model type: modules whose weight the model reads directly (so a swapped forward is never
#: called). They get weight-side physics via a parametrization instead of a module swap.
WEIGHT_SIDE_RULES: dict[str, tuple[str, ...]] = {
    "mamba": (r"\.dt_proj$",),
    "falcon_mamba": (r"\.dt_proj$",),
}


def register_adapter(adapter: Adapter, first: bool = True) -> None:
    """Add an adapter for a new module type (tried before the built-ins when ``first``)."""
    ADAPTERS.insert(0, adapter) if first else ADAPTERS.append(adapter)


@dataclass
class ConversionReport:
    """What ``analogize_`` did: one row per module with weights: (name, type, shape, placement, note)."""

    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    mapping: Any = None  # the analogllm.mapping.MappingReport, when calibration text was given
    notes: list[str] = field(default_factory=list)  # model-wide choices (the KV prefix)

    @property
    def analog(self) -> list[str]:
        return [r[0] for r in self.rows if r[3] != "digital"]

    @property
    def digital(self) -> list[str]:
        return [r[0] for r in self.rows if r[3] == "digital"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r[3]] = out.get(r[3], 0) + 1
        return out

    def table(self) -> str:
        """A Markdown table of every module with weights and where it runs."""
        header = ("module", "type", "weight", "runs", "note")
        widths = [max(len(str(x)) for x in col) for col in zip(header, *self.rows)]
        line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        summary = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        notes = "".join(f"\n{n}" for n in self.notes)
        mapping = "" if self.mapping is None else "\n\n" + self.mapping.summary()
        return "\n".join(out) + f"\n\n{summary}" + notes + mapping


def analogize_(
    model: nn.Module,
    config: AnalogConfig | str | None = None,
    include: list[str] | tuple[str, ...] | None = None,
    exclude: list[str] | tuple[str, ...] | None = None,
    calibration: torch.Tensor | None = None,
    progress: bool = False,
    attach: bool = True,
) -> nn.Module:
    """Convert ``model`` in place so that its matmuls run on the analogue chip described by ``config``.

    ``config`` is an :class:`AnalogConfig` or a profile name (default ``"pcm"``); ``include`` /
    ``exclude`` (regular expressions on module names) override the config's. With ``calibration``
    (token blocks, LongTensor [n, L]) the model is then mapped onto the chip's converters as
    ``config.mapping`` says (:func:`analogllm.mapping.map_`: rotations, rescaling, calibrated ranges).
    Returns the model, with the config on ``model.analog_config``, the report on
    ``model.analog_report`` (and the mapping's on ``model.analog_report.mapping``); ``config.kv_prefix``
    gets its digital KV prefix (:mod:`analogllm.hf.prefix`). A Hugging Face model
    then saves and loads as an analogue checkpoint (:mod:`analogllm.hf.quantizer`); ``attach=False``
    leaves that out (the quantizer itself converts with it while loading).
    """
    if config is None or isinstance(config, str):
        config = AnalogConfig.from_profile(config or "pcm")
    if include is not None:
        config = config.set("include", list(include))
    if exclude is not None:
        config = config.set("exclude", list(exclude))
    if getattr(model, "analog_config", None) is not None:
        raise ValueError("model is already analogue (it has an analog_config); convert a fresh digital model")

    config, prefix_note = _resolve_prefix(model, config, check=attach)
    report = _convert_modules(model, config)
    if prefix_note:
        report.notes.append(prefix_note)
    model.analog_config = config  # type: ignore[assignment]
    model.analog_report = report  # type: ignore[assignment]
    if config.analog_attention:
        from analogllm.nn.attention import enable_analog_attention

        enable_analog_attention(model, config)
    # a checkpoint being loaded (attach=False) has no weights yet; it was checked when saved
    prefix_size = _check_prefix(model, config.kv_prefix) if config.kv_prefix and attach else None
    if calibration is not None:
        from analogllm.mapping import map_

        report.mapping = map_(model, calibration, config.mapping, progress)
        report.mapping.kv_prefix = prefix_size
    if config.kv_prefix:
        # after the mapping: calibrated without the prefix, the ranges also cover the massive activations
        # that tokens of other text can still carry (docs/mapping.md)
        from analogllm.hf.prefix import attach_prefix

        attach_prefix(model, config.kv_prefix)
    if attach:
        from analogllm.hf.quantizer import attach as attach_quantizer

        attach_quantizer(model)
    return model


def _resolve_prefix(model: nn.Module, config: AnalogConfig, check: bool) -> tuple[AnalogConfig, str | None]:
    """``config`` with ``kv_prefix: bos`` replaced by the ids it names for ``model`` (the config saved with
    the model holds ids), and the line the conversion report prints about the prefix."""
    if not config.kv_prefix:
        return config, None
    from analogllm.hf.prefix import resolve_prefix

    tokens, why = resolve_prefix(model, config.kv_prefix, check)
    config = config.set("kv_prefix", list(tokens))
    if why:
        return config, f"kv_prefix 'bos': no prefix, {why}"
    return config, f"digital KV prefix: token ids {list(tokens)} (kv_prefix)"


def _check_prefix(model: nn.Module, tokens: tuple[int, ...]) -> tuple[int, int]:
    """(prefix tokens, key/value numbers stored) of ``config.kv_prefix``; refuses a model without a
    key/value cache before any mapping is spent on it."""
    from analogllm.hf.prefix import prefix_values

    return len(tokens), prefix_values(model, tokens)


def _convert_modules(model: nn.Module, config: AnalogConfig) -> ConversionReport:
    """Convert, in one walk, every module an adapter takes and ``config`` selects (weight-side where a family
    rule says the model reads its weight directly); a converted module's submodules go with it. Returns
    the rows of what runs where."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    weight_side = [re.compile(p) for p in WEIGHT_SIDE_RULES.get(model_type, ())]
    report = ConversionReport()
    handled: set[str] = set()
    for name, module in list(model.named_modules()):
        if any(name.startswith(h + ".") for h in handled):
            continue
        if not _has_weights(module):
            continue
        kind = type(module).__name__
        shape = _weight_shape(module)
        adapter = next((a for a in ADAPTERS if a.matches(module)), None)
        if adapter is None:
            if any(isinstance(p, nn.Parameter) and p.dim() >= 2 for p in module.parameters(recurse=False)):
                note = _digital_reason(module)
                report.rows.append((name, kind, shape, "digital", note))
            continue
        if not config.selects(name):
            report.rows.append((name, kind, shape, "digital", "excluded by config"))
            continue
        if any(p.search(name) for p in weight_side) and hasattr(module, "weight"):
            to_weight_side(module, config, name)
            report.rows.append((name, kind, shape, "weight-side", "weight read directly by the model"))
        else:
            adapter.convert(module, config, name)
            report.rows.append((name, kind, shape, "analog", adapter.name))
        handled.add(name)
    return report


def analog_matrices(model: nn.Module):
    """Yield (module name, AnalogMatrix, the weight it computes with (out, in) or (E, out, in))."""
    for name, module in model.named_modules():
        for suffix, matrix, weight in own_matrices(module):
            yield name + suffix, matrix, weight


def own_matrices(module: nn.Module):
    """Yield (name suffix, AnalogMatrix, weight) of the matrices whose weights are ``module``'s own
    parameters (none for a module that merely contains analogue layers)."""
    if isinstance(module, (AnalogLinear, AnalogConv1D)):
        yield "", module.analog, module.analog_weight()
    elif hasattr(module, "analog_matrices"):
        for i, (matrix, weight) in enumerate(module.analog_matrices()):
            yield f".{('up', 'down')[i]}", matrix, weight
    elif hasattr(module, "parametrizations"):
        for pname, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(getattr(p, "analog", None), AnalogMatrix):
                    yield f".{pname}", p.analog, plist.original


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or hasattr(module, "parametrizations")


def _weight_shape(module: nn.Module) -> str:
    w = getattr(module, "weight", None)
    if w is None:
        w = next((p for p in module.parameters(recurse=False) if p.dim() >= 2), None)
    return "x".join(map(str, w.shape)) if w is not None else "-"


def _digital_reason(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding (a lookup, not a matmul)"
    if "router" in type(module).__name__.lower():
        return "MoE router (routing is a discrete decision; kept digital)"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        groups = getattr(module, "groups", 1)
        return "depthwise convolution" if groups > 1 else "convolution"
    return "no analogue adapter for this type"
