"""Hardware cost profiles: what one conversion, one MAC, one byte and one second cost on a chip.

A profile is a YAML file (the built-in ones lie beside this module) describing one kind of
hardware — a resistive crossbar chip, a photonic mesh processor or a digital GPU — plus the digital
units that do what the analogue arrays cannot (norms, softmax, attention over the KV cache, the LM
head). Cost figures from the literature are only as good as their provenance, so every number in a
profile must have an entry in its ``sources:`` block (a citation, or "assumption: ..." where no
measurement exists); a profile without one fails to load, naming the field.

Units are in the field names (``_pj`` picojoules, ``_fj`` femtojoules, ``_mw`` milliwatts, ``_mm2``
square millimetres, ``_per_s`` per second), so a YAML reader never has to guess.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from analogllm.config.schema import ConfigError, check, from_dict

KINDS = ("crossbar", "photonic", "gpu")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e12`` as a string; cost figures are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass(frozen=True)
class DigitalCost:
    """The digital units beside the analogue arrays (or the GPU's own memory system).

    pj_per_flop:      energy of one digital floating-point operation (add or multiply) in the periphery
                      and for the model's digital parts.
    flops_per_s:      digital throughput available to one token's digital work (sets its latency).
    dram_pj_per_byte: energy per byte read from / written to off-chip DRAM (KV cache, digital weights,
                      embedding rows: they do not fit in on-chip memory for an LLM).
    dram_bytes_per_s: DRAM bandwidth (sets the latency of that traffic).
    sram_pj_per_byte: energy per byte of on-chip SRAM traffic (recurrent states of SSM / RWKV layers).
    bytes_per_value:  storage of one activation / KV / digital weight value (2 = 16-bit).
    """

    pj_per_flop: float
    flops_per_s: float
    dram_pj_per_byte: float
    dram_bytes_per_s: float
    sram_pj_per_byte: float
    bytes_per_value: int = 2

    def __post_init__(self) -> None:
        _positive(self, "digital")


@dataclass(frozen=True)
class CrossbarCost:
    """A resistive crossbar chip (PCM, RRAM), anchored to a measured chip efficiency.

    The measured figure covers a full-size MVM (``anchor_rows`` × ``anchor_cols`` cells, every row and
    column used) including its converters, so the energy of one analogue MAC is what remains of it after
    the DAC and ADC estimates below: E_MAC = (2 / anchor_tops_per_w − E_DAC / cols − E_ADC / rows) per
    MAC. A full-size MVM therefore costs exactly the measured efficiency, while partly used arrays (a
    layer narrower than a tile) pay for their converters in proportion. The read time of one array is
    the anchor chip's: 2 · rows · cols operations per array read at ``anchor_tops / anchor_arrays``.

    anchor_tops_per_w, anchor_tops: measured efficiency (TOPS/W) and peak throughput (TOPS) of the chip.
    anchor_arrays:    arrays (cores) that the peak throughput is spread over.
    anchor_rows, anchor_cols: size of one anchor array.
    array_area_mm2:   area of one anchor array with its periphery (ADCs, DACs, local digital); a map's
                      array of another size scales with its cell count.
    dac_pj:           energy of one input (word-line) DAC conversion.
    adc_fom_fj:       Walden figure of merit of the column ADCs, fJ per conversion step:
                      E_ADC = FOM · 2^bits at the map's ADC resolution.
    """

    anchor_tops_per_w: float
    anchor_tops: float
    anchor_arrays: int
    anchor_rows: int
    anchor_cols: int
    array_area_mm2: float
    dac_pj: float
    adc_fom_fj: float

    def __post_init__(self) -> None:
        _positive(self, "crossbar")

    @property
    def read_time_s(self) -> float:
        """Time of one array read (one MVM of one core) at the anchor chip's peak throughput."""
        ops = 2 * self.anchor_rows * self.anchor_cols
        return ops / (self.anchor_tops * 1e12 / self.anchor_arrays)

    def adc_pj(self, bits: int | None) -> float:
        return self.adc_fom_fj * 2.0 ** (bits or 8) * 1e-3

    def mac_pj(self, adc_bits: int | None) -> float:
        """Energy of one analogue MAC (array, drivers, sensing), the anchor minus its converters."""
        per_mac = 2.0 / self.anchor_tops_per_w  # pJ per MAC: 1 TOPS/W = 1 op per pJ, 2 ops per MAC
        rest = per_mac - self.dac_pj / self.anchor_cols - self.adc_pj(adc_bits) / self.anchor_rows
        check(rest > 0, "crossbar", f"the DAC and ADC estimates ({self.dac_pj} pJ, {self.adc_pj(adc_bits):.3g} pJ) "
              f"exceed the anchor's energy of a full MVM ({per_mac * self.anchor_rows * self.anchor_cols:.4g} pJ)")
        return rest


@dataclass(frozen=True)
class PhotonicCost:
    """A coherent photonic processor of MZI meshes (tiles of ``mesh_size`` modes, see the map format).

    Light: every output detection needs ``detector_fj`` of optical energy at the ADC's resolution; a
    mesh read launches that much per output mode, divided by the optical transmission through the two
    meshes and the attenuators (insertion loss of ``2·k + 1`` MZIs in series, dB from the device profile)
    and by the laser's wall-plug efficiency. Per MAC that is detector_fj / (k · transmission · η): the
    1/width scaling of Anderson et al., with the width of one optical dot product, the mesh size k.

    Electronics per read: one DAC and one modulator per input mode of each mesh, one detector + TIA per
    output mode, one ADC per output of each input tile. Phase shifters: thermal tuners draw holding
    power all the time (φ = γ·V² means power ∝ phase): a shifter at phase φ holds P_π · φ / π, so with
    phases spread over their ranges the mean is P_π for φ and the output phases (range 2π) and P_π / 2
    for θ and the attenuators (an MZI's internal phase 2θ ∈ [0, π]). Their energy per token is the
    holding power times the time one token occupies the chip.
    """

    detector_fj: float
    laser_efficiency: float
    modulator_pj: float
    dac_pj: float
    tia_pj: float
    adc_fom_fj: float
    p_pi_mw: float
    sample_rate_ghz: float
    mzi_area_mm2: float
    io_area_mm2: float

    def __post_init__(self) -> None:
        _positive(self, "photonic", allow_zero=("p_pi_mw",))
        check(self.laser_efficiency <= 1, "photonic.laser_efficiency", "must be in (0, 1]")

    @property
    def read_time_s(self) -> float:
        return 1.0 / (self.sample_rate_ghz * 1e9)

    def adc_pj(self, bits: int | None) -> float:
        return self.adc_fom_fj * 2.0 ** (bits or 8) * 1e-3


@dataclass(frozen=True)
class GPUCost:
    """A digital GPU running the same token: compute at its dense efficiency, weights from HBM.

    At batch 1 (one token of one sequence) every weight is read from HBM once per token, so decode is
    memory-bound: latency = max(ops / peak, bytes / bandwidth). Energy is counted as compute at the
    dense efficiency plus HBM traffic; ``tdp_w`` × latency is reported beside it as the upper bound.
    """

    tops_per_w: float
    peak_tops: float
    tdp_w: float
    hbm_pj_per_bit: float
    hbm_bytes_per_s: float
    bytes_per_value: int = 1

    def __post_init__(self) -> None:
        _positive(self, "gpu")


@dataclass(frozen=True)
class HardwareProfile:
    """One cost profile. ``kind`` says which section is used; ``sources`` cites every number."""

    name: str
    kind: Literal["crossbar", "photonic", "gpu"]
    description: str
    sources: dict[str, str]
    crossbar: CrossbarCost | None = None
    photonic: PhotonicCost | None = None
    gpu: GPUCost | None = None
    digital: DigitalCost | None = None

    def __post_init__(self) -> None:
        section = getattr(self, self.kind)
        check(section is not None, self.kind, f"a {self.kind} profile needs a '{self.kind}:' section")
        if self.kind != "gpu":
            check(self.digital is not None, "digital", "an analogue profile needs a 'digital:' section "
                  "(the units that run norms, softmax, attention and the LM head)")
        missing = [key for key in self.numbers() if key not in self.sources]
        check(not missing, missing[0] if missing else "sources",
              "has no entry in 'sources:' (every number needs a citation, or 'assumption: ...')")

    def numbers(self) -> dict[str, float]:
        """Every numeric field, by dotted key (``crossbar.dac_pj``), of the sections in use."""
        out: dict[str, float] = {}
        for name in ("crossbar", "photonic", "gpu", "digital"):
            section = getattr(self, name)
            if section is not None:
                for f in dataclasses.fields(section):
                    out[f"{name}.{f.name}"] = getattr(section, f.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        from analogllm.config.schema import to_dict

        return {k: v for k, v in to_dict(self).items() if v is not None}


def _positive(section: Any, where: str, allow_zero: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        ok = math.isfinite(value) and (value >= 0 if f.name in allow_zero else value > 0)
        check(ok, f"{where}.{f.name}", f"must be {'>= 0' if f.name in allow_zero else '> 0'} and finite, got {value}")


def hardware_names() -> list[str]:
    """The built-in profiles (``analogllm/cost/hardware/*.yaml``)."""
    folder = resources.files("analogllm.cost.hardware")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """A built-in profile by name, or a YAML file; any problem is a :class:`ConfigError` naming the key."""
    path = Path(name_or_path)
    if str(name_or_path) in hardware_names():
        text = resources.files("analogllm.cost.hardware").joinpath(f"{name_or_path}.yaml").read_text()
        where = f"hardware profile {name_or_path}"
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: no such hardware profile file")
        text, where = path.read_text(), str(path)
    else:
        raise ConfigError(f"unknown hardware profile {str(name_or_path)!r}; built-in: {', '.join(hardware_names())} "
                          "(or a path to a .yaml file)")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return from_dict(HardwareProfile, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


#: built-in profile for each device kind of a map / analogue config
DEFAULT_FOR_DEVICE = {"pcm": "pcm-hermes", "rram": "rram", "photonic": "photonic"}
#: the digital baseline every report compares against
BASELINE = "gpu-h100"


def default_hardware(device_kind: str) -> str:
    if device_kind not in DEFAULT_FOR_DEVICE:
        raise ConfigError(f"no built-in cost profile for device {device_kind!r} (pcm, rram, photonic); "
                          "pass --hardware YAML")
    return DEFAULT_FOR_DEVICE[device_kind]


__all__ = [
    "BASELINE", "KINDS", "CrossbarCost", "DigitalCost", "GPUCost", "HardwareProfile", "PhotonicCost",
    "default_hardware", "hardware_names", "load_hardware",
]
