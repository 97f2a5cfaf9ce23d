"""Crossbar target: conductance pairs, level indices and scales for resistive arrays (PCM, RRAM).

Each weight is a differential pair on one row (input line) and two columns (output lines): the
normalised weight w ∈ [−1, 1] of its tile column becomes G+ = max(w, 0)·g_max and
G− = max(−w, 0)·g_max, one device of the pair left at 0 µS (analogllm.devices.conductance). The
chip reads Σ_i x_i (G+ − G−)/g_max per column and multiplies by the column's scale after its ADC.

Two representations of the same targets are written, because chips program in two ways:
conductances in µS (what a program-and-verify loop aims at; the device model's own targets) and
integer indices on a level grid of ``levels`` equally spaced conductances from 0 to g_max (what a
level-based programmer writes). For RRAM the grid is the device's own (it can only hold those
levels, so the conductances already lie on it); PCM is programmed continuously, so its indices are
the nearest level of an export grid, 256 levels unless asked otherwise (≈ 0.2 % of g_max apart).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from analogllm.chip.state import Programmed, chip_generator, compensate, realise, reference_gain
from analogllm.config import AnalogConfig
from analogllm.devices.base import Device, Realisation, Replay
from analogllm.devices.conductance import pair_target
from analogllm.devices.pcm import PCM
from analogllm.devices.rram import RRAM
from analogllm.export.manifest import DTYPE_NAMES, AnalogLayer, Deferred, MapError, column_peaks, scale_per_input, spans
from analogllm.ops.noise import seeded

NAME = "crossbar"
#: (exact, quantized) representations a verifier rebuilds the weight from
SOURCES = ("conductance", "levels")
#: level grid for devices programmed continuously (PCM): 2^8 levels of g_max
DEFAULT_LEVELS = 256
#: relative slack for float32 round-off in conductance / weight comparisons
FLOAT_SLACK = 1e-5


def level_dtype(levels: int) -> torch.dtype:
    return torch.uint8 if levels <= 256 else torch.int32


def device_record(device: Device, levels: int | None) -> dict[str, Any]:
    """The manifest's ``device`` section; rejects devices that are not crossbars."""
    if not isinstance(device, (PCM, RRAM)):
        raise ValueError(
            f"target 'crossbar' needs a crossbar device (pcm or rram); this model's device is "
            f"{device.kind!r}: convert it with a pcm or rram profile, or export with --target photonic"
        )
    if isinstance(device, RRAM):
        if levels not in (None, device.levels):
            raise ValueError(f"levels={levels}: an RRAM device holds exactly its {device.levels} levels "
                             "(device.levels); leave levels unset or change the profile")
        levels, source = device.levels, "device"
    else:
        levels = DEFAULT_LEVELS if levels is None else int(levels)
        if not 2 <= levels <= 2**24:
            raise ValueError(f"levels must be in 2..{2**24}, got {levels}")
        source = "export"
    pairs = getattr(device, "pairs", 1)
    return {
        "kind": device.kind,
        "array": "crossbar",
        "encoding": "differential pair, one device at 0 uS: G+ = max(w, 0) g_max, G- = max(-w, 0) g_max"
                    + (f"; every pair programmed {pairs} times, in parallel on the column" if pairs > 1 else ""),
        "pairs_per_weight": pairs,
        "g_max_uS": float(device.g_max),
        "levels": levels,
        "level_step_uS": float(device.g_max) / (levels - 1),
        "levels_from": source,
    }


def encode(layer: AnalogLayer, wn: torch.Tensor, scale: torch.Tensor, device: Device,
           record: dict[str, Any]) -> tuple[dict[str, torch.Tensor | Deferred], dict[str, Any]]:
    """Normalised tiles (E, T, out, rows) → the layer's arrays and its tile grid. The conductances and
    levels are :class:`Deferred` and made one tile at a time as they are written (rows = inputs, so a
    tile's transpose is a consecutive block of the (E, in, out) array): the encoding holds the tiles and
    one tile's array, never a dense copy of the layer."""
    e, t, out, rows = wn.shape
    in_features = layer.shape[-1]
    inputs = spans(in_features, rows, t)
    g_max, step, dtype = record["g_max_uS"], record["level_step_uS"], level_dtype(record["levels"])
    rram = device if isinstance(device, RRAM) else None

    def targets(side: int) -> Iterator[torch.Tensor]:  # an RRAM device writes only its levels: its targets
        for expert in range(e):
            for tile, (_, used) in enumerate(inputs):
                g = pair_target(wn[expert, tile, :, :used].transpose(0, 1), g_max, side)
                yield g if rram is None else rram.quantize_levels(g)

    def levels(side: int) -> Iterator[torch.Tensor]:
        return (g.div_(step).round_().to(dtype) for g in targets(side))

    shape = (e, in_features, out)
    cols = layer.matrix.config.tiling.cols or out
    arrays: dict[str, torch.Tensor | Deferred] = {"scale": scale}
    for name, side in (("plus", 1), ("minus", -1)):
        arrays[f"g_{name}"] = Deferred(shape, wn.dtype, lambda side=side: targets(side))
        arrays[f"level_{name}"] = Deferred(shape, dtype, lambda side=side: levels(side))
    tiles = {"rows": rows, "cols": cols, "grid": [e, t, -(-out // cols)], "inputs": inputs, "outputs": spans(out, cols)}
    return arrays, tiles


def array_specs(record: dict[str, Any], device: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """Name → (dtype, shape) of every array a crossbar layer file must hold."""
    out, in_features = record["shape"][-2:]
    e, t = record["tiles"]["grid"][:2]
    level = DTYPE_NAMES[level_dtype(device["levels"])]
    specs = {name: ("F32", [e, in_features, out]) for name in ("g_plus", "g_minus")}
    specs.update({name: (level, [e, in_features, out]) for name in ("level_plus", "level_minus")})
    specs["scale"] = ("F32", [e, t, out])
    if record.get("bias"):
        specs["bias"] = ("F32", [e, out])
    return specs


def check_values(arrays: dict[str, torch.Tensor], record: dict[str, Any], device: dict[str, Any], where: str) -> None:
    """Values within their documented ranges, and the two representations in agreement."""
    g_max, step, levels = device["g_max_uS"], device["level_step_uS"], device["levels"]
    gp, gm = arrays["g_plus"], arrays["g_minus"]
    for name in ("g_plus", "g_minus", "scale"):
        if not torch.isfinite(arrays[name]).all():
            raise MapError(f"{where}: {name} has non-finite values")
    top = g_max * (1 + FLOAT_SLACK)
    if (gp < 0).any() or (gm < 0).any() or (gp > top).any() or (gm > top).any():
        raise MapError(f"{where}: conductances outside [0, g_max = {g_max} uS]")
    if ((gp > 0) & (gm > 0)).any():
        raise MapError(f"{where}: a pair has both devices above 0 uS; the encoding keeps one of each pair at 0")
    if not (arrays["scale"] > 0).all():
        raise MapError(f"{where}: scale must be > 0")
    for g, name in ((gp, "level_plus"), (gm, "level_minus")):
        idx = arrays[name].long()
        if (idx < 0).any() or (idx > levels - 1).any():
            raise MapError(f"{where}: {name} outside 0..{levels - 1}")
        # the index is the nearest level: within half a step (plus float32 round-off of G)
        if ((g.double() - idx * step).abs() > step / 2 + g_max * FLOAT_SLACK).any():
            raise MapError(f"{where}: {name} is not the nearest level of the conductances (step {step:.6g} uS)")
        if device["levels_from"] == "device" and ((g.double() - idx * step).abs() > g_max * FLOAT_SLACK).any():
            raise MapError(f"{where}: conductances are not on the device's {levels}-level grid")


def target_weight(arrays: dict[str, torch.Tensor], record: dict[str, Any], device: dict[str, Any],
                  source: str | None = None) -> torch.Tensor:
    """(E, out, in) float64 weight the files program: from the conductances or from the level indices."""
    source = source or "conductance"
    if source == "conductance":
        wn = (arrays["g_plus"].double() - arrays["g_minus"].double()) / device["g_max_uS"]
    elif source == "levels":
        wn = (arrays["level_plus"].double() - arrays["level_minus"].double()) / (device["levels"] - 1)
    else:
        raise ValueError(f"source must be 'conductance' or 'levels' for a crossbar map, got {source!r}")
    rows, in_features = record["tiles"]["rows"], record["shape"][-1]
    return wn.transpose(-1, -2) * scale_per_input(arrays["scale"].double(), rows, in_features)


def target_bound(device: dict[str, Any]) -> float:
    """Largest |target − weight| / column scale the conductances may show: half a level step when the
    device itself is level-based (RRAM), float32 round-off otherwise."""
    half_step = 0.5 / (device["levels"] - 1) if device["levels_from"] == "device" else 0.0
    return half_step + FLOAT_SLACK


def _preimage(g: torch.Tensor, g_max: float) -> torch.Tensor:
    """A float32 x with fl(x·g_max) == g wherever one exists (else the nearest): the normalised weight
    from which the device model's own weight_to_pair recomputes exactly these conductances."""
    x = g / g_max
    for _ in range(2):
        for direction in (float("inf"), float("-inf")):
            bad = (x * g_max) != g
            if not bad.any():
                return x
            step = torch.nextafter(x, torch.full_like(x, direction))
            x = torch.where(bad & ((step * g_max) == g), step, x)
    return x


@dataclass(frozen=True, eq=False)
class CrossbarMap(Replay):
    """A crossbar programmed with a map's conductances, through the model's own device model.

    PCM and RRAM see a weight only through weight_to_pair (G± = max(±w, 0)·g_max); handing them the
    exact float32 preimage of the stored conductances makes them program precisely those targets, so
    the replayed chip instance (noise drawn from the same seed) is the exported one bit for bit. The
    normalised weight the layer hands over must be the map's own (checked): the layer derives its
    column scales from it.
    """

    physics: Device = field(default_factory=PCM)
    normalised: torch.Tensor | None = None  # (E·T, out, rows), zero-padded like the layer's tiles
    name: str = ""

    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        assert self.normalised is not None
        peak = column_peaks(self.normalised)
        if weight.shape != self.normalised.shape or (weight - self.normalised / peak).abs().max() > FLOAT_SLACK:
            raise MapError(f"layer {self.name}: the map's conductances do not match the weight being programmed")
        real = self.physics.realise(self.normalised, seconds, generator)
        if bool((peak == 1).all()):
            return real
        read = None if real.read_std is None else real.read_std / peak
        ref = None if real.reference is None else real.reference / peak
        return Realisation(weight=real.weight / peak, read_std=read, gain=real.gain, reference=ref)


def install(layer: AnalogLayer, arrays: dict[str, torch.Tensor], record: dict[str, Any],
            device: dict[str, Any], reference: torch.Tensor | None = None) -> None:
    """Program ``layer`` (of a model copy) from the map: its weight becomes the conductance target (so
    the layer's column scales are the map's), its device programs the stored conductances, and the
    layer's own programming path with the map's chip seed and time does the rest (noise, drift,
    drift compensation).
    ``reference``: the model weight a measured correction aims the chip at (default: the targets)."""
    physics = layer.matrix.config.device
    if not isinstance(physics, (PCM, RRAM)):
        raise ValueError(f"layer {layer.name}: a crossbar map needs a pcm or rram model to replay on")
    with torch.no_grad():
        w = target_weight(arrays, record, device)
        layer.weight.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))
    replay = CrossbarMap(physics=physics, normalised=tile_targets(arrays, record, device), name=layer.name)
    layer.matrix.program(layer.weight, record["seed"], record["seconds"], reference=reference, device=replay)


def tile_targets(arrays: dict[str, torch.Tensor], record: dict[str, Any], device: dict[str, Any]) -> torch.Tensor:
    """(E·T, out, rows) float32 normalised targets from which the device model's own weight_to_pair
    recomputes exactly the map's conductances, zero-padded like the layer's tiles."""
    g_max = device["g_max_uS"]
    e, t = record["tiles"]["grid"][:2]
    rows, (out, in_features) = record["tiles"]["rows"], record["shape"][-2:]
    x = _preimage(arrays["g_plus"], g_max) - _preimage(arrays["g_minus"], g_max)  # (E, in, out)
    # laid out in memory exactly like the layer's own tiles (a tile view of an (E, out, in) matrix):
    # vectorised math (drift's pow, log) may round differently on differently strided tensors
    x = F.pad(x.transpose(-1, -2).contiguous(), (0, t * rows - in_features))
    return x.reshape(e, out, t, rows).movedim(-2, -3).reshape(e * t, out, rows)


# ----- read back: the measured conductances of a programmed chip (analogllm.export.readback) -------------
#: units a measurement of a crossbar chip must declare (measurement.json ``units``)
MEASURED_UNITS = {"conductance": "uS"}
#: arrays that come in pairs: both or neither
MEASURED_PAIRS = (("g_plus_std", "g_minus_std"),)
#: a measured conductance below −NEGATIVE_LIMIT·g_max is not read noise around 0 µS but a sign error
NEGATIVE_LIMIT = 0.25
#: a measured conductance above UPPER_LIMIT·g_max is not in µS (programming noise adds a few µS at most)
UPPER_LIMIT = 2.0
SIGN_HINT = "G+ and G- swapped, or G- stored as a negative number"


def measured_specs(record: dict[str, Any], device: dict[str, Any]) -> dict[str, tuple[list[int], bool]]:
    """Name → (shape, required) of the arrays a measured crossbar layer file may hold: the map's own
    crossbar orientation (E, in, out), one value per device."""
    out, in_features = record["shape"][-2:]
    e = record["tiles"]["grid"][0]
    pair = [e, in_features, out]
    return {"g_plus": (pair, True), "g_minus": (pair, True), "g_plus_std": (pair, False),
            "g_minus_std": (pair, False), "gain": ([e], False)}


def check_measured(arrays: dict[str, torch.Tensor], map_arrays: dict[str, torch.Tensor], record: dict[str, Any],
                   device: dict[str, Any], where: str) -> None:
    """Conductances in µS and non-negative up to read noise, spreads ≥ 0, gains > 0 (finite values and
    shapes are checked by the caller). The unit checks compare with g_max and with what the map
    programs, since a file in S or nS is off by 10⁶ or 10³ and nothing else could be."""
    g_max = device["g_max_uS"]
    gp, gm = arrays["g_plus"], arrays["g_minus"]
    high = float(torch.maximum(gp.max(), gm.max())) if gp.numel() else 0.0
    low = float(torch.minimum(gp.min(), gm.min())) if gp.numel() else 0.0
    programmed = float(torch.maximum(map_arrays["g_plus"].max(), map_arrays["g_minus"].max())) if gp.numel() else 0.0
    if high > UPPER_LIMIT * g_max:
        raise MapError(f"{where}: a measured conductance is {high:.4g}, above {UPPER_LIMIT:g} x g_max = "
                       f"{UPPER_LIMIT * g_max:g} uS: conductances must be in microsiemens (uS), not nS or another unit")
    if programmed >= 0.5 * g_max and high < 0.01 * g_max:
        raise MapError(f"{where}: the largest measured conductance is {high:.4g} while the map programs up to "
                       f"{programmed:.4g} uS: conductances must be in microsiemens (uS), not siemens or mS")
    if low < -NEGATIVE_LIMIT * g_max:
        raise MapError(f"{where}: a measured conductance is {low:.4g} uS; both devices of a pair hold a conductance "
                       f">= 0 (G- is the negative device's conductance, not -G): wrong sign")
    for name in ("g_plus_std", "g_minus_std"):
        if name in arrays and (arrays[name] < 0).any():
            raise MapError(f"{where}: {name} has negative values; it is the standard deviation of one read (uS)")
    if "gain" in arrays and not (arrays["gain"] > 0).all():
        raise MapError(f"{where}: gain must be > 0 (the digital gain the chip applies after its ADCs)")


def _tiles(a: torch.Tensor, record: dict[str, Any]) -> torch.Tensor:
    """(E, in, out) in crossbar orientation → (E, T, rows, out) tiles, zero-padded like the layer's."""
    e, t = record["tiles"]["grid"][:2]
    rows, in_features = record["tiles"]["rows"], record["shape"][-1]
    return F.pad(a, (0, 0, 0, t * rows - in_features)).reshape(e, t, rows, a.shape[-1])


def _crossbar(a: torch.Tensor, record: dict[str, Any]) -> torch.Tensor:
    """(E·T, out, rows) device-model layout → (E, in, out) crossbar orientation (padding dropped)."""
    e, t = record["tiles"]["grid"][:2]
    rows, (out, in_features) = record["tiles"]["rows"], record["shape"][-2:]
    return a.reshape(e, t, out, rows).transpose(-1, -2).reshape(e, t * rows, out)[:, :in_features]


def measured_state(arrays: dict[str, torch.Tensor], map_arrays: dict[str, torch.Tensor], record: dict[str, Any],
                   device: dict[str, Any], config: AnalogConfig, seconds: float, read_noise: str,
                   where: str) -> Programmed:
    """The chip state a measured layer holds: tiles (G+ − G−)/g_max in the layer's tile layout, the map's
    tile-column scales, read noise and gain.

    read_noise: ``measured`` (the files' per-device spreads of one read), ``model`` (the device model's
    read noise at the measured conductances and the map's targets), ``auto`` (measured when given, else
    model) or ``none``. gain: the measured ``gain`` when given (the chip's own drift calibration); else,
    with drift compensation on and t > 0, the global drift compensation against the map's targets (the
    reference a chip that never read itself right after programming has); else 1.
    """
    physics = config.device
    if not isinstance(physics, (PCM, RRAM)):
        raise ValueError(f"{where}: a crossbar measurement needs a pcm or rram profile, not {physics.kind!r}")
    g_max = device["g_max_uS"]
    gp, gm = arrays["g_plus"].float(), arrays["g_minus"].float()
    e, t = record["tiles"]["grid"][:2]
    rows, out = record["tiles"]["rows"], record["shape"][-2]
    tiles = _tiles((gp - gm) / g_max, record)  # (E, T, rows, out)
    targets = _tiles((map_arrays["g_plus"] - map_arrays["g_minus"]) / g_max, record)
    peak = column_peaks(targets.transpose(-1, -2).reshape(e * t, out, rows))  # (E·T, out, 1), 1 for our maps
    if not bool((peak == 1).all()):  # a map not using each column's full range: express it in layer units
        tiles = tiles / peak.reshape(e, t, 1, out)
    std = None
    measured = "g_plus_std" in arrays
    if read_noise == "measured" and not measured:
        raise MapError(f"{where}: read_noise 'measured' needs g_plus_std and g_minus_std in the file")
    if read_noise == "measured" or (read_noise == "auto" and measured):
        std = torch.sqrt(arrays["g_plus_std"].float().square() + arrays["g_minus_std"].float().square()) / g_max
    elif read_noise in ("model", "auto"):
        std = physics.pair_read_std(gp, gm, map_arrays["g_plus"], map_arrays["g_minus"], seconds)
    read_var = None
    if std is not None:
        var = _tiles(std.square(), record)  # padded rows carry no input, so no read noise
        if not bool((peak == 1).all()):
            var = var / peak.reshape(e, t, 1, out).square()
        if config.exact_read_noise:
            read_var = var.contiguous()
        else:
            used = torch.tensor([n for _, n in record["tiles"]["inputs"]], dtype=var.dtype).clamp(min=1)
            read_var = var.sum(-2) / used.view(1, t, 1)  # mean over the rows that carry inputs
    state = Programmed(tiles=tiles.contiguous(), scale=map_arrays["scale"].float(), read_var=read_var,
                       gain=torch.ones(e))
    if "gain" in arrays:
        return compensate(config, state, arrays["gain"].float().reshape(e))
    if config.drift.compensation and physics.drifts and seconds > 0:
        now = tiles.transpose(-1, -2).reshape(e * t, out, rows)
        ref = targets.transpose(-1, -2).reshape(e * t, out, rows) / peak
        return compensate(config, state, torch.full((e,), reference_gain(config, ref.float(), now)))
    return state


def simulate_measurement(map_arrays: dict[str, torch.Tensor], record: dict[str, Any], device: dict[str, Any],
                         config: AnalogConfig, seed: int, seconds: float, reads: int | None,
                         noise: torch.Generator, **_: Any) -> dict[str, torch.Tensor]:
    """What a lab measures on chip instance ``seed`` programmed from this layer of the map, ``seconds``
    later: each device's conductance averaged over ``reads`` reads (None: noise-free, the limit of
    infinitely many), the sample spread of one read, and the chip's own drift-compensation gain.

    The chip is the one ``analogllm verify`` programs from the map (same device model, seed, draws);
    the reads use the device model's per-device read noise. Averaging N Gaussian reads is sampled
    through its sufficient statistics — mean ~ N(G, σ²/N), (N−1)s²/σ² ~ χ²(N−1) — which is exact in
    distribution and costs two draws per device instead of N.
    """
    physics = config.device
    x = tile_targets(map_arrays, record, device)
    uid = record["layer_id"]
    state = physics.pair_state(x, seconds, chip_generator(seed, uid))
    e, t = record["tiles"]["grid"][:2]
    rows = record["tiles"]["rows"]
    weight = target_weight(map_arrays, record, device).float()
    replay = CrossbarMap(physics=physics, normalised=x, name=record["name"])
    # the chip's own calibration, wherever it applies it
    gain = realise(config, weight, t, rows, seed, uid, seconds, device=replay).compensation
    arrays: dict[str, torch.Tensor] = {"gain": gain.float()}
    for side, g, std in (("plus", state.g_plus, state.read_plus), ("minus", state.g_minus, state.read_minus)):
        g, std = _crossbar(g, record), None if std is None else _crossbar(std, record)
        mean, spread = average_reads(g, std, reads, noise)
        arrays[f"g_{side}"] = mean.float().contiguous()
        if spread is not None:
            arrays[f"g_{side}_std"] = spread.float().contiguous()
    return arrays


def average_reads(value: torch.Tensor, std: torch.Tensor | None, reads: int | None,
                  noise: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, sample std) of ``reads`` Gaussian reads of ``value`` with per-read spread ``std``, sampled
    exactly from their distributions; ``reads=None`` gives (value, std), the noise-free limit. The
    sample std needs two reads (None for one)."""
    if std is None or reads is None:
        return value, std
    mean = value + std / math.sqrt(reads) * torch.randn(value.shape, generator=noise, dtype=value.dtype)
    if reads < 2:
        return mean, None
    # (N − 1)s²/σ² ~ χ²(N − 1) = 2·Gamma((N − 1)/2); torch's gamma sampler takes no generator, so it
    # draws from the global stream seeded from this layer's generator (and restored afterwards)
    with seeded(int(torch.randint(0, 2**62, (1,), generator=noise))):
        chi2 = 2 * torch.distributions.Gamma(torch.full(value.shape, (reads - 1) / 2, dtype=value.dtype), 1.0).sample()
    return mean, std * torch.sqrt(chi2 / (reads - 1))
