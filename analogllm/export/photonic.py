"""Photonic target: MZI phases, phase DAC codes, attenuators and gains for Clements-mesh processors.

Every k×k block of a layer's normalised tile (k = ``device.mesh_size``) is realised as
W_block = g · Re(U diag(σ) V†): an input-side mesh for V†, a column of attenuators σ ∈ [0, 1], an
output-side mesh for U, each mesh a rectangular Clements mesh with an output phase screen
(analogllm.devices.mesh holds the convention, decomposition and composition), and g = σ_max an
electronic gain because a passive mesh cannot amplify.

Written per mesh: θ and φ of every MZI and the output phases (float64 radians, exact), their phase
DAC codes (the integers the chip's DACs are set to), σ and g. The exact phases let a reader rebuild the
weight to 1e-12 and see what the DAC resolution costs; the codes are what a chip is programmed with.
Layout, ranges and periodicity are in docs/export-format.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from analogllm.chip.state import Programmed, chip_generator
from analogllm.config import AnalogConfig
from analogllm.devices import mesh
from analogllm.devices.base import Device, Realisation, Replay
from analogllm.devices.photonic import Photonic
from analogllm.export.manifest import DTYPE_NAMES, AnalogLayer, MapError, column_peaks, spans

NAME = "photonic"
#: (exact, quantized) representations a verifier rebuilds the weight from
SOURCES = ("phases", "codes")
MESHES = ("u", "v")
PHASES = ("theta", "phi", "out_phase")
#: largest |target − weight| / column scale when the map is rebuilt from its exact phases (float64
#: mesh arithmetic; the model's float32 weights are the limit)
EXACT_BOUND = 1e-6


def code_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


def device_record(device: Device, levels: int | None) -> dict[str, Any]:
    """The manifest's ``device`` section, with the mesh topology; rejects non-photonic devices."""
    if not isinstance(device, Photonic):
        raise ValueError(
            f"target 'photonic' needs a photonic device; this model's device is {device.kind!r}: convert it "
            "with the photonic profile, or export with --target crossbar"
        )
    if levels is not None:
        raise ValueError("levels applies to crossbar maps only; a photonic map's resolution is device.phase_bits")
    k, bits = device.mesh_size, device.phase_bits
    column, top_mode = mesh.mesh_layout(k)
    record: dict[str, Any] = {
        "kind": device.kind,
        "array": "mesh",
        "mesh_size": k,
        "mzis_per_mesh": mesh.num_mzis(k),
        "topology": {"name": "clements-rectangular", "columns": k,
                     "mzi_column": column.tolist(), "mzi_top_mode": top_mode.tolist()},
        "mzi_transfer": "[[exp(i phi) cos(theta), -sin(theta)], [exp(i phi) sin(theta), cos(theta)]] on modes (m, m+1)",
        "phase_bits": bits,
        "theta": {"unit": "rad", "range": [0.0, math.pi / 2], "periodic": False},
        "phi": {"unit": "rad", "range": [0.0, 2 * math.pi], "periodic": True},
        "out_phase": {"unit": "rad", "range": [0.0, 2 * math.pi], "periodic": True},
        "phase_noise_rad": device.phase_noise,
        "crosstalk": device.crosstalk,
        "loss_db_per_mzi": device.loss_db_per_mzi,
        "balanced_edges": device.balanced_edges,
        "mode_loss_db": list(device.mode_loss_db),
        "mode_loss_std_db": device.mode_loss_std_db,
        "loss_compensation": device.loss_compensation,
        "detection": "coherent: the real quadrature of the output field",
    }
    if bits is not None:
        record["theta"]["code_step"] = (math.pi / 2) / (2**bits - 1)
        record["phi"]["code_step"] = record["out_phase"]["code_step"] = 2 * math.pi / 2**bits
    return record


def _grid(record: dict[str, Any]) -> tuple[int, int, int, int]:
    e, t, bo, bi = record["tiles"]["grid"]
    return e, t, bo, bi


def encode(layer: AnalogLayer, wn: torch.Tensor, scale: torch.Tensor, device: Device,
           record: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Normalised tiles (E, T, out, rows) → mesh phases, codes, attenuators, gains and the mesh grid.

    The blocks are cut and decomposed exactly as the device model does it (Photonic.blocks, then
    mesh.decompose_matrix on float64), so the phases are those of the model's own chip.
    """
    assert isinstance(device, Photonic)
    e, t, out, rows = wn.shape
    k = device.mesh_size
    blocks, (bo, bi, _) = device.blocks(wn.reshape(e * t, out, rows).double())
    tile = mesh.decompose_matrix(blocks)
    grid = (e, t, bo, bi)
    arrays: dict[str, torch.Tensor] = {"scale": scale}
    bits = device.phase_bits
    for side, phases in (("u", tile.u), ("v", tile.v)):
        codes = mesh.quantize_phases(phases, bits)[1] if bits is not None else None
        for p in PHASES:
            value = getattr(phases, p)
            arrays[f"{side}_{p}"] = value.reshape(*grid, value.shape[-1])
            if codes is not None:
                arrays[f"{side}_{p}_code"] = getattr(codes, p).reshape(*grid, value.shape[-1]).to(code_dtype(bits))
    arrays["sigma"] = tile.sigma.reshape(*grid, k)
    arrays["mesh_gain"] = tile.gain.reshape(grid)
    in_features = layer.shape[-1]
    inputs = [[[ti * rows + j * k, max(0, min(k, min(rows, in_features - ti * rows) - j * k))] for j in range(bi)]
              for ti in range(t)]
    tiles = {"rows": rows, "mesh_size": k, "grid": list(grid), "inputs": inputs, "outputs": spans(out, k, bo)}
    return arrays, tiles


def array_specs(record: dict[str, Any], device: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """Name → (dtype, shape) of every array a photonic layer file must hold."""
    grid = list(_grid(record))
    k, m, bits = device["mesh_size"], device["mzis_per_mesh"], device["phase_bits"]
    out = record["shape"][-2]
    specs: dict[str, tuple[str, list[int]]] = {"scale": ("F32", [grid[0], grid[1], out])}
    for side in MESHES:
        for p in PHASES:
            n = k if p == "out_phase" else m
            specs[f"{side}_{p}"] = ("F64", [*grid, n])
            if bits is not None:
                specs[f"{side}_{p}_code"] = (DTYPE_NAMES[code_dtype(bits)], [*grid, n])
    specs["sigma"] = ("F64", [*grid, k])
    specs["mesh_gain"] = ("F64", grid)
    if record.get("bias"):
        specs["bias"] = ("F32", [grid[0], out])
    return specs


def _phases(arrays: dict[str, torch.Tensor], side: str, k: int, codes: bool, bits: int | None) -> mesh.MeshPhases:
    def flat(name: str) -> torch.Tensor:
        a = arrays[name]
        return a.reshape(-1, a.shape[-1])

    if codes and bits is not None:
        return mesh.dequantize_codes(mesh.PhaseCodes(
            theta=flat(f"{side}_theta_code"), phi=flat(f"{side}_phi_code"),
            out_phase=flat(f"{side}_out_phase_code"), bits=bits))
    return mesh.MeshPhases(theta=flat(f"{side}_theta"), phi=flat(f"{side}_phi"),
                           out_phase=flat(f"{side}_out_phase"), n=k)


def mesh_tiles(arrays: dict[str, torch.Tensor], device: dict[str, Any], codes: bool) -> mesh.MeshTile:
    """The layer's meshes as a batch in the device model's block order (expert, tile, out block, in block)."""
    k, bits = device["mesh_size"], device["phase_bits"]
    return mesh.MeshTile(
        u=_phases(arrays, "u", k, codes, bits), v=_phases(arrays, "v", k, codes, bits),
        sigma=arrays["sigma"].reshape(-1, k), gain=arrays["mesh_gain"].reshape(-1),
    )


def check_values(arrays: dict[str, torch.Tensor], record: dict[str, Any], device: dict[str, Any], where: str) -> None:
    """Phases within their intervals, attenuators passive, codes equal to the quantized phases."""
    for name, a in arrays.items():
        if a.is_floating_point() and not torch.isfinite(a).all():
            raise MapError(f"{where}: {name} has non-finite values")
    two_pi = 2 * math.pi
    for side in MESHES:
        theta = arrays[f"{side}_theta"]
        if (theta < 0).any() or (theta > math.pi / 2).any():
            raise MapError(f"{where}: {side}_theta outside [0, pi/2] (theta is not periodic)")
        for p in ("phi", "out_phase"):
            a = arrays[f"{side}_{p}"]
            if (a < 0).any() or (a >= two_pi).any():
                raise MapError(f"{where}: {side}_{p} outside [0, 2 pi)")
    sigma = arrays["sigma"]
    if (sigma < 0).any() or (sigma > 1 + 1e-9).any():
        raise MapError(f"{where}: sigma outside [0, 1] (a passive attenuator cannot amplify)")
    if (arrays["mesh_gain"] < 0).any() or not (arrays["scale"] > 0).all():
        raise MapError(f"{where}: mesh_gain must be >= 0 and scale > 0")
    bits = device["phase_bits"]
    if bits is None:
        return
    for side in MESHES:
        _, expected = mesh.quantize_phases(_phases(arrays, side, device["mesh_size"], False, None), bits)
        for p in PHASES:
            stored = arrays[f"{side}_{p}_code"].reshape(-1, arrays[f"{side}_{p}_code"].shape[-1]).to(torch.int32)
            if not torch.equal(stored, getattr(expected, p)):
                raise MapError(f"{where}: {side}_{p}_code are not the {bits}-bit codes of {side}_{p}")


def _compose_weight(tile: mesh.MeshTile, arrays: dict[str, torch.Tensor], record: dict[str, Any],
                    device: dict[str, Any], **noise: Any) -> torch.Tensor:
    """Composed meshes → normalised tiles (E·T, out, rows) float64 (before the column scales)."""
    e, t, bo, bi = _grid(record)
    out, rows = record["shape"][-2], record["tiles"]["rows"]
    blocks = mesh.compose_matrix(tile, **noise).double()
    return Photonic(mesh_size=device["mesh_size"]).unblocks(blocks, (bo, bi, e * t), out, rows)


def target_weight(arrays: dict[str, torch.Tensor], record: dict[str, Any], device: dict[str, Any],
                  source: str | None = None) -> torch.Tensor:
    """(E, out, in) float64 weight the files program: composed from the codes or from the exact phases."""
    source = source or ("codes" if device["phase_bits"] is not None else "phases")
    if source not in ("codes", "phases"):
        raise ValueError(f"source must be 'codes' or 'phases' for a photonic map, got {source!r}")
    if source == "codes" and device["phase_bits"] is None:
        raise ValueError("this photonic map has continuous phases (phase_bits null) and no codes")
    e, t, _, _ = _grid(record)
    out, in_features = record["shape"][-2:]
    wn = _compose_weight(mesh_tiles(arrays, device, source == "codes"), arrays, record, device)
    w = wn.reshape(e, t, out, -1) * arrays["scale"].double()[..., None]
    return w.movedim(1, 2).reshape(e, out, -1)[..., :in_features]


def target_bound(device: dict[str, Any]) -> float:
    """Largest |target − weight| / column scale allowed for the map rebuilt from its exact phases."""
    return EXACT_BOUND


@dataclass(frozen=True, eq=False)
class MeshMap(Replay):
    """A photonic chip whose meshes are set from a map rather than decomposed from the weight.

    It realises what :class:`Photonic` realises (through :meth:`Photonic.realise_tiles`: same
    crosstalk, phase noise drawn in the same order, same losses and loss compensation) but from the
    map's phase codes, so verify programs a chip instance from the files through the device model. The
    normalised weight it is handed must be the map's own (checked), since the layer derives its column
    scales from that weight.
    """

    physics: Photonic = Photonic()
    programmed: mesh.MeshTile | None = None
    exact: mesh.MeshTile | None = None
    layout: tuple[tuple[int, int, int], int, int] = ((1, 1, 1), 1, 1)
    name: str = ""

    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        assert self.programmed is not None and self.exact is not None
        shape, out, rows = self.layout
        lossless = self.physics.unblocks(mesh.compose_matrix(self.exact).double(), shape, out, rows)
        peak = column_peaks(lossless)
        if tuple(weight.shape) != tuple(lossless.shape) or (lossless / peak - weight.double()).abs().max() > 1e-5:
            raise MapError(f"layer {self.name}: the map's phases do not compose to the weight being programmed")
        # the codes are already quantised; the physics adds crosstalk, noise, loss and its compensation
        realised, gain = self.physics.realise_tiles(
            self.exact, self.programmed, None, shape, out, rows, generator,
            peak=None if bool((peak == 1).all()) else peak,  # (untouched otherwise: bit-exact replay)
        )
        return Realisation(weight=realised.to(weight.dtype), gain=gain)


def install(layer: AnalogLayer, arrays: dict[str, torch.Tensor], record: dict[str, Any],
            device: dict[str, Any], reference: torch.Tensor | None = None) -> None:
    """Program ``layer`` (of a model copy) from the map: weight = the exact-phase target (so the layer's
    column scales are the map's), meshes = the stored codes, then the layer's own programming path
    with the map's chip seed draws the same phase noise the exported chip has.
    ``reference``: the model weight a measured correction aims the chip at (default: the targets)."""
    physics = layer.matrix.config.device
    if not isinstance(physics, Photonic):
        raise ValueError(f"layer {layer.name}: a photonic map needs a photonic model to replay on")
    with torch.no_grad():
        w = target_weight(arrays, record, device, "phases")
        layer.weight.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))
    e, t, bo, bi = _grid(record)
    replay = MeshMap(
        physics=physics,
        programmed=mesh_tiles(arrays, device, codes=device["phase_bits"] is not None),
        exact=mesh_tiles(arrays, device, codes=False),
        layout=((bo, bi, e * t), record["shape"][-2], record["tiles"]["rows"]),
        name=layer.name,
    )
    layer.matrix.program(layer.weight, record["seed"], record["seconds"], reference=reference, device=replay)


# ----- read back: the measured phases and transmissions of a programmed chip (analogllm.export.readback) ---
#: units a measurement of a photonic chip must declare (measurement.json ``units``)
MEASURED_UNITS = {"phase": "rad"}
#: arrays that come in pairs: both or neither
MEASURED_PAIRS = (("u_mode_loss_db", "v_mode_loss_db"),)
#: how far a measured θ may lie outside [0, π/2] (phase errors) before it cannot be radians
THETA_SLACK = math.pi / 4
#: |φ|, |output phase| above this are not radians (any 2π-periodic convention is fine below it)
PHASE_LIMIT = 4 * math.pi
SIGN_HINT = "u and v meshes swapped, or a phase convention of the opposite sign"


def measured_specs(record: dict[str, Any], device: dict[str, Any]) -> dict[str, tuple[list[int], bool]]:
    """Name → (shape, required): per mesh of the map's grid, the phases every MZI and output phase
    shifter really applies, the attenuators' amplitude transmissions and (optional) each waveguide's loss."""
    grid = list(_grid(record))
    k, m = device["mesh_size"], device["mzis_per_mesh"]
    specs: dict[str, tuple[list[int], bool]] = {}
    for side in MESHES:
        specs[f"{side}_theta"] = ([*grid, m], True)
        specs[f"{side}_phi"] = ([*grid, m], True)
        specs[f"{side}_out_phase"] = ([*grid, k], True)
    specs["sigma"] = ([*grid, k], True)
    for side in MESHES:
        specs[f"{side}_mode_loss_db"] = ([*grid, k], False)
    return specs


def check_measured(arrays: dict[str, torch.Tensor], map_arrays: dict[str, torch.Tensor], record: dict[str, Any],
                   device: dict[str, Any], where: str) -> None:
    """Phases in radians (θ within π/4 of [0, π/2], other phases within ±4π: degrees are far outside),
    passive attenuators (σ in [0, 1]) and losses ≥ 0 dB."""
    for side in MESHES:
        theta = arrays[f"{side}_theta"]
        if theta.numel() and ((theta < -THETA_SLACK).any() or (theta > math.pi / 2 + THETA_SLACK).any()):
            raise MapError(f"{where}: {side}_theta has values in [{float(theta.min()):.4g}, {float(theta.max()):.4g}], "
                           "far outside [0, pi/2]: phases must be in radians (not degrees)")
        for p in ("phi", "out_phase"):
            a = arrays[f"{side}_{p}"]
            if a.numel() and (a.abs() > PHASE_LIMIT).any():
                raise MapError(f"{where}: {side}_{p} reaches {float(a.abs().max()):.4g}: phases must be in radians "
                               "(not degrees)")
        loss = arrays.get(f"{side}_mode_loss_db")
        if loss is not None and (loss < 0).any():
            raise MapError(f"{where}: {side}_mode_loss_db has negative values: a loss in dB is >= 0 "
                           "(a passive waveguide cannot amplify): wrong sign")
    sigma = arrays["sigma"]
    if (sigma < 0).any() or (sigma > 1 + 1e-6).any():
        raise MapError(f"{where}: sigma outside [0, 1]: it is the amplitude transmission of a passive attenuator "
                       "(not a percentage, not dB)")


def _fixed_mode_loss(physics: Photonic, like: torch.Tensor) -> torch.Tensor | None:
    """Each waveguide's loss when the measurement has none: the profile's fixed value (its per-chip spread
    is unknown without a measurement), or None without loss."""
    if not physics.mode_loss_db:
        return None
    mean = torch.tensor(physics.mode_loss_db, dtype=torch.float64)
    return mean.expand(like.shape).clone()


def measured_state(arrays: dict[str, torch.Tensor], map_arrays: dict[str, torch.Tensor], record: dict[str, Any],
                   device: dict[str, Any], config: AnalogConfig, seconds: float, read_noise: str,
                   where: str) -> Programmed:
    """The chip state measured meshes hold: the meshes composed from the measured phases, transmissions
    and losses (the profile's insertion loss per MZI, the map's electronic mesh gains), then calibrated
    against the map's targets exactly as the chip calibrates its loss compensation. A photonic chip has
    no per-device read noise (detector noise is output noise), so ``read_noise`` only refuses 'measured'."""
    physics = config.device
    if not isinstance(physics, Photonic):
        raise ValueError(f"{where}: a photonic measurement needs a photonic profile, not {physics.kind!r}")
    if read_noise == "measured":
        raise MapError(f"{where}: a photonic chip has no per-device read noise to measure (detector noise is "
                       "the device model's output noise); use read_noise 'auto' or 'model'")
    k = device["mesh_size"]
    e, t, bo, bi = _grid(record)
    out, rows = record["shape"][-2], record["tiles"]["rows"]

    def phases(side: str) -> mesh.MeshPhases:
        flat = {p: arrays[f"{side}_{p}"].double().reshape(-1, arrays[f"{side}_{p}"].shape[-1]) for p in PHASES}
        return mesh.MeshPhases(theta=flat["theta"], phi=flat["phi"], out_phase=flat["out_phase"], n=k)

    def loss(side: str) -> torch.Tensor | None:
        if f"{side}_mode_loss_db" in arrays:
            return arrays[f"{side}_mode_loss_db"].double().reshape(-1, k)
        return _fixed_mode_loss(physics, arrays["sigma"].reshape(-1, k))

    meshes = mesh.RealisedMeshes(u=phases("u"), v=phases("v"), u_mode_loss_db=loss("u"), v_mode_loss_db=loss("v"))
    noisy = physics.compose_realised(meshes, arrays["sigma"].double().reshape(-1, k), map_arrays["mesh_gain"].reshape(-1))
    target = mesh.compose_matrix(mesh_tiles(map_arrays, device, codes=False)).double()
    shape = (bo, bi, e * t)
    peak = column_peaks(physics.unblocks(target, shape, out, rows))
    weight, gain = physics.calibrate(noisy, target, shape, out, rows, None if bool((peak == 1).all()) else peak)
    tiles = weight.float().reshape(e, t, out, rows).transpose(-1, -2).contiguous()
    return Programmed(tiles=tiles, scale=map_arrays["scale"].float(), read_var=None, gain=torch.full((e,), gain))


def simulate_measurement(map_arrays: dict[str, torch.Tensor], record: dict[str, Any], device: dict[str, Any],
                         config: AnalogConfig, seed: int, seconds: float, reads: int | None,
                         noise: torch.Generator, phase_read_std: float = 0.0, **_: Any) -> dict[str, torch.Tensor]:
    """What a lab measures on chip instance ``seed`` programmed from this layer's phase codes: the
    phases every heater really applies (codes, crosstalk and static phase errors of the device model,
    drawn as ``analogllm verify`` draws them), the attenuators' transmissions and the waveguide losses.
    Each phase and transmission is estimated ``reads`` times with a Gaussian error of ``phase_read_std``
    (rad; relative for σ) per estimate and averaged; ``reads=None`` is the noise-free limit."""
    physics = config.device
    grid = list(_grid(record))
    programmed = mesh_tiles(map_arrays, device, codes=device["phase_bits"] is not None)
    meshes = physics.realised_meshes(programmed, chip_generator(seed, record["layer_id"]), None)
    std = None if reads is None or phase_read_std == 0 else phase_read_std / math.sqrt(reads)

    def estimate(a: torch.Tensor) -> torch.Tensor:
        a = a.double()
        return a if std is None else a + std * torch.randn(a.shape, generator=noise, dtype=a.dtype)

    arrays: dict[str, torch.Tensor] = {}
    for side, phases, loss in (("u", meshes.u, meshes.u_mode_loss_db), ("v", meshes.v, meshes.v_mode_loss_db)):
        for p in PHASES:
            value = getattr(phases, p)
            arrays[f"{side}_{p}"] = estimate(value).reshape(*grid, value.shape[-1]).contiguous()
        if loss is not None:
            arrays[f"{side}_mode_loss_db"] = loss.double().reshape(*grid, -1).contiguous()
    sigma = programmed.sigma.double()
    if std is not None:
        sigma = (sigma * (1 + std * torch.randn(sigma.shape, generator=noise, dtype=sigma.dtype))).clamp(0.0, 1.0)
    arrays["sigma"] = sigma.reshape(*grid, -1).contiguous()
    return arrays
