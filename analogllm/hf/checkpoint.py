"""Saving and loading analogue models.

An analogue checkpoint is an ordinary Hugging Face checkpoint (the digital weights, loadable by
anyone) plus two files: ``analog_config.json`` (the AnalogConfig and the chip instance: seed and drift
time) and ``analog_state.safetensors`` (learned DAC ranges). Loading rebuilds the model, re-applies the
same conversion and re-programs the same chip, so outputs are identical for the same seed: programming
noise is a deterministic function of (weights, seed), so it need not be stored.

Saving writes into a temporary folder beside the target and renames it into place, so an interrupted
save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from analogllm.chip import chip_info, deployed, program_
from analogllm.config import AnalogConfig
from analogllm.nn.convert import analogize_
from analogllm.fileio import atomic_dir
from analogllm.mapping import restore_transforms_, transform_specs
from analogllm.nn.matrix import AnalogMatrix

CONFIG_NAME = "analog_config.json"
STATE_NAME = "analog_state.safetensors"
FORMAT_VERSION = 1
_PARAM_SUFFIX = ".parametrizations.weight.original"


def split_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(digital state dict with the original key names, analogue-only state)."""
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, AnalogMatrix))
    digital, analog = {}, {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            analog[key] = value.detach().clone().contiguous()
        elif key.endswith(_PARAM_SUFFIX):
            digital[key[: -len(_PARAM_SUFFIX)] + ".weight"] = value
        else:
            digital[key] = value
    return digital, analog


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write an analogue checkpoint to ``path`` atomically (temp folder + rename)."""
    config: AnalogConfig | None = getattr(model, "analog_config", None)
    if config is None:
        raise ValueError("model is not analogue: call analogllm.analogize_(model, config) first")
    if deployed(model):
        raise ValueError("this model was deployed with analogllm.deploy_ and holds no digital weights to save; "
                         "save it before deploying (the chip is reproduced from its seed and drift time)")
    path = Path(path)
    with atomic_dir(path) as tmp:
        digital, analog = split_state_dict(model)
        model.save_pretrained(tmp, state_dict=digital)  # type: ignore[operator]
        if analog:
            save_file(analog, str(tmp / STATE_NAME))
        meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "chip": chip_info(model),
                "transforms": transform_specs(model)}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def load_analog_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``analog_config.json`` of a checkpoint folder."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{path}: not an analogue checkpoint ({CONFIG_NAME} missing); convert a model with `analogllm convert`"
        )
    meta = json.loads(file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    return meta


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load an analogue checkpoint written by :func:`save_pretrained`: same config, same chip."""
    from transformers import AutoModelForCausalLM

    meta = load_analog_meta(path)
    config = AnalogConfig.from_dict(meta["config"])
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    analogize_(model, config)
    restore_transforms_(model, meta.get("transforms") or {})
    state_file = Path(path) / STATE_NAME
    if state_file.is_file():
        result = model.load_state_dict(load_file(str(state_file)), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{state_file}: keys that the converted model does not have: {result.unexpected_keys[:5]}")
    chip = meta.get("chip") or {}
    if chip.get("seed") is not None:
        program_(model, int(chip["seed"]), float(chip.get("seconds") or 0.0))
    model.eval()
    return model
