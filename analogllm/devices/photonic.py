"""Coherent photonic MZI-mesh processor.

Each k×k block of the (normalised) weight is realised as W = g · U Σ V†: two rectangular Clements
meshes of Mach–Zehnder interferometers (see :mod:`analogllm.devices.mesh`) around a column of
attenuators, with σ_max moved into an electronic gain g because a passive mesh cannot amplify. A chip
instance is the set of phases actually set on the heaters: quantised by the phase DAC and perturbed by
fabrication/thermal phase noise, drawn once per chip. The matrix the layer then computes is what that
noisy mesh computes, so errors compound through the mesh depth exactly as on hardware.

Insertion loss attenuates the light (non-uniformly: a Clements mesh is not loss-balanced); the chip's
electronic gain is calibrated once per layer to restore the overall scale. Detector shot and thermal
noise are added at every read, relative to the attenuated signal, and the ADC follows. Phases do not
drift in this model (thermal tuning is closed-loop), so ``drift_`` leaves a photonic chip unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analogllm.devices import mesh
from analogllm.devices.base import Device, Realisation
from analogllm.config.schema import check


@dataclass(frozen=True)
class Photonic(Device):
    """Photonic mesh parameters.

    mesh_size:        k, the number of optical modes of one mesh (blocks are k×k).
    phase_bits:       phase DAC resolution (θ on [0, π/2], φ on [0, 2π)); ``None`` = continuous.
    phase_noise:      std (rad) of the static phase error on every θ, φ and output phase.
    loss_db_per_mzi:  insertion loss of one MZI, dB (0.1–1 dB in the literature).
    detector_thermal: thermal (signal-independent) detector noise std, normalised output units.
    detector_shot:    shot noise coefficient: std = detector_shot·√|y|, normalised units.
    """

    kind = "photonic"
    array = "mesh"

    mesh_size: int = 16
    phase_bits: int | None = 8
    phase_noise: float = 0.002
    loss_db_per_mzi: float = 0.1
    detector_thermal: float = 0.01
    detector_shot: float = 0.01

    def __post_init__(self) -> None:
        check(self.mesh_size >= 2, "device.mesh_size", f"must be >= 2, got {self.mesh_size}")
        check(self.phase_bits is None or 1 <= self.phase_bits <= 24, "device.phase_bits", "must be in 1..24 or null")
        for name in ("phase_noise", "loss_db_per_mzi", "detector_thermal", "detector_shot"):
            check(getattr(self, name) >= 0, f"device.{name}", "must be >= 0")

    @property
    def is_ideal(self) -> bool:
        return False

    def summary(self) -> str:
        return (f"{self.mesh_size}x{self.mesh_size} MZI mesh, {self.phase_bits}-bit phases, "
                f"σφ {self.phase_noise} rad, {self.loss_db_per_mzi} dB/MZI")

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

    def realise(self, weight: torch.Tensor, seconds: float, generator: torch.Generator) -> Realisation:
        blocks, shape = self.blocks(weight.double())
        tiles = mesh.decompose_matrix(blocks)
        noisy = mesh.compose_matrix(
            tiles, phase_bits=self.phase_bits, phase_noise_std=self.phase_noise, generator=generator,
            loss_db_per_mzi=self.loss_db_per_mzi,
        )
        realised = self.unblocks(noisy, shape, weight.shape[1], weight.shape[2])
        gain = 1.0
        if self.loss_db_per_mzi > 0:  # electronic gain calibrated against the lossless target
            lossless = self.unblocks(mesh.compose_matrix(tiles), shape, weight.shape[1], weight.shape[2])
            gain = float(lossless.norm() / realised.norm().clamp(min=1e-30))
        return Realisation(weight=realised.to(weight.dtype), gain=gain)

    def output_var_terms(self) -> tuple[float, float]:
        return float(self.detector_shot**2), float(self.detector_thermal**2)
