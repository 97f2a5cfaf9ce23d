"""Configuration: the analogue config (:mod:`.analog`), its validation (:mod:`.schema`) and the built-in
device profiles (``analogllm/profiles/*.yaml``)."""

from analogllm.config.analog import (
    ADCConfig,
    AnalogConfig,
    DACConfig,
    DriftConfig,
    IRDropConfig,
    MappingConfig,
    OutputConfig,
    TilingConfig,
    TrainingConfig,
    device_names,
    profile_names,
    profile_parameters,
    profile_sources,
    source_of,
)
from analogllm.config.schema import ConfigError

__all__ = [
    "ADCConfig", "AnalogConfig", "ConfigError", "DACConfig", "DriftConfig", "IRDropConfig", "MappingConfig", "OutputConfig",
    "TilingConfig", "TrainingConfig", "device_names", "profile_names", "profile_parameters", "profile_sources",
    "source_of",
]
