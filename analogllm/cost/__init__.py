"""Deployment cost of an analogue LLM: what one generated token costs on a chip, and on a GPU.

``workload_from_model(model)`` / ``workload_from_manifest(manifest, hf_config)`` count what one decode
step does (:mod:`counts`), ``estimate(workload, hardware, baseline)`` prices it with a sourced hardware
profile (:mod:`hardware`, :mod:`estimate`), and :mod:`report` writes the tables, JSON and chart.
``analogllm cost MAP_OR_MODEL`` is the command line.
"""

from analogllm.cost.counts import DEFAULT_CONTEXT, Workload, workload_from_manifest, workload_from_model
from analogllm.cost.estimate import CostReport, estimate
from analogllm.cost.hardware import HardwareProfile, hardware_names, load_hardware
from analogllm.cost.report import markdown, to_dict, write_report

__all__ = [
    "DEFAULT_CONTEXT", "CostReport", "HardwareProfile", "Workload", "estimate", "hardware_names", "load_hardware",
    "markdown", "to_dict", "workload_from_manifest", "workload_from_model", "write_report",
]
