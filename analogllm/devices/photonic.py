"""Coherent photonic MZI-mesh processor.

Each k×k block of the (normalised) weight is realised as W = g · U Σ V†: two rectangular Clements
meshes of Mach–Zehnder interferometers (see :mod:`analogllm.devices.mesh`) around a column of
attenuators, with σ_max moved into an electronic gain g because a passive mesh cannot amplify. A chip
instance is the set of phases actually applied by the heaters: quantised by the phase DAC, shifted by
thermal crosstalk from neighbouring heaters, and perturbed by fabrication/thermal phase noise drawn
once per chip. The matrix the layer then computes is what that mesh computes, so errors compound
through the mesh depth exactly as on hardware.

How loss enters (all factors act on the optical field, i.e. on the matrix entries):

* insertion loss ``loss_db_per_mzi``: both outputs of every MZI of both meshes are scaled by
  10^(−dB/20). A plain Clements mesh leaves the edge modes idle in every other column, so light on the
  outer waveguides crosses fewer MZIs and the loss of a path depends on its route; the matrix is then not
  just attenuated but distorted (≈ 1.9 % error at 0.1 dB/MZI on 16×16 blocks). With ``balanced_edges``
  each idle edge slot holds a loss-matched dummy element (a bar-state MZI), every path crosses k lossy
  elements per mesh, and uniform insertion loss becomes one scale factor per mesh, η^k.
* per-mode propagation loss ``mode_loss_db`` (+ ``mode_loss_std_db`` drawn per chip and waveguide):
  waveguide m of each mesh loses that many dB over the whole mesh, in k equal parts after every column,
  so light collects the loss of every waveguide it travels on.

Loss compensation is calibrated once per chip against the target matrix, as a chip calibrates its
detector gains: ``global`` scales the whole layer by one digital gain ‖W_target‖/‖W_chip‖; ``mode`` also
gives every output mode (detector) of every mesh its least-squares gain c_i = ⟨w_i, r_i⟩/⟨r_i, r_i⟩ over
the driven inputs (w_i, r_i: row i of the target and of the realised block). The layer's ``gain`` stays
the global one (applied after the ADC, which therefore sees the attenuated light); each detector's
gain relative to it, c_i/g, is a transimpedance gain set per detector before the ADC and is folded into
the realised weight rows. Detector shot and thermal noise are added at every read, relative to the
signal, and the ADC follows. Phases do not drift in this model (thermal tuning is closed-loop), so
``drift_`` leaves a photonic chip unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from analogllm.devices import mesh
from analogllm.devices.base import Device, Realisation
from analogllm.config.schema import check


@dataclass(frozen=True)
class Photonic(Device):
    """Photonic mesh parameters.

    mesh_size:         k, the number of optical modes of one mesh (blocks are k×k).
    phase_bits:        phase DAC resolution (θ on [0, π/2], φ on [0, 2π)); ``None`` = continuous.
    phase_noise:       std (rad) of the static phase error on every θ, φ and output phase.
    crosstalk:         κ, the fraction of each neighbouring heater's drive a phase shifter picks up
                       (first-order thermal crosstalk, :func:`analogllm.devices.mesh.thermal_crosstalk`).
    loss_db_per_mzi:   insertion loss of one MZI, dB (0.1–1 dB in the literature).
    balanced_edges:    idle edge slots hold loss-matched dummy elements (every path crosses k per mesh).
    mode_loss_db:      fixed propagation loss of each waveguide over one mesh, dB: one value for every
                       waveguide, k values (one per waveguide), or empty for none.
    mode_loss_std_db:  waveguide-to-waveguide spread of that loss, dB, drawn per chip (clipped at 0 dB).
    loss_compensation: ``global`` (one gain per layer) or ``mode`` (plus one gain per output mode).
    detector_thermal:  thermal (signal-independent) detector noise std, normalised output units.
    detector_shot:     shot noise coefficient: std = detector_shot·√|y|, normalised units.
    """

    kind = "photonic"
    array = "mesh"

    mesh_size: int = 16
    phase_bits: int | None = 8
    phase_noise: float = 0.002
    crosstalk: float = 0.0
    loss_db_per_mzi: float = 0.1
    balanced_edges: bool = True
    mode_loss_db: tuple[float, ...] = ()
    mode_loss_std_db: float = 0.0
    loss_compensation: Literal["global", "mode"] = "mode"
    detector_thermal: float = 0.01
    detector_shot: float = 0.01

    def __post_init__(self) -> None:
        check(self.mesh_size >= 2, "device.mesh_size", f"must be >= 2, got {self.mesh_size}")
        check(self.phase_bits is None or 1 <= self.phase_bits <= 24, "device.phase_bits", "must be in 1..24 or null")
        for name in ("phase_noise", "crosstalk", "loss_db_per_mzi", "mode_loss_std_db", "detector_thermal",
                     "detector_shot"):
            check(getattr(self, name) >= 0, f"device.{name}", "must be >= 0")
        check(self.crosstalk < 0.5, "device.crosstalk", f"must be < 0.5 (a first-order model), got {self.crosstalk}")
        check(len(self.mode_loss_db) in (0, 1, self.mesh_size), "device.mode_loss_db",
              f"needs 0, 1 or mesh_size ({self.mesh_size}) values, got {len(self.mode_loss_db)}")
        check(all(v >= 0 for v in self.mode_loss_db), "device.mode_loss_db", "losses must be >= 0 dB")
        check(self.loss_compensation in ("global", "mode"), "device.loss_compensation", "must be 'global' or 'mode'")

    @property
    def is_ideal(self) -> bool:
        return False

    @property
    def lossy(self) -> bool:
        """True when light is lost in the meshes (the chip then calibrates its loss compensation)."""
        return self.loss_db_per_mzi > 0 or any(v > 0 for v in self.mode_loss_db) or self.mode_loss_std_db > 0

    def summary(self) -> str:
        return (f"{self.mesh_size}x{self.mesh_size} MZI mesh, {self.phase_bits}-bit phases, "
                f"σφ {self.phase_noise} rad, κ {self.crosstalk}, {self.loss_db_per_mzi} dB/MZI, "
                f"{self.loss_compensation} loss compensation")

    def blocks(self, weight: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, out, rows) → (B·bo·bi, k, k) zero-padded blocks, plus (bo, bi, B) to undo it."""
        k = self.mesh_size
        b, out, rows = weight.shape
        bo, bi = -(-out // k), -(-rows // k)
        w = F.pad(weight, (0, bi * k - rows, 0, bo * k - out))
        w = w.view(b, bo, k, bi, k).permute(0, 1, 3, 2, 4).reshape(-1, k, k)
        return w, (bo, bi, b)

    def unblocks(self, blocks: torch.Tensor, shape: tuple[int, int, int], out: int, rows: int) -> torch.Tensor:
        bo, bi, b = shape
        k = self.mesh_size
        w = blocks.view(b, bo, bi, k, k).permute(0, 1, 3, 2, 4).reshape(b, bo * k, bi * k)
        return w[:, :out, :rows]

    def realised_meshes(self, tile: mesh.MeshTile, generator: torch.Generator | None,
                        phase_bits: int | None) -> mesh.RealisedMeshes:
        """The phases and waveguide losses this chip instance applies when its meshes are set to ``tile``
        (quantised to ``phase_bits`` when given): crosstalk, phase noise and mode-loss spread drawn."""
        fixed = 0.0
        if self.mode_loss_db:
            fixed = self.mode_loss_db[0] if len(self.mode_loss_db) == 1 else torch.tensor(self.mode_loss_db)
        return mesh.realise_meshes(
            tile, phase_bits=phase_bits, phase_noise_std=self.phase_noise, generator=generator,
            crosstalk=self.crosstalk, mode_loss_mean_db=fixed, mode_loss_std_db=self.mode_loss_std_db,
        )

    def compose_realised(self, meshes: mesh.RealisedMeshes, sigma: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """The (B, k, k) float64 blocks meshes applying ``meshes`` compute, with this device's insertion
        loss, between attenuators ``sigma`` and electronic gains ``gain``."""
        return mesh.compose_realised(meshes, sigma, gain, loss_db_per_mzi=self.loss_db_per_mzi,
                                     balanced_edges=self.balanced_edges).double()

    def compose(self, tile: mesh.MeshTile, generator: torch.Generator | None,
                phase_bits: int | None) -> torch.Tensor:
        """The (B, k, k) float64 blocks the chip's meshes compute for ``tile`` (all effects, no gains)."""
        return self.compose_realised(self.realised_meshes(tile, generator, phase_bits), tile.sigma, tile.gain)

    def mode_gains(self, realised: torch.Tensor, target: torch.Tensor, driven: torch.Tensor) -> torch.Tensor:
        """(B, k, 1) least-squares gain ⟨w_i, r_i⟩/⟨r_i, r_i⟩ of every output mode of every mesh, over the
        inputs that carry a real weight column (``driven``, a (B, k, k) 0/1 mask); 1 for a mode that
        receives no light (padding)."""
        r = realised * driven
        num = (r * target).sum(-1, keepdim=True)
        den = r.square().sum(-1, keepdim=True)
        return torch.where(den > 0, num / den.clamp(min=1e-300), torch.ones_like(den))

    def realise_tiles(self, exact: mesh.MeshTile, programmed: mesh.MeshTile, phase_bits: int | None,
                      shape: tuple[int, int, int], out: int, rows: int, generator: torch.Generator,
                      peak: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(weight (B, out, rows) float64, gain) of the chip whose meshes are set to ``programmed``
        (quantised to ``phase_bits`` here when given) and whose target is what ``exact`` composes to.

        The export replay programs a chip from stored codes through this same function, so the model's
        chip and the replayed one are one chip; ``peak`` (B, out, 1), when given, expresses both in the
        layer's units (a map's column peaks). Per-mode gains are scale-free, so they do not depend on it.
        """
        noisy = self.compose(programmed, generator, phase_bits)
        return self.calibrate(noisy, mesh.compose_matrix(exact).double(), shape, out, rows, peak)

    def calibrate(self, noisy: torch.Tensor, target: torch.Tensor, shape: tuple[int, int, int], out: int, rows: int,
                  peak: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(weight (B, out, rows) float64, gain) of a chip whose meshes compute the blocks ``noisy``, after
        the chip's loss compensation against the lossless ``target`` blocks (module docstring): what
        the chip computes once it has calibrated itself. A read-back chip, whose blocks come from
        measured phases, is calibrated by this same function."""
        realised = self.unblocks(noisy, shape, out, rows)
        lossless = self.unblocks(target, shape, out, rows)
        if peak is not None:
            realised, lossless = realised / peak, lossless / peak
        if not self.lossy:
            return realised, 1.0
        gain = float(lossless.norm() / realised.norm().clamp(min=1e-30))  # ‖W_target‖ / ‖W_chip‖
        if self.loss_compensation == "global":
            return realised, gain
        driven = self.blocks(torch.ones(shape[2], out, rows, dtype=noisy.dtype, device=noisy.device))[0]
        compensated = self.unblocks(noisy * self.mode_gains(noisy, target, driven), shape, out, rows)
        if peak is not None:
            compensated = compensated / peak
        return compensated / gain, gain

    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        blocks, shape = self.blocks(weight.double())
        tiles = mesh.decompose_matrix(blocks)
        realised, gain = self.realise_tiles(tiles, tiles, self.phase_bits, shape, weight.shape[1], weight.shape[2],
                                            generator)
        return Realisation(weight=realised.to(weight.dtype), gain=gain)

    def output_var_terms(self) -> tuple[float, float]:
        return float(self.detector_shot**2), float(self.detector_thermal**2)
