"""The chip: programming a converted model onto one sampled chip instance, ageing it, deploying it, and
the mode its layers run in (:mod:`.program`); one matrix's programmed state (:mod:`.state`); what a
device does to a weight, as statistics (:mod:`.statistics`)."""

from analogllm.chip.program import calibrate_, chip_info, deploy_, deployed, drift_, mode, modes, program_, set_mode

__all__ = ["calibrate_", "chip_info", "deploy_", "deployed", "drift_", "mode", "modes", "program_", "set_mode"]
