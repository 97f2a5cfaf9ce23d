"""analogllm: run, train, fine-tune and export large language models for analogue hardware.

The public API is small::

    import analogllm as al
    cfg = al.AnalogConfig.from_profile("pcm")
    al.analogize_(model, cfg)          # every matmul goes through the analogue path
    al.program_(model, seed=0)         # sample one chip instance
    al.drift_(model, seconds=86400)    # age it by a day
    al.deploy_(model, seed=0)          # or: keep only the chip (frees the digital weights)
"""

import analogllm.hf.quantizer  # noqa: F401  registers quant_method "analogllm" with transformers
from analogllm.chip import chip_info, deploy_, drift_, mode, program_, set_mode
from analogllm.config import AnalogConfig, device_names, profile_names
from analogllm.nn.convert import ConversionReport, analog_matrices, analogize_, register_adapter
from analogllm.export import export_map, load_map, verify_map
from analogllm.nn.linear import AnalogConv1D, AnalogLinear
from analogllm.config.schema import ConfigError

__all__ = [
    "AnalogConfig", "AnalogConv1D", "AnalogLinear", "ConfigError", "ConversionReport", "analog_matrices",
    "analogize_", "chip_info", "deploy_", "device_names", "drift_", "export_map", "load_map", "mode",
    "profile_names", "program_", "register_adapter", "set_mode", "verify_map",
]
__version__ = "0.1.0"
