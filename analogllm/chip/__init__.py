"""The chip: programming a converted model onto one sampled chip instance, ageing it, deploying it."""

from analogllm.chip.program import calibrate_, chip_info, deploy_, deployed, drift_, program_

__all__ = ["calibrate_", "chip_info", "deploy_", "deployed", "drift_", "program_"]
