"""Saving and loading analogue models: Hugging Face checkpoints with the analogue quantization config.

An analogue checkpoint is an ordinary HF checkpoint (``config.json`` + safetensors) whose config carries
``quantization_config: {quant_method: analogllm, ...}`` (:mod:`analogllm.hf.quantizer`): the analogue
config, the chip instance (seed, drift time) and the mapping's input transforms. Its weights are the
(mapped) digital weights plus the converter ranges. The chip itself is not stored: programming noise is
a deterministic function of (weights, seed), so loading programs the same chip again.

``model.save_pretrained(dir)`` and ``AutoModelForCausalLM.from_pretrained(dir)`` do all of this by
themselves once ``analogllm`` is imported; the two functions here add what a checkpoint folder of ours
needs besides: the tokenizer, a write into a temporary folder renamed into place, and a refusal to
overwrite a folder that holds anything else than an earlier checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from analogllm.fileio import atomic_dir
from analogllm.hf.quantizer import METHOD


def is_analog_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an analogue HF checkpoint (its config.json names the analogllm method)."""
    file = Path(path) / "config.json"
    try:
        q = json.loads(file.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == METHOD


def check_destination(path: Path, kind: str = "analogue checkpoint") -> None:
    """Refuse to replace ``path`` unless it is missing, empty, or an earlier checkpoint of ours: an output
    folder's foreign files are never deleted."""
    if path.is_file():
        raise ValueError(f"{path} is a file; choose another output folder")
    if path.is_dir() and any(path.iterdir()) and not is_analog_checkpoint(path):
        raise ValueError(f"{path} exists and is not an {kind}; choose another output folder or empty it")


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                    state_dict: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (analogue) as an HF checkpoint at ``path``, atomically (temp folder + rename).

    ``state_dict``: the weights to write instead of ``model.state_dict()``: the whole state dict of a
    model sharded across processes (:func:`analogllm.training.sharding.full_state_dict`), written by the
    main process; the checkpoint is the same as the unsharded model's."""
    if getattr(model, "analog_config", None) is None:
        raise ValueError("model is not analogue: call analogllm.analogize_(model, config) first")
    _refuse_read_back(model)
    path = Path(path)
    check_destination(path)
    quantizer = getattr(model, "hf_quantizer", None)
    with atomic_dir(path) as tmp:
        if state_dict is not None and quantizer is not None:
            quantizer.state_dict_to_save = state_dict  # transformers takes the weights from the quantizer
        try:
            model.save_pretrained(tmp, state_dict=state_dict)
        finally:
            if quantizer is not None:
                quantizer.state_dict_to_save = None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def _refuse_read_back(model: nn.Module) -> None:
    """A checkpoint restores its chip from (weights, seed, time); a chip read back from measurements is not
    such a function, and saving it would reload as a simulated chip under the same name."""
    from analogllm.nn.convert import analog_matrices

    if any(m.chip.read_back is not None for _, m, _ in analog_matrices(model)):
        raise ValueError("this model runs on a chip read back from measurements, which a checkpoint cannot hold "
                         "(loading would simulate a fresh chip instead); keep the map and the measurement and save "
                         "only the adapters (analogllm.export.readback.save_readback_adapters)")


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load an analogue checkpoint: the same config, mapping and chip, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not is_analog_checkpoint(path):
        raise FileNotFoundError(f"{path}: not an analogue checkpoint (no quantization_config with quant_method "
                                f"{METHOD!r} in config.json); convert a model with `analogllm convert`")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()



def load_analog_model(source: str, config: Any = None, calibration_blocks: int = 0,
                      progress: bool = False) -> tuple[nn.Module, Any, bool]:
    """(model, tokenizer, is_checkpoint): the analogue checkpoint folder ``source`` as saved (with its
    tokenizer), else ``source`` (a built-in name, Hub id or digital folder) converted with ``config``
    (default: the pcm profile) and, with ``calibration_blocks`` > 0, mapped onto the chip from that many
    blocks of the built-in training text."""
    from transformers import AutoTokenizer

    from analogllm.config import AnalogConfig
    from analogllm.data import calibration_blocks as pick_blocks
    from analogllm.hf.models import load_model
    from analogllm.nn.convert import analogize_

    path = Path(source).expanduser()
    if is_analog_checkpoint(path):
        model = from_pretrained(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: the checkpoint has no tokenizer ({exc}); save it with its tokenizer "
                             "(analogllm convert --out does)") from None
        return model, tokenizer, True
    model, tokenizer = load_model(source)
    calibration = pick_blocks(tokenizer, count=calibration_blocks)
    analogize_(model, config or AnalogConfig.from_profile("pcm"), calibration=calibration, progress=progress)
    return model, tokenizer, False

__all__ = ["check_destination", "from_pretrained", "is_analog_checkpoint", "load_analog_model", "save_pretrained"]
