"""LoRA on a programmed chip: a frozen analogue base and small trainable adapters beside it, via peft.

On analogue hardware the base weights are written once and then stay as they are: programming noise
is frozen into the devices, drift ages them, and rewriting them is slow and adds fresh noise. What
can still be trained cheaply is a small adapter beside each analogue layer. This module makes that
workflow first-class on top of peft:

* :func:`attach_lora` wraps an analogised, programmed model in a peft ``PeftModel``. The base layers
  are the deployed chip instance (``AnalogMatrix`` in ``chip`` mode: programmed weights, drift, read
  noise) with ``requires_grad=False``; the adapters are digital ``nn.Linear`` by default, or analogue
  (``analog=True``: ``lora_A``/``lora_B`` become :class:`~analogllm.nn.linear.AnalogLinear` on the same
  device model and chip seed, trained with the chip in the loop: straight-through gradients of their
  chip reads, rewritten to the chip after every step).
* **modes, not flags.** The hardware mode of every analogue matrix is explicit (``analogllm.set_mode``)
  and independent of ``nn.Module.training``, so ``model.train()`` — from an HF ``Trainer``, accelerate or
  a plain loop — only turns on dropout: the base stays the chip. :func:`check_deployed` asserts it.
* **save / load**: adapters are stored in peft's own format (``adapter_config.json`` +
  ``adapter_model.safetensors``), beside the chip checkpoint of :mod:`analogllm.hf.checkpoint`:
  a deployment is ``DIR/chip/`` (the map: digital weights, analogue config, chip seed and drift time,
  DAC ranges) plus ``DIR/adapters/NAME/`` (one folder per adapter, e.g. one per task or per drift time).
* **merging**: folding ``B·A`` into the analogue weights means *reprogramming the chip*. peft's
  ``merge_and_unload`` / ``merge_adapter`` are refused with :class:`ChipMergeError`, because they would
  silently rewrite the weights while keeping the old chip's noise draws and drift time.
  :func:`merge_and_reprogram` models the physical operation: the merged weights are programmed onto a
  new chip instance (a new seed: fresh programming noise) whose drift clock restarts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import load_peft_weights, set_peft_model_state_dict
from torch import nn

from analogllm.chip import calibrate_, chip_info, program_
from analogllm.config import AnalogConfig
from analogllm.nn.convert import analog_matrices
from analogllm.fileio import atomic_dir
from analogllm.nn.linear import AnalogConv1D, AnalogLinear
from analogllm.nn.matrix import AnalogMatrix
from analogllm.ops.noise import seeded
from analogllm.nn.weight import AnalogWeight
from analogllm.hf.checkpoint import from_pretrained, save_pretrained
from analogllm.hf.prefix import hold_prefix_
from analogllm.tuners.pat import layer_name
from analogllm.config.schema import check

ADAPTER_META = "analog_adapters.json"
CHIP_DIR = "chip"
ADAPTERS_DIR = "adapters"
_FORMAT_VERSION = 1

#: Default LoRA targets per ``config.model_type``: the analogue matmuls of attention / mixer and MLP.
#: LM heads, routers and gates stay without adapters; MoE 3-D expert weights are not ``nn.Linear`` and
#: get none (their shared experts and attention do). A model type not listed gets an adapter on every
#: analogue 2-D layer (see :func:`default_target_modules`).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{t: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
       for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "smollm3")},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "rwkv": ("key", "value", "receptance", "output"),
    "lfm2": ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"),
    "qwen3_next": ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj",
                   "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    # peft refuses out_proj on Mamba models: the fused kernels read out_proj.weight directly, bypassing LoRA
    "mamba": ("in_proj", "x_proj"),
    "falcon_mamba": ("in_proj", "x_proj"),
    "mamba2": ("in_proj",),
}


class ChipMergeError(ValueError):
    """Merging adapters into analogue weights was attempted without reprogramming the chip."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapters put beside the chip.

    r, alpha, dropout: LoRA rank, scaling numerator (ΔW = alpha/r · B·A) and input dropout.
    target_modules:    leaf names of the analogue layers that get an adapter; ``None`` = the model
                       family's default (:data:`DEFAULT_TARGETS`).
    analog:            put the adapters on the chip too (same device model as the base); default digital.
    init_seed:         seed of the adapters' random initialisation (``lora_A``; ``lora_B`` starts at 0, so
                       a fresh adapter leaves the chip's output unchanged).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    analog: bool = False
    init_seed: int = 0

    def __post_init__(self) -> None:
        check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.target_modules is None or len(self.target_modules) > 0, "lora.target_modules",
              "must be a non-empty list of layer names, or null for the family default")


# ----- which layers ---------------------------------------------------------------------------------------
def analog_layer_names(model: nn.Module) -> dict[str, nn.Module]:
    """Full name → module of every analogue 2-D layer (``AnalogLinear`` / ``AnalogConv1D``) of the base."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (AnalogLinear, AnalogConv1D))}


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """The family default LoRA targets present in ``model`` as analogue layers.

    Falls back to every analogue 2-D layer's leaf name for a model type without a table entry.
    """
    leaves = {name.rsplit(".", 1)[-1] for name in analog_layer_names(model)}
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    table = [t for t in DEFAULT_TARGETS.get(model_type, ()) if t in leaves]
    return tuple(table) if table else tuple(sorted(leaves))


def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    leaves = {name.rsplit(".", 1)[-1] for name in analog_layer_names(model)}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise ValueError(
            f"lora.target_modules: {', '.join(map(repr, missing))} is not an analogue layer of this model; "
            f"analogue layers are: {', '.join(sorted(leaves))}"
        )


# ----- attaching ------------------------------------------------------------------------------------------
def _base_matrices(model: nn.Module) -> list[tuple[str, AnalogMatrix, torch.Tensor]]:
    return [(n, m, w) for n, m, w in analog_matrices(model) if ".lora_" not in n]


def _adapter_matrices(model: nn.Module) -> list[tuple[str, AnalogMatrix, torch.Tensor]]:
    return [(n, m, w) for n, m, w in analog_matrices(model) if ".lora_" in n]


def _require_chip(model: nn.Module) -> AnalogConfig:
    config = getattr(model, "analog_config", None)
    if config is None:
        raise ValueError("model is not analogue: call analogllm.analogize_(model, config) first")
    matrices = _base_matrices(model)
    if not matrices:
        raise ValueError("model has no analogue layers: nothing for LoRA to sit beside")
    if any(m.chip.seed is None for _, m, _ in matrices):
        raise ValueError("the chip is not programmed: call analogllm.program_(model, seed) (and drift_) first")
    weight_side = {id(m.analog) for m in model.modules() if isinstance(m, AnalogWeight)}  # no DAC on raw reads
    unready = [n for n, m, _ in matrices
               if id(m) not in weight_side and m.config.dac.range == "learned" and not m.range_set]
    if unready:
        raise ValueError(
            f"the chip's learned DAC ranges are not set ({unready[0]} and {len(unready) - 1} more): run "
            "analogllm.tuners.lora.calibrate_(model, input_ids) on a data batch before attaching adapters, "
            "so training cannot move the deployed chip's ranges"
        )
    return config


def attach_lora(model: nn.Module, settings: LoraSettings = LoraSettings()) -> PeftModel:
    """Wrap the programmed analogue ``model`` in peft LoRA adapters; the base stays the deployed chip.

    The base must be analogised, programmed (``program_``/``drift_``) and calibrated (:func:`calibrate_`).
    Returns the ``PeftModel``: only adapter parameters require gradients, the base stays in ``chip``
    mode, and merging is guarded (see the module docstring).
    """
    config = _require_chip(model)
    targets = settings.target_modules or default_target_modules(model)
    _check_targets(model, targets)
    lora_config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=list(targets),
        bias="none", fan_in_fan_out=getattr(getattr(model, "config", None), "model_type", "") == "gpt2",
    )
    peft_model = _wrap(model, lora_config, settings.init_seed)  # the seed: the chip's read-noise stream stays
    if settings.analog:
        analogize_adapters_(peft_model, config)
    _guard_merges(peft_model)
    peft_model.eval()
    return peft_model


def _wrap(model: nn.Module, lora_config: LoraConfig, seed: int) -> PeftModel:
    """peft's LoRA around the chip ``model``, its initialisation drawn under ``seed`` (the caller's random
    streams left as they were). A digital KV prefix is stored first, from the exact base weights, as the
    host holds it: computed through the adapters at every forward it would move with them, without a
    gradient, and every later token attends to it (it is the attention sink)."""
    hold_prefix_(model)
    with seeded(seed):
        return get_peft_model(model, lora_config)


def analogize_adapters_(model: PeftModel, config: AnalogConfig | None = None) -> PeftModel:
    """Put every ``lora_A``/``lora_B`` on the chip (``AnalogLinear`` with ``config``, default the base's).

    Each adapter matrix is identified on the chip by its module name (without peft's wrapping), so a
    reload converts them identically. It is programmed on the base chip's seed with its own drift clock
    at 0: adapters are written after training, long after the base was.
    """
    config = config or model.analog_config
    seed = _base_matrices(model)[0][1].chip.seed
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for holder_name in ("lora_A", "lora_B"):
                for adapter, lin in getattr(module, holder_name).items():
                    if type(lin) is nn.Linear:
                        AnalogLinear.from_linear(lin, config, layer_name(f"{name}.{holder_name}.{adapter}"))
                        lin.analog.chip.seed = seed
    return model


def has_analog_adapters(model: nn.Module) -> bool:
    return bool(_adapter_matrices(model))


# ----- the invariant -----------------------------------------------------------------------------------
def check_deployed(model: nn.Module) -> None:
    """Raise unless every base analogue matrix reads the programmed chip (``chip`` mode) and is frozen."""
    for name, matrix, weight in _base_matrices(model):
        if matrix.mode != "chip":
            raise RuntimeError(f"{name}: the base is in {matrix.mode!r} mode, not the programmed chip; "
                               "call analogllm.set_mode(model, 'chip')")
        if weight.requires_grad:
            raise RuntimeError(f"{name}: the base chip's weight requires grad; only adapters may train")


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains: the adapters (incl. analogue adapters' DAC ranges)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _guard_merges(model: PeftModel) -> None:
    """Refuse peft's merges on this instance (and its LoraModel): merging means reprogramming."""

    def refuse(*_: Any, **__: Any) -> None:
        raise ChipMergeError(
            "merging LoRA adapters into analogue weights means reprogramming the chip (fresh programming "
            "noise, drift clock restarted); peft's merge would rewrite the weights but keep the old chip's "
            "noise draws and drift time. Use analogllm.tuners.lora.merge_and_reprogram(model, seed=NEW_SEED), "
            "or keep the adapters beside the chip (save_deployment)"
        )

    for target in (model, model.base_model):
        for name in ("merge_and_unload", "merge_adapter"):
            object.__setattr__(target, name, refuse)


# ----- identity of the chip -------------------------------------------------------------------------------
@torch.no_grad()
def chip_fingerprint(model: nn.Module) -> str:
    """SHA-256 of everything that defines the base chip: every non-adapter parameter and buffer, every
    base matrix's realised (programmed, drifted) weight and gain, and the chip seed and time.

    Names are taken without peft's wrapping, so a model before ``attach_lora`` and after it have equal
    fingerprints exactly when only adapters changed.
    """
    h = hashlib.sha256()
    state = {layer_name(k): v for k, v in model.state_dict().items() if "lora_" not in k}
    for key, value in sorted(state.items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for name, matrix, weight in _base_matrices(model):
        h.update(f"{layer_name(name)}:{matrix.chip.seed}:{matrix.chip.seconds}".encode())
        h.update(matrix.realised_weight(weight).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----- merging --------------------------------------------------------------------------------------------
def merge_and_reprogram(model: PeftModel, seed: int, seconds: float = 0.0) -> nn.Module:
    """Fold the adapters into the base weights and program them onto a new chip instance.

    This is what merging costs on analogue hardware: the merged matrix W + (alpha/r)·B·A is written
    again, so it gets *fresh* programming noise (chip ``seed``, which must differ from the current one)
    and its drift clock restarts at ``seconds`` (0 = read right after programming; age it with
    ``drift_``). The noise the adapters had learned to compensate is gone, replaced by new noise.
    Returns the plain analogue model (adapters removed), with the learned DAC ranges kept.
    """
    if not isinstance(model, PeftModel):
        raise ValueError("merge_and_reprogram expects the PeftModel returned by attach_lora / load_adapters")
    old = _base_matrices(model)[0][1].chip.seed
    if seed == old:
        raise ChipMergeError(
            f"seed {seed} is the current chip's: reprogramming draws fresh programming noise, so pass a new "
            "chip seed (reusing it would replay the old noise draws onto the new weights)"
        )
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    if any(m.chip.read_back is not None for _, m, _ in _base_matrices(model)):
        raise ChipMergeError(
            "the base chip was read back from measurements of a physical chip: merging means programming that "
            "chip again, which only the chip itself can do. Keep the adapters beside it, or program the merged "
            "weights on the hardware and read it back again"
        )
    if has_analog_adapters(model):
        _digitize_adapters_(model)
    lora_model = model.base_model
    merged = type(lora_model).merge_and_unload(lora_model)  # the class method: bypasses the instance guard
    program_(merged, seed, seconds)
    merged.eval()
    return merged


def _digitize_adapters_(model: nn.Module) -> None:
    """Turn analogue adapters back into plain ``nn.Linear`` (their digital weights) so peft can merge them."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AnalogLinear) and ".lora_" in name:
            del module.analog
            module.__class__ = nn.Linear


# ----- save / load ----------------------------------------------------------------------------------------
def save_adapters(model: PeftModel, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the active adapter in peft's format to ``path`` (atomically), with ``analog_adapters.json``:
    the chip instance and age the adapter was trained beside (an adapter corrects *that* chip), and for
    analogue adapters their config, so that loading puts them back on the chip. ``extra`` (file name →
    JSON content) is written into the same folder in the same atomic step, e.g. the provenance of adapters
    trained on a read-back chip; peft ignores such files."""
    if not isinstance(model, PeftModel):
        raise ValueError("save_adapters expects the PeftModel returned by attach_lora / load_adapters")
    path = Path(path)
    base = _base_matrices(model)[0][1].chip
    meta: dict[str, Any] = {"format_version": _FORMAT_VERSION, "chip": {"seed": base.seed, "seconds": base.seconds},
                            "analog": has_analog_adapters(model)}
    if meta["analog"]:
        meta["config"] = _adapter_matrices(model)[0][1].config.to_dict()
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
    return path


def load_adapters(model: nn.Module, path: str | os.PathLike, trainable: bool = False) -> PeftModel:
    """Put the adapters saved at ``path`` beside the analogue ``model``, programmed first as the chip
    instance and age they were trained beside when it is not that chip yet.

    Uses peft's own config and weight files; analogue adapters are converted before their weights (and
    DAC ranges) are loaded. Adapters are frozen unless ``trainable``.
    """
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json; expected a folder written by save_adapters")
    meta_file = path / ADAPTER_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta and meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format_version {meta.get('format_version')!r} is not supported")
    chip = meta.get("chip") or {}
    read_back = any(m.chip.read_back is not None for _, m, _ in _base_matrices(model))
    if chip.get("seed") is not None and chip_info(model) != chip and not read_back:  # a measured chip is as it is
        program_(model, int(chip["seed"]), float(chip["seconds"]))
    _require_chip(model)
    lora_config = LoraConfig.from_pretrained(str(path))
    lora_config.inference_mode = False
    peft_model = _wrap(model, lora_config, 0)  # the initialisation is overwritten by the saved weights
    if meta.get("analog"):
        analogize_adapters_(peft_model, AnalogConfig.from_dict(meta["config"]))
    weights = load_peft_weights(str(path), device="cpu")
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{path}: adapter weights do not fit this model (unexpected: {list(result.unexpected_keys)[:3]}, "
            f"missing: {missing[:3]}); was it saved from another model or with other settings?"
        )
    for _, p in peft_model.named_parameters():
        p.requires_grad_(trainable and p.requires_grad)
    _guard_merges(peft_model)
    peft_model.eval()
    return peft_model


@contextmanager
def bare_base(model: PeftModel) -> Iterator[nn.Module]:
    """The base model with every LoRA wrapper temporarily replaced by its base layer (restored after):
    the exact digital + chip state of the deployed base, e.g. to save it as a plain analogue checkpoint."""
    base = model.get_base_model()
    swapped = []
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.get_base_layer())
            swapped.append((parent, child, module))
    try:
        yield base
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


def save_deployment(model: PeftModel, path: str | os.PathLike, name: str = "default", tokenizer: Any = None,
                    chip: bool = True) -> Path:
    """Write "map + adapters": ``path/chip/`` (the analogue checkpoint of the base chip) and
    ``path/adapters/<name>/`` (peft adapter). ``chip=False`` adds an adapter beside an existing chip."""
    path = Path(path)
    if chip:
        with bare_base(model) as base:
            save_pretrained(base, path / CHIP_DIR, tokenizer=tokenizer)
    elif not (path / CHIP_DIR).is_dir():
        raise FileNotFoundError(f"{path / CHIP_DIR}: no chip checkpoint to put the adapter beside; save with chip=True")
    save_adapters(model, path / ADAPTERS_DIR / name)
    return path


def adapter_names(path: str | os.PathLike) -> list[str]:
    """Names of the adapters saved in a deployment folder."""
    folder = Path(path) / ADAPTERS_DIR
    return sorted(p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file()) if folder.is_dir() else []


def load_deployment(path: str | os.PathLike, name: str | None = None) -> PeftModel:
    """Load ``path/chip`` (same chip instance and drift time) and the adapter ``name`` beside it
    (``None``: the only one there)."""
    path = Path(path)
    names = adapter_names(path)
    if name is None:
        if len(names) != 1:
            raise ValueError(f"{path}: {len(names)} adapters ({', '.join(names) or 'none'}); pass name=")
        name = names[0]
    elif name not in names:
        raise FileNotFoundError(f"{path}: no adapter {name!r}; saved adapters: {', '.join(names) or 'none'}")
    model = from_pretrained(path / CHIP_DIR)
    return load_adapters(model, path / ADAPTERS_DIR / name)


__all__ = [
    "DEFAULT_TARGETS", "ChipMergeError", "LoraSettings", "adapter_names", "adapter_parameters",
    "analog_layer_names", "analogize_adapters_", "attach_lora", "bare_base", "calibrate_", "check_deployed",
    "chip_fingerprint", "default_target_modules", "has_analog_adapters", "load_adapters", "load_deployment",
    "merge_and_reprogram", "save_adapters", "save_deployment",
]
