"""Deployment maps: the files a chip team programs (crossbar conductances or photonic mesh phases).

``export_map(model, out_dir, target)`` writes a map, ``load_map(dir)`` reads one back with every check,
``verify_map(dir, model)`` shows that programming the map reproduces the model. :mod:`fusion` and
:mod:`crosssim` write a crossbar map in IBM Fusion's CSV (and read it back) and as CrossSim arrays. The
format is specified in ``docs/export-format.md``.
"""

from analogllm.export.manifest import FORMAT_NAME, FORMAT_VERSION, AnalogMap, LayerMap, MapError, load_map
from analogllm.export.verify import LayerCheck, VerifyReport, verify_map
from analogllm.export.writer import TARGETS, export_map

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "TARGETS", "AnalogMap", "LayerCheck", "LayerMap", "MapError", "VerifyReport",
    "export_map", "load_map", "verify_map",
]
