"""AnalogConfig: everything that decides how a matmul behaves on the chip, as frozen dataclasses.

The fields follow the data path of one analogue matmul (see ``docs/`` and the design notes):

    x ─DAC─► tiles ─► y_t = x_t · W_t(device) ─► + noise ─► nonlinearity ─► ADC ─► Σ_t ─► × scale + bias

``device`` says what W_t(device) is (ideal, pcm, rram, photonic), ``training`` what the in-silico
training noise is (``model.train()``), and ``include``/``exclude`` which modules go analogue. Profiles
in ``configs/*.yaml`` are complete configs loaded by name; any field can be overridden.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from analogllm.devices.base import Device, device_from_dict, device_names
from analogllm.devices.ideal import Ideal
from analogllm.config.schema import ConfigError, check, from_dict, replace_path, to_dict


@dataclass(frozen=True)
class DACConfig:
    """Input digital-to-analogue converter.

    bits:  resolution; ``None`` means an ideal (unquantised) input. 8 bits = 255 signed levels, the
           setting of IBM's HWA presets and Analog Foundation Models.
    range: how the input range r is chosen (inputs are clipped to ±r, then quantised):
           ``dynamic`` per token abs-max (no clipping, needs a per-token digital scale),
           ``learned`` one trainable scalar per layer, initialised from the first batch it sees,
           ``static`` a fixed ``init_range``.
    init_range: the range for ``static`` (and the start value for ``learned`` when given).
    inl:   integral nonlinearity, in LSB: the level of code u (normalised, on [−1, 1]) is
           u + inl·LSB·(3√3/2)·u(1 − u²), a smooth odd bow that is 0 at 0 and at both ends of the range
           (INL measured against the end-point line) and peaks at ±inl LSB at |u| = 1/√3. It acts on the
           quantised codes, so it needs ``bits``; 0 = a linear DAC.
    """

    bits: int | None = 8
    range: Literal["dynamic", "learned", "static"] = "learned"
    init_range: float | None = None
    inl: float = 0.0

    def __post_init__(self) -> None:
        check(self.bits is None or 1 <= self.bits <= 24, "dac.bits", f"must be in 1..24 or null, got {self.bits}")
        check(self.init_range is None or self.init_range > 0, "dac.init_range", "must be > 0")
        check(self.range != "static" or self.init_range is not None, "dac.init_range", "is required for range: static")
        check(self.inl == 0 or self.bits is not None, "dac.inl", "needs a quantising DAC (dac.bits), its unit is the LSB")
        if self.inl and self.bits is not None:
            # the bow must keep the transfer monotone: |d/du| of the error < 1 everywhere
            limit = 1.0 / (3 * math.sqrt(3) * self.step)
            check(abs(self.inl) < limit, "dac.inl", f"|inl| must be < {limit:.3g} LSB at {self.bits} bits (monotone DAC)")

    @property
    def step(self) -> float:
        """The normalised LSB, 1 / (2^(bits−1) − 1) (the signed DAC's step on [−1, 1]); 0 without bits."""
        return 1.0 / (2 ** (self.bits - 1) - 1) if self.bits else 0.0

    @property
    def inl_coefficient(self) -> float:
        """k of the level error k·u(1 − u²): ``inl`` LSB at the bow's peak, |u| = 1/√3."""
        return self.inl * self.step * 1.5 * math.sqrt(3.0)


@dataclass(frozen=True)
class ADCConfig:
    """Output analogue-to-digital converter, one per tile column (a per-tile ADC).

    bits:  resolution; ``None`` = ideal readout. Levels are 2·bound/(2^bits − 2) apart (254 steps for 8
           bits, as in aihwkit), so at most 2^bits − 1 distinct codes.
    bound: saturation level in normalised output units (inputs scaled to ±1, weights to ±1 per column);
           aihwkit uses 10–14 for its HWA presets.
    gain_std / offset_std: the static errors of every column's ADC, drawn once per chip instance when it
           is programmed (a chip's ADCs are part of the chip): the ADC converts g·y + o·LSB instead of y,
           g = 1 + gain_std·z, o = offset_std·z' (offset in LSB of the ADC's own range), z, z' ~ N(0, 1)
           per tile column. They act before the rounding and the saturation, as the converter's own
           errors do; 0 = ideal ADCs.
    """

    bits: int | None = 8
    bound: float = 12.0
    gain_std: float = 0.0
    offset_std: float = 0.0

    def __post_init__(self) -> None:
        check(self.bits is None or 2 <= self.bits <= 24, "adc.bits", f"must be in 2..24 or null, got {self.bits}")
        check(self.bound > 0, "adc.bound", f"must be > 0, got {self.bound}")
        for name in ("gain_std", "offset_std"):
            value = getattr(self, name)
            check(value >= 0, f"adc.{name}", f"must be >= 0, got {value}")
            check(value == 0 or self.bits is not None, f"adc.{name}", "is an ADC error: needs an ADC (adc.bits)")

    @property
    def has_errors(self) -> bool:
        return self.bits is not None and (self.gain_std > 0 or self.offset_std > 0)


@dataclass(frozen=True)
class OutputConfig:
    """Analogue output stage before the ADC.

    noise: additive Gaussian std per read in normalised output units (aihwkit out_noise 0.04–0.06).
    nonlinearity: ``none`` or ``tanh``, a saturating I–V / sense-amplifier response
                  y ↦ s·tanh(y/s) with s = ``saturation`` (normalised units).
    """

    noise: float = 0.0
    nonlinearity: Literal["none", "tanh"] = "none"
    saturation: float = 12.0

    def __post_init__(self) -> None:
        check(self.noise >= 0, "output.noise", f"must be >= 0, got {self.noise}")
        check(self.saturation > 0, "output.saturation", f"must be > 0, got {self.saturation}")


@dataclass(frozen=True)
class TilingConfig:
    """Fixed-size arrays. ``rows`` inputs per array: a layer's inputs are split evenly over
    ceil(in / rows) input tiles, each with its own ADCs and scale per column; ``cols`` outputs per array
    (only changes the export layout: columns are independent). ``None`` = one array as large as the
    matrix."""

    rows: int | None = None
    cols: int | None = None

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"tiling.{name}", f"must be >= 1 or null, got {v}")


@dataclass(frozen=True)
class IRDropConfig:
    """Resistance of the crossbar's column wires (IR drop), first order as aihwkit's ``ir_drop``.

    wire_resistance: Ω of the wire between two adjacent cells of a column (0 = off). With the device's
    g_max it gives the dimensionless ρ = R·g_max per cell; a read then attenuates every device's
    contribution by the voltage its column wire has risen to at its row (see
    :func:`analogllm.ops.read.ir_drop_attenuation` for what is and is not modelled). Crossbar devices
    only (the photonic mesh has no column wires).
    """

    wire_resistance: float = 0.0

    def __post_init__(self) -> None:
        check(self.wire_resistance >= 0, "ir_drop.wire_resistance", f"must be >= 0 Ω, got {self.wire_resistance}")


@dataclass(frozen=True)
class DriftConfig:
    """Drift compensation: one scalar α per layer, from a fixed calibration input read at t and right
    after programming (aihwkit GlobalDriftCompensation).

    compensation_at: where the chip applies α. ``digital``: the ADC's outputs are multiplied by α (aihwkit),
                     so the arrays' outputs reach the output stage and the ADC shrunk by the drift, and the
                     converter ranges chosen at programming grow too wide relative to them as the chip ages.
                     ``pulse``: every input pulse is α× longer (a chip that applies inputs as pulse
                     durations, as IBM HERMES does), so the arrays' outputs (read noise included) reach the
                     output stage and the ADC at their t = 0 size and the ranges stay right; the output
                     noise and the ADC steps are not scaled. Costs α× longer reads (about 1.5× at 1 day,
                     2× at 1 year on PCM).
    """

    compensation: bool = True
    calibration_vectors: int = 64
    compensation_at: Literal["digital", "pulse"] = "digital"

    def __post_init__(self) -> None:
        check(self.calibration_vectors >= 1, "drift.calibration_vectors", "must be >= 1")


@dataclass(frozen=True)
class TrainingConfig:
    """Noise of hardware-aware training (mode ``hwa``), not of the deployed chip.

    noise:        ``gaussian``: weight noise of std ``weight_noise`` × each tile column's abs-max (0.03 in
                  Analog Foundation Models) and output noise ``output_noise``; ``device``: the deployed
                  chip's own statistics, from its device model at a deployment time sampled per step from
                  ``drift_times`` (programming noise, drift with its spread and the error left by global
                  drift compensation, read noise) and the profile's output noise. Both are sampled exactly
                  in output space.
    drift_times:  deployment times (seconds after programming) that ``device`` noise is drawn at, one per
                  training step uniformly among them (empty: t = 0).
    clip_sigma:   clip each output channel's weights to ±clip_sigma·std (2.5 in AFM); ``None`` = off.
    quantize:     apply the DAC/ADC (with straight-through gradients) while training.
    learn_adc:    train the ADC ranges too (their own straight-through gradient, with the DAC ranges' rate).
    """

    noise: Literal["gaussian", "device"] = "gaussian"
    weight_noise: float = 0.0
    output_noise: float = 0.0
    drift_times: tuple[float, ...] = ()
    clip_sigma: float | None = None
    quantize: bool = True
    learn_adc: bool = False

    def __post_init__(self) -> None:
        check(self.weight_noise >= 0, "training.weight_noise", f"must be >= 0, got {self.weight_noise}")
        check(self.output_noise >= 0, "training.output_noise", f"must be >= 0, got {self.output_noise}")
        check(self.clip_sigma is None or self.clip_sigma > 0, "training.clip_sigma", "must be > 0 or null")
        check(all(t >= 0 for t in self.drift_times), "training.drift_times", "must be >= 0 seconds")


@dataclass(frozen=True)
class MappingConfig:
    """How :func:`analogllm.mapping.map_` maps a model onto static converters when ``analogize_`` is given
    calibration text (each step switchable; see :mod:`analogllm.mapping`).

    rotate:          rotate the residual stream and value heads, folded into the weights (exact; pre-norm
                     RMSNorm transformers, skipped with a note for other families).
    rescale:         per-input-channel rescaling, α chosen per input group by the expected chip error.
    alphas:          the SmoothQuant exponents tried (no rescaling is always a candidate too).
    online_rotation: regular expressions of layers that get an online Hadamard transform in front of the
                     DAC (default: the layers whose input a nonlinearity produces).
    clip:            clip every tile column's weights at the fraction of its abs-max (of ``clip_fractions``,
                     1 = none always a candidate) that minimises the expected error under the device's
                     programming/read noise and drift (:mod:`analogllm.mapping.clip`). Lossy in exact
                     arithmetic, the identity on the ideal profile; the converter ranges are calibrated
                     again after it.
    clip_fractions:  the bounds tried, as fractions of the column's abs-max.
    ranges:          DAC ranges: ``error`` (minimise the expected error), ``std`` (``std_alpha`` σ), ``max``
                     (no clipping) or ``none`` (keep the config's initialisation).
    dac_headroom:    ``error`` DAC ranges × this factor, the ADC ranges kept as chosen for the unwidened
                     range, so every output reaches its ADC this much below the range the error model
                     would give it. The first-order error model underprices outputs that saturate the
                     ADCs (a few massive-activation tokens, whose errors propagate through the model);
                     measured on SmolLM2 and pcm in docs/mapping.md. Pair it with
                     ``drift.compensation_at: pulse``, or drift shrinks the outputs further and the
                     headroom grows too large after a day.
    adc:             ADC ranges calibrated per ``tile`` (each array's ADCs), per ``layer``, or ``none``
                     (the profile's full scale ``adc.bound``).
    compensate:      program the chip in closed loop: each block of input rows aimed at the measured
                     programming error of the rows before it, weighted by the calibration inputs' second
                     moment (:mod:`analogllm.chip.compensate`; devices with a programming model: pcm, rram).
    compensate_rank: rank of the stored input moment (plus its diagonal) that closed-loop programming uses.
    verify_reads:    reads averaged by each verify of closed-loop programming, each with the device's own read
                     noise (1: the conservative choice, since averaging barely lowers 1/f noise).
    correction_rank: rank k of the measured correction (:mod:`analogllm.chip.correct`; 0 = off): each time
                     the chip is programmed or brought to a new age it reads every device, and a rank-k
                     digital path after the ADCs cancels the weight error it finds along the layer's input
                     moment (drift with its per-device spread, what closed-loop programming left). Costs
                     k·(in + out) digital MACs per token and matrix.
    correction_reads: reads of every device averaged for the correction (1: 1/f noise barely averages).
    tokens:          calibration input rows kept per layer for the error model.
    seconds:         deployment time at which the device statistics of the error model are taken.
    seed:            seed of the random rotations and of the calibration sample.
    """

    rotate: bool = True
    rescale: bool = True
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    online_rotation: tuple[str, ...] = (r"mlp\.down_proj$", r"shared_expert\.down_proj$", r"mlp\.c_proj$",
                                        r"feed_forward\.w2$", r"feed_forward\.value$", r"mixer\.out_proj$")
    clip: bool = True
    clip_fractions: tuple[float, ...] = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4)
    compensate: bool = True
    compensate_rank: int = 64
    verify_reads: int = 1
    correction_rank: int = 0
    correction_reads: int = 1
    ranges: Literal["error", "std", "max", "none"] = "error"
    dac_headroom: float = 1.0
    adc: Literal["tile", "layer", "none"] = "tile"
    std_alpha: float = 12.0
    tokens: int = 768
    seconds: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check(all(0.0 <= a <= 1.0 for a in self.alphas), "mapping.alphas", "must lie in [0, 1]")
        check(self.verify_reads >= 1, "mapping.verify_reads", f"must be >= 1, got {self.verify_reads}")
        check(self.compensate_rank >= 1, "mapping.compensate_rank", f"must be >= 1, got {self.compensate_rank}")
        check(self.correction_rank >= 0, "mapping.correction_rank",
              f"must be >= 0 (0 = off), got {self.correction_rank}")
        check(self.correction_reads >= 1, "mapping.correction_reads", f"must be >= 1, got {self.correction_reads}")
        for pattern in self.online_rotation:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"mapping.online_rotation: {pattern!r} is not a valid regular expression ({exc})") from None
        check(all(0.0 < f <= 1.0 for f in self.clip_fractions), "mapping.clip_fractions",
              f"must lie in (0, 1] (fractions of a column's abs-max), got {list(self.clip_fractions)}")
        check(self.std_alpha > 0, "mapping.std_alpha", f"must be > 0, got {self.std_alpha}")
        check(self.dac_headroom > 0, "mapping.dac_headroom", f"must be > 0, got {self.dac_headroom}")
        check(self.tokens >= 8, "mapping.tokens", f"must be >= 8, got {self.tokens}")
        check(self.seconds >= 0, "mapping.seconds", f"must be >= 0, got {self.seconds}")


@dataclass(frozen=True)
class AnalogConfig:
    """The complete description of how a model's matmuls run on an analogue chip.

    include / exclude: regular expressions matched (``re.search``) against module names; a module is
    analogue when it matches ``include`` (empty = everything) and no ``exclude``. The LM head
    (``lm_head``; RWKV's ``head``) stays digital by default, like embeddings and norms, following
    Analog Foundation Models.

    kv_prefix: token ids whose keys and values the host computes digitally and serves as the start of
    every sequence's KV cache (:mod:`analogllm.hf.prefix`): the attention sink, and the massive
    activations it carries, stay off the chip. Empty (the default) = none; attention transformers only.
    ``"bos"`` = the model's BOS token, resolved by ``analogize_`` to its id, or to none with a note where
    the model names no BOS token or keeps no key/value cache in every layer (so a profile or recipe for
    every family can carry it; explicit ids are refused there instead).
    """

    device: Device = field(default_factory=Ideal)
    dac: DACConfig = field(default_factory=DACConfig)
    adc: ADCConfig = field(default_factory=ADCConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    ir_drop: IRDropConfig = field(default_factory=IRDropConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head", "^head$")
    analog_attention: bool = False
    exact_read_noise: bool = False
    kv_prefix: tuple[int, ...] | Literal["bos"] = ()
    seed: int = 0
    name: str = "custom"

    def __post_init__(self) -> None:
        for key in ("include", "exclude"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({exc})") from None
        check(isinstance(self.device, Device), "device", "must be a device (see `analogllm profiles`)")
        check(self.ir_drop.wire_resistance == 0 or getattr(self.device, "g_max", None) is not None,
              "ir_drop.wire_resistance", f"needs a crossbar device with a g_max (pcm, rram); a {self.device.kind} "
              "device has no column wires")
        check(self.kv_prefix == "bos" or (not isinstance(self.kv_prefix, str)
                                          and all(isinstance(t, int) and t >= 0 for t in self.kv_prefix)),
              "kv_prefix", "must be a list of token ids (integers >= 0) or 'bos' (the model's BOS token)")

    # ----- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, name: str, **overrides: Any) -> AnalogConfig:
        """Load the named profile from ``configs/`` and apply dotted overrides, e.g.
        ``AnalogConfig.from_profile("pcm", **{"adc.bits": 6})``."""
        config = cls.from_dict(_read_profile(name))
        for key, value in overrides.items():
            config = config.set(key, value)
        return config

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalogConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"analog config: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        device = device_from_dict(data.pop("device", {"kind": "ideal"}))
        return from_dict(cls, {**data, "device": device})  # validated with its device (IR drop needs a g_max)

    @classmethod
    def load(cls, path: str | Path) -> AnalogConfig:
        """Read a config from a ``.json`` or ``.yaml`` file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        return cls.from_dict(_parse(path, path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        data = to_dict(self)
        data["device"] = self.device.to_dict()
        return data

    def set(self, dotted: str, value: Any) -> AnalogConfig:
        """Copy with one dotted field replaced (validated), e.g. ``cfg.set("device.g_max", 20.0)``."""
        if dotted == "device" or dotted.startswith("device."):
            if dotted == "device":
                return replace(self, device=device_from_dict(value))
            return replace(self, device=replace_path(self.device, dotted[len("device.") :], value, "device"))
        return replace_path(self, dotted, value)

    # ----- queries -----------------------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        """True when the analogue path is mathematically a plain matmul (the ideal profile)."""
        return (
            self.device.is_ideal
            and self.dac.bits is None
            and self.adc.bits is None
            and self.output.noise == 0
            and self.output.nonlinearity == "none"
            and self.tiling.rows is None
            and self.ir_drop.wire_resistance == 0
            and self.training.weight_noise == 0
            and self.training.output_noise == 0
            and self.training.clip_sigma is None
        )

    @property
    def ir_drop_rho(self) -> float:
        """ρ = R_wire · g_max of one cell (dimensionless), 0 when IR drop is off."""
        if self.ir_drop.wire_resistance == 0:
            return 0.0
        return self.ir_drop.wire_resistance * float(self.device.g_max) * 1e-6  # g_max in µS

    def selects(self, module_name: str) -> bool:
        """Whether the module called ``module_name`` goes analogue under include/exclude."""
        if self.include and not any(re.search(p, module_name) for p in self.include):
            return False
        return not any(re.search(p, module_name) for p in self.exclude)


def profile_names() -> list[str]:
    """Names of the built-in device profiles (``configs/*.yaml``)."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("analogllm.profiles").iterdir() if p.name.endswith(".yaml"))


def profile_sources(name: str) -> dict[str, str]:
    """The ``sources:`` block of a built-in profile: key → citation. A key names one or more
    parameters by dotted prefix, several joined by "/" (``"dac/adc"``); ``all`` covers every one."""
    names = profile_names()
    if name not in names:
        raise ConfigError(f"unknown profile {name!r}; built-in profiles: {', '.join(names)}")
    data = yaml.safe_load(resources.files("analogllm.profiles").joinpath(f"{name}.yaml").read_text())
    return {str(k): str(v) for k, v in (data.get("sources") or {}).items()}


def source_of(parameter: str, sources: dict[str, str]) -> str | None:
    """The citation covering ``parameter`` (e.g. ``"adc.bits"``): the most specific key whose prefix is
    the parameter or one of its parents, else ``all``, else None."""
    best: tuple[int, str] | None = None
    for key, text in sources.items():
        for prefix in key.split("/"):
            prefix = prefix.strip()
            if parameter == prefix or parameter.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), text)
    if best is not None:
        return best[1]
    return sources.get("all")


def profile_parameters(name: str) -> list[tuple[str, Any, str | None]]:
    """(dotted parameter, value, source or None) for every parameter of built-in profile ``name``."""
    sources = profile_sources(name)
    rows: list[tuple[str, Any, str | None]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            rows.append((prefix, value, source_of(prefix, sources)))

    walk("", AnalogConfig.from_profile(name).to_dict())
    return rows


def _parse(path: Path, text: str) -> Any:
    """A profile or config file's contents; malformed JSON/YAML is a ConfigError naming the file."""
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None


def _read_profile(name: str) -> dict[str, Any]:
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        data = _parse(path, path.read_text())
    else:
        names = profile_names()
        if name not in names:
            raise ConfigError(
                f"unknown profile {name!r}; built-in profiles: {', '.join(names)} (or a path to a .yaml file)"
            )
        data = yaml.safe_load(resources.files("analogllm.profiles").joinpath(f"{name}.yaml").read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"profile {name!r}: expected a mapping at the top level")
    data.pop("sources", None)  # citations for the humans reading the YAML
    data.setdefault("name", path.stem if path.suffix else name)
    return data


__all__ = [
    "ADCConfig", "AnalogConfig", "DACConfig", "DriftConfig", "IRDropConfig", "MappingConfig", "OutputConfig",
    "TilingConfig",
    "TrainingConfig", "device_names", "profile_names", "profile_parameters", "profile_sources", "source_of",
]
