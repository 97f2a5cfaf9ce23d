"""Analogue checkpoints as Hugging Face checkpoints: a registered quantization config and quantizer.

transformers lets a quantization method plug into ``from_pretrained`` / ``save_pretrained`` (as
bitsandbytes and torchao do). analogllm registers ``quant_method: "analogllm"``:

* ``model.save_pretrained(dir)`` on an analogue model writes an ordinary HF checkpoint whose
  ``config.json`` carries the :class:`AnalogQuantizationConfig` (the analogue config, the chip seed and
  drift time, the mapping's input transforms) and whose weights include the converter ranges and
  transform buffers. A deployed model (digital weights freed) refuses, naming ``deploy_``.
* ``AutoModelForCausalLM.from_pretrained(dir)`` (after ``import analogllm``) converts the model before its
  weights load, loads them, and programs the same chip: the analogue model, not the digital one.
* ``AutoModelForCausalLM.from_pretrained(digital, quantization_config=AnalogQuantizationConfig(profile=
  "pcm"))`` converts a digital checkpoint at load time.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

METHOD = "analogllm"
FORMAT_VERSION = 2


@register_quantization_config(METHOD)
class AnalogQuantizationConfig(QuantizationConfigMixin):
    """What an analogue checkpoint needs beyond its weights.

    analog:     the :class:`~analogllm.config.AnalogConfig` as a dict (or use ``profile``/``overrides``);
    profile:    a profile name to convert a digital checkpoint with at load time;
    overrides:  dotted overrides on that profile, e.g. ``{"adc.bits": 6}``;
    chip:       ``{"seed": int | None, "seconds": float}``, the chip instance to program after loading;
    transforms: module name → input-transform spec (from the mapping; rebuilt before the weights load).
    moments:    module name → rank of its input moment (closed-loop programming; rebuilt before the
                weights load).
    residual:   seed of the online residual rotation at a tied digital LM head (``mapping.rotate`` on a
                tied model), or None; rebuilt before the weights load.

    ``save_pretrained`` refreshes it from the model first (:meth:`refresh`), so a checkpoint always holds
    the model's current chip and transforms.
    """

    def __init__(self, analog: dict | None = None, profile: str | None = None, overrides: dict | None = None,
                 chip: dict | None = None, transforms: dict | None = None, format_version: int = FORMAT_VERSION,
                 residual: int | None = None, moments: dict | None = None, **kwargs: Any) -> None:
        self.quant_method = METHOD
        self.analog = analog
        self.profile = profile
        self.overrides = dict(overrides or {})
        self.chip = dict(chip or {"seed": None, "seconds": 0.0})
        self.transforms = dict(transforms or {})
        self.moments = dict(moments or {})
        self.residual = residual
        self.format_version = format_version
        if format_version != FORMAT_VERSION:
            raise ValueError(f"analogllm checkpoint format_version {format_version} is not supported "
                             f"(this analogllm reads {FORMAT_VERSION}); convert the model again")
        if analog is None and profile is None:
            raise ValueError("AnalogQuantizationConfig needs analog= (a config dict) or profile= (a profile name)")

    def analog_config(self):
        from analogllm.config import AnalogConfig

        if self.analog is not None:
            return AnalogConfig.from_dict(self.analog)
        return AnalogConfig.from_profile(self.profile, **self.overrides)

    def refresh(self, model) -> AnalogQuantizationConfig:
        """Take the analogue config, chip instance and input transforms from the live ``model``."""
        from analogllm.chip import chip_info
        from analogllm.mapping import moment_specs, transform_specs
        from analogllm.mapping.rotate import residual_seed

        self.analog, self.profile, self.overrides = model.analog_config.to_dict(), None, {}
        self.chip, self.transforms, self.moments = chip_info(model), transform_specs(model), moment_specs(model)
        self.residual = residual_seed(model)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "format_version": self.format_version, "analog": self.analog,
                "profile": self.profile, "overrides": self.overrides, "chip": self.chip, "transforms": self.transforms,
                "residual": self.residual, "moments": self.moments}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


@register_quantizer(METHOD)
class AnalogHfQuantizer(HfQuantizer):
    """Converts before loading, programs after; serialisable unless deployed."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def _process_model_before_weight_loading(self, model, **kwargs):
        from analogllm.mapping import restore_moments_, restore_transforms_
        from analogllm.nn.convert import analogize_

        analogize_(model, self.quantization_config.analog_config(), attach=False)
        restore_transforms_(model, self.quantization_config.transforms)
        restore_moments_(model, self.quantization_config.moments)
        if self.quantization_config.residual is not None:
            from analogllm.mapping.rotate import keep_head_tied_

            keep_head_tied_(model, int(self.quantization_config.residual))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from analogllm.chip import program_
        from analogllm.nn.matrix import AnalogMatrix

        for m in model.modules():
            if isinstance(m, AnalogMatrix) and hasattr(m, "range_ready"):
                m.range_set = bool(m.range_ready)
        chip = self.quantization_config.chip
        if chip.get("seed") is not None:
            program_(model, int(chip["seed"]), float(chip.get("seconds") or 0.0))
        attach(model, self)
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    #: weights :func:`analogllm.hf.checkpoint.save_pretrained` was given for a sharded model (transformers
    #: replaces ``save_pretrained``'s own ``state_dict`` argument by what this quantizer returns)
    state_dict_to_save: dict | None = None

    def get_state_dict_and_metadata(self, model):
        """Called by ``save_pretrained`` before anything is written: refuses a deployed model (its digital
        weights were freed) and refreshes the quantization config from the model."""
        from analogllm.chip import deployed

        if deployed(model):
            raise ValueError("this analogue model was deployed with analogllm.deploy_: its digital weights were "
                             "freed, so there is nothing to save; save it before deploying (the chip is "
                             "reproduced from its seed and drift time)")
        self.quantization_config.refresh(model)
        return self.state_dict_to_save, {}

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def attach(model, quantizer: AnalogHfQuantizer | None = None) -> None:
    """Make ``model`` (a converted PreTrainedModel) save and load as an analogue HF checkpoint."""
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        return
    qconfig = quantizer.quantization_config if quantizer is not None else AnalogQuantizationConfig(
        analog=model.analog_config.to_dict())
    qconfig.refresh(model)
    quantizer = quantizer or AnalogHfQuantizer(qconfig, pre_quantized=True)
    model.config.quantization_config = qconfig
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = METHOD


__all__ = ["METHOD", "AnalogHfQuantizer", "AnalogQuantizationConfig", "attach"]
