"""Rectangular (Clements) MZI meshes: decomposition, reconstruction, phase quantization, noise, loss.

A photonic tile realises a real weight block W (k x k) as W = gain * U diag(sigma) Vh: two passive
unitary meshes (Vh on the input side, U on the output side) around a column of attenuators. A passive
device cannot amplify, so sigma is normalised by its largest value, which becomes an electronic gain.

Mesh convention (used everywhere in this file)
-----------------------------------------------
Each MZI acts on two adjacent modes (m, m + 1) as

    T(theta, phi) = [[exp(i phi) cos(theta), -sin(theta)],
                     [exp(i phi) sin(theta),  cos(theta)]]

(Clements et al., Optica 2016): an external phase shifter phi on the top input, then a beam splitter
whose splitting angle is theta. theta = 0 is the "bar" state (diag(exp(i phi), 1)), theta = pi/2 the
"cross" state. For a physical MZI with internal phase difference 2 * theta this is the usual
cos^2 / sin^2 power split.

* theta lies in [0, pi/2] and is NOT periodic: that interval covers every power split exactly once,
  and a heater drive is bounded, so both endpoints (bar and cross) are real, distinct settings.
* phi lies in [0, 2 pi) and IS periodic: only exp(i phi) matters, so 2 pi is the same setting as 0.
* out_phase is the output phase screen D = diag(exp(i out_phase)), N phases in [0, 2 pi), periodic.

Mode 0 is the top mode. The mesh has N columns (optical depth N); column c holds the MZIs whose top mode
m satisfies m = c (mod 2), m <= N - 2, i.e. N(N-1)/2 MZIs in all. Light enters column 0, so the mesh
realises D L_{N-1} ... L_1 L_0, where L_c is the block-diagonal product of column c's MZIs. Phase
tensors have one entry per MZI, ordered column by column and, inside a column, by increasing top mode;
`mesh_layout` gives each entry's (column, top mode).

Loss
----
Two kinds of optical loss enter a mesh, both as field (amplitude) factors 10^(-dB/20):

* insertion loss, charged per MZI: both outputs of every MZI are scaled by 10^(-loss_db_per_mzi/20);
  a mode that is idle in a column (mode 0 in odd columns, the last mode where N's parity leaves it
  unpaired) passes unscaled. So the mesh is NOT loss-balanced: for even N an interior mode held in the
  bar state crosses N MZIs, while modes 0 and N-1 cross only N/2 (odd N: (N+1)/2 for mode 0, (N-1)/2
  for mode N-1), and a general path's loss depends on the route its light takes. With balanced_edges an
  idle slot holds a loss-matched dummy element (e.g. a bar-state MZI) and is charged the same factor, so
  every path crosses N lossy elements and uniform insertion loss is one scale factor eta^N per mesh.
* per-mode (waveguide) propagation loss: waveguide m of a mesh loses mode_loss_db[m] dB over the whole
  mesh, spread evenly over its N columns (after column c, row m is scaled by 10^(-mode_loss_db[m]/(20 N)),
  idle or not). Light that changes waveguide at an MZI collects the loss of each waveguide it travels.

Thermal crosstalk
-----------------
A thermo-optic phase shifter heats its neighbours. To first order the phase a heater actually applies is
its own setting plus a fraction kappa of each neighbouring heater's drive (heater power, and so phase, is
linear in the drive for a thermal shifter, phi = gamma V^2): phase_j' = phase_j + kappa * sum_{i ~ j} phase_i.
Neighbours are the same kind of heater (theta with theta, phi with phi) on the adjacent MZIs of the same
column (top modes m - 2 and m + 2), and adjacent output phase shifters (modes m - 1, m + 1). A heater set to
0 is undriven; theta is driven in proportion to its value on [0, pi/2] and phi on [0, 2 pi).

All mesh arithmetic runs in float64 / complex128: the nulling decomposition of a 64-mode unitary takes
2016 sequential rotations, and float32 round-off would dominate any quantization or noise study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MeshPhases",
    "PhaseCodes",
    "MeshTile",
    "num_mzis",
    "mesh_layout",
    "svd_tiles",
    "clements_decompose",
    "mesh_matrix",
    "quantize_phases",
    "dequantize_codes",
    "decompose_matrix",
    "compose_matrix",
    "RealisedMeshes",
    "realise_meshes",
    "compose_realised",
    "thermal_crosstalk",
    "draw_mode_loss",
]

TWO_PI = 2.0 * math.pi
HALF_PI = 0.5 * math.pi


@dataclass(frozen=True)
class MeshPhases:
    """Phase settings of a batch of N-mode Clements meshes.

    theta: [B, M] splitting angles in [0, pi/2] (not periodic), M = N(N-1)/2, column-major order.
    phi: [B, M] external phases in [0, 2 pi) (periodic).
    out_phase: [B, N] output phase screen in [0, 2 pi) (periodic).
    n: number of modes N.
    """

    theta: Tensor
    phi: Tensor
    out_phase: Tensor
    n: int

    def __post_init__(self) -> None:
        m = num_mzis(self.n)
        if self.theta.shape[-1] != m or self.phi.shape != self.theta.shape:
            raise ValueError(f"theta and phi must both be [B, {m}] for n={self.n}")
        if self.out_phase.shape[-1] != self.n:
            raise ValueError(f"out_phase must be [B, {self.n}]")


@dataclass(frozen=True)
class PhaseCodes:
    """Integer DAC codes of a MeshPhases, all int32 in [0, 2^bits - 1].

    theta codes map linearly onto [0, pi/2] with both endpoints included (step (pi/2)/(2^bits - 1)),
    because theta is not periodic. phi / out_phase codes map onto [0, 2 pi) with step 2 pi / 2^bits
    and no code for 2 pi itself, because 2 pi is the same setting as 0.
    """

    theta: Tensor
    phi: Tensor
    out_phase: Tensor
    bits: int


@dataclass(frozen=True)
class MeshTile:
    """A batch of real k x k tiles mapped to W = gain * U diag(sigma) Vh on a photonic chip.

    u: phases of the output-side mesh realising U.
    v: phases of the input-side mesh realising Vh.
    sigma: [B, k] singular values divided by the tile's largest one, so in [0, 1] (passive attenuators).
    gain: [B] the largest singular value, applied electronically after detection.
    """

    u: MeshPhases
    v: MeshPhases
    sigma: Tensor
    gain: Tensor


def num_mzis(n: int) -> int:
    """Number of MZIs in an n-mode Clements mesh: n(n-1)/2."""
    return n * (n - 1) // 2


def _column_offsets(n: int) -> list[int]:
    """Start of each column's block in the column-major phase order (length n + 1).

    Column c pairs modes starting at c % 2, so it holds (n - c % 2) // 2 MZIs.
    """
    offsets = [0]
    for col in range(n):
        offsets.append(offsets[-1] + (n - col % 2) // 2)
    return offsets


def mesh_layout(n: int) -> tuple[Tensor, Tensor]:
    """(column[M], top_mode[M]) of every MZI of an n-mode mesh, in the phase-tensor order."""
    offsets = torch.tensor(_column_offsets(n))
    counts = offsets[1:] - offsets[:-1]
    column = torch.repeat_interleave(torch.arange(n), counts)
    position = torch.arange(num_mzis(n)) - offsets[column]
    return column, column % 2 + 2 * position


def _wrap(phase: Tensor) -> Tensor:
    """Map phases into [0, 2 pi); remainder can round a tiny negative value up to exactly 2 pi."""
    r = torch.remainder(phase, TWO_PI)
    return torch.where(r >= TWO_PI, torch.zeros_like(r), r)


def _unit(phase: Tensor) -> Tensor:
    """exp(i * phase) for a real tensor."""
    return torch.polar(torch.ones_like(phase), phase)


def svd_tiles(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD of a batch of square tiles, normalised for a passive mesh.

    Returns (U[B,k,k], sigma[B,k], Vh[B,k,k], gain[B]) with w = gain * U diag(sigma) Vh and
    sigma = singular values / gain in [0, 1], gain = largest singular value. An all-zero tile gets
    gain 0 and sigma 0 (not NaN), so it still composes to zero.
    """
    if w.ndim != 3 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"expected a batch of square tiles [B, k, k], got {tuple(w.shape)}")
    u, s, vh = torch.linalg.svd(w)
    gain = s.amax(dim=-1)
    safe = torch.where(gain > 0, gain, torch.ones_like(gain))
    return u, s / safe[:, None], vh, gain


def _null_from_right(work: Tensor, row: int, m: int) -> tuple[Tensor, Tensor]:
    """Zero work[:, row, m] by work <- work @ T(theta, phi)^-1 on columns (m, m+1); return (theta, phi).

    (U T^-1)[row, m] = exp(-i phi) cos(theta) a - sin(theta) b with a = U[row, m], b = U[row, m+1],
    which vanishes for tan(theta) = |a| / |b| and phi = arg(a) - arg(b). atan2 of magnitudes stays
    exact when either entry is 0 (a = 0 -> theta = 0, b = 0 -> theta = pi/2).
    """
    a, b = work[:, row, m], work[:, row, m + 1]
    theta = torch.atan2(a.abs(), b.abs())
    phi = torch.angle(a) - torch.angle(b)
    c, s = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    e = _unit(-phi)[:, None]
    x, y = work[:, :, m], work[:, :, m + 1]
    new_x, new_y = e * c * x - s * y, e * s * x + c * y
    work[:, :, m], work[:, :, m + 1] = new_x, new_y
    return theta, phi


def _null_from_left(work: Tensor, m: int, col: int) -> tuple[Tensor, Tensor]:
    """Zero work[:, m+1, col] by work <- T(theta, phi) @ work on rows (m, m+1); return (theta, phi).

    (T U)[m+1, col] = exp(i phi) sin(theta) a + cos(theta) b with a = U[m, col], b = U[m+1, col],
    which vanishes for tan(theta) = |b| / |a| and phi = arg(b) - arg(a) + pi.
    """
    a, b = work[:, m, col], work[:, m + 1, col]
    theta = torch.atan2(b.abs(), a.abs())
    phi = torch.angle(b) - torch.angle(a) + math.pi
    c, s = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    e = _unit(phi)[:, None]
    x, y = work[:, m, :], work[:, m + 1, :]
    new_x, new_y = e * c * x - s * y, e * s * x + c * y
    work[:, m, :], work[:, m + 1, :] = new_x, new_y
    return theta, phi


def clements_decompose(u: Tensor) -> MeshPhases:
    """Decompose a batch of unitaries [B, N, N] into Clements meshes (see the module docstring).

    Real input is promoted to complex128; the input must be unitary (only the phases of the residual
    diagonal are kept). Following Clements et al., the anti-diagonals below the main diagonal are
    nulled in turn, alternately by MZIs peeled off the input side (right multiplication by T^-1) and
    off the output side (left multiplication by T). Nulling anti-diagonal i from the input side with
    step j places that MZI at (column j, top mode i - j); from the output side, step j lands at
    (column N - j, top mode N + j - i - 3). These slots tile the rectangular mesh exactly once. What
    remains is a diagonal D; each output-side T^-1 is then moved through D using
    T(theta, phi)^-1 D = D' T(theta, phi') with phi' = arg d_m - arg d_{m+1} + pi and
    arg d'_m = arg d_{m+1} - phi + pi (theta unchanged, so it stays in [0, pi/2]).

    The N(N-1)/2 nulling steps are sequential, but each one acts on the whole batch.
    """
    if u.ndim != 3 or u.shape[-1] != u.shape[-2]:
        raise ValueError(f"expected a batch of square matrices [B, N, N], got {tuple(u.shape)}")
    work = u.detach().to(torch.complex128).clone()
    batch, n, _ = work.shape
    offsets = _column_offsets(n)
    theta = torch.zeros(batch, num_mzis(n), dtype=torch.float64, device=work.device)
    phi = torch.zeros_like(theta)
    output_side: list[tuple[int, int]] = []  # (phase index, top mode), in nulling order
    for i in range(n - 1):
        if i % 2 == 0:
            for j in range(i + 1):
                mode, col = i - j, j
                t, p = _null_from_right(work, n - 1 - j, mode)
                idx = offsets[col] + (mode - col % 2) // 2
                theta[:, idx], phi[:, idx] = t, p
        else:
            for j in range(1, i + 2):
                mode, col = n + j - i - 3, n - j
                t, p = _null_from_left(work, mode, j - 1)
                idx = offsets[col] + (mode - col % 2) // 2
                theta[:, idx], phi[:, idx] = t, p
                output_side.append((idx, mode))
    d = torch.angle(torch.diagonal(work, dim1=-2, dim2=-1))
    # U = T_1^-1 ... T_K^-1 D R: move the innermost T_K^-1 through D first.
    for idx, mode in reversed(output_side):
        d_top, d_bottom, p = d[:, mode].clone(), d[:, mode + 1], phi[:, idx].clone()
        phi[:, idx] = d_top - d_bottom + math.pi
        d[:, mode] = d_bottom - p + math.pi
    return MeshPhases(theta=theta, phi=_wrap(phi), out_phase=_wrap(d), n=n)


def mesh_matrix(
    phases: MeshPhases,
    theta_noise: Tensor | None = None,
    phi_noise: Tensor | None = None,
    loss_db_per_mzi: float = 0.0,
    out_phase_noise: Tensor | None = None,
    mode_loss_db: Tensor | None = None,
    balanced_edges: bool = False,
) -> Tensor:
    """The [B, N, N] complex matrix a batch of meshes realises, D L_{N-1} ... L_0.

    Optional additive noises (radians, broadcastable to theta / phi / out_phase) model phase errors;
    they are not wrapped or clipped, since T is defined for any angle. Each MZI scales both outputs by
    10^(-loss_db_per_mzi / 20); idle modes are not scaled. ``mode_loss_db`` ([B, N] or [N], dB) is each
    waveguide's propagation loss over the whole mesh, charged in N equal parts after every column (see
    the module docstring). Layers are applied one column at a time to all of the column's disjoint mode
    pairs and the whole batch at once, via strided row slices. ``balanced_edges`` charges a mode left
    idle in a column the same loss as an MZI (a loss-matched dummy element in the edge slot), so every
    path crosses N lossy elements. Differentiable in the phases and noises.
    """
    theta = phases.theta if theta_noise is None else phases.theta + theta_noise
    phi = phases.phi if phi_noise is None else phases.phi + phi_noise
    out = phases.out_phase if out_phase_noise is None else phases.out_phase + out_phase_noise
    n = phases.n
    eta = 10.0 ** (-loss_db_per_mzi / 20.0)
    cos, sin, e = torch.cos(theta), torch.sin(theta), _unit(phi)
    top_gain, bottom_gain = eta * e * cos, eta * e * sin
    cos, sin = eta * cos, eta * sin
    offsets = _column_offsets(n)
    segment = None
    if mode_loss_db is not None:  # field factor of one column's length of each waveguide
        segment = (10.0 ** (-mode_loss_db.to(torch.float64) / (20.0 * n))).expand(theta.shape[0], n)[:, :, None]
    x = torch.eye(n, dtype=e.dtype, device=e.device).expand(theta.shape[0], n, n)
    for col in range(n):
        first, count = col % 2, offsets[col + 1] - offsets[col]
        if count > 0:
            sl = slice(offsets[col], offsets[col + 1])
            top = x[:, first : first + 2 * count : 2]
            bottom = x[:, first + 1 : first + 2 * count : 2]
            new_top = top_gain[:, sl, None] * top - sin[:, sl, None] * bottom
            new_bottom = bottom_gain[:, sl, None] * top + cos[:, sl, None] * bottom
            pairs = torch.stack((new_top, new_bottom), dim=2).reshape(x.shape[0], 2 * count, n)
            x = torch.cat((x[:, :first], pairs, x[:, first + 2 * count :]), dim=1)
        if balanced_edges and eta != 1.0 and 2 * count < n:  # the column's idle edge modes
            idle = torch.ones(n, dtype=torch.float64, device=x.device)
            idle[:first] = eta
            idle[first + 2 * count :] = eta
            x = x * idle[None, :, None]
        if segment is not None:
            x = x * segment
    return _unit(out)[:, :, None] * x


def _neighbour_sum(p: Tensor, same_group_as_next: Tensor) -> Tensor:
    """p[..., j - 1] + p[..., j + 1], counting only neighbours in the same group (column) as j.

    ``same_group_as_next[j]`` says whether entries j and j + 1 are neighbours ([M - 1] bools)."""
    zero = torch.zeros_like(p[..., :1])
    link = same_group_as_next.to(p.dtype)
    from_next = torch.cat((p[..., 1:] * link, zero), dim=-1)
    from_prev = torch.cat((zero, p[..., :-1] * link), dim=-1)
    return from_next + from_prev


def thermal_crosstalk(phases: MeshPhases, kappa: float) -> MeshPhases:
    """The phases a mesh's heaters actually apply when each gets ``kappa`` of its neighbours' drive.

    First-order linear crosstalk (module docstring): theta_j' = theta_j + kappa (theta_{j-1} + theta_{j+1})
    over the adjacent MZIs of the same column, likewise for phi, and out_phase_m' = out_phase_m + kappa
    (out_phase_{m-1} + out_phase_{m+1}). Results are not wrapped (T is defined for any angle); kappa = 0
    returns ``phases`` itself.
    """
    if kappa == 0.0:
        return phases
    column, _ = mesh_layout(phases.n)
    same_column = (column[1:] == column[:-1]).to(phases.theta.device)
    screen = torch.ones(phases.n - 1, dtype=torch.bool, device=phases.theta.device)
    return MeshPhases(
        theta=phases.theta + kappa * _neighbour_sum(phases.theta, same_column),
        phi=phases.phi + kappa * _neighbour_sum(phases.phi, same_column),
        out_phase=phases.out_phase + kappa * _neighbour_sum(phases.out_phase, screen),
        n=phases.n,
    )


def dequantize_codes(codes: PhaseCodes) -> MeshPhases:
    """Phases (float64) that a set of DAC codes programs; see PhaseCodes for the two grids."""
    levels = 2**codes.bits
    theta = codes.theta.to(torch.float64) * (HALF_PI / (levels - 1))
    phi = codes.phi.to(torch.float64) * (TWO_PI / levels)
    out_phase = codes.out_phase.to(torch.float64) * (TWO_PI / levels)
    return MeshPhases(theta=theta, phi=phi, out_phase=out_phase, n=codes.out_phase.shape[-1])


def quantize_phases(phases: MeshPhases, bits: int) -> tuple[MeshPhases, PhaseCodes]:
    """Round phases to a `bits`-bit DAC: returns (quantized phases, integer codes).

    theta is rounded on [0, pi/2] with 2^bits levels including both endpoints (non-periodic: values
    outside are clamped). phi and out_phase are rounded on the periodic grid k * 2 pi / 2^bits, so a
    value just below 2 pi rounds to code 0.
    """
    if bits < 1 or bits > 30:
        raise ValueError(f"bits must be in [1, 30], got {bits}")
    levels = 2**bits

    def periodic(p: Tensor) -> Tensor:
        return torch.remainder(torch.round(p / (TWO_PI / levels)), levels).to(torch.int32)

    theta = torch.round(phases.theta / (HALF_PI / (levels - 1))).clamp(0, levels - 1).to(torch.int32)
    codes = PhaseCodes(theta=theta, phi=periodic(phases.phi), out_phase=periodic(phases.out_phase), bits=bits)
    return dequantize_codes(codes), codes


def decompose_matrix(w: Tensor) -> MeshTile:
    """Map a batch of real tiles [B, k, k] onto photonic meshes: W = gain * U diag(sigma) Vh.

    The SVD and both decompositions run in float64 whatever w's dtype; sigma and gain are stored in
    w's dtype so that compose_matrix returns that dtype.
    """
    if w.is_complex():
        raise TypeError("decompose_matrix maps real weight tiles; got a complex tensor")
    u, sigma, vh, gain = svd_tiles(w.detach().to(torch.float64))
    return MeshTile(
        u=clements_decompose(u), v=clements_decompose(vh), sigma=sigma.to(w.dtype), gain=gain.to(w.dtype)
    )


def _phase_noise(phases: MeshPhases, std: float, generator: torch.Generator | None) -> tuple[Tensor, ...] | None:
    """Gaussian phase errors (theta, phi, out_phase), drawn in that fixed order; None when std is 0."""
    if std == 0.0:
        return None

    def noise(like: Tensor) -> Tensor:
        return std * torch.randn(like.shape, generator=generator, dtype=torch.float64, device=like.device)

    return noise(phases.theta), noise(phases.phi), noise(phases.out_phase)


def draw_mode_loss(tile: MeshTile, mean_db: float | Tensor, std_db: float,
                   generator: torch.Generator | None) -> tuple[Tensor, Tensor] | None:
    """Per-waveguide propagation loss (dB over one mesh) of the U and V meshes, each [B, k].

    Every waveguide gets ``mean_db + std_db * z`` (``mean_db`` one value or [k], fixed by the profile;
    z standard normal, drawn per chip, U mesh first; clipped at 0 dB: a passive waveguide cannot
    amplify). None when there is no loss; with ``std_db = 0`` nothing is drawn, so a fixed loss does
    not move the chip's other random numbers.
    """
    mean = torch.as_tensor(mean_db, dtype=torch.float64)
    if std_db == 0.0 and not bool((mean != 0).any()):
        return None
    shape = tile.u.out_phase.shape
    device = tile.u.out_phase.device

    def one() -> Tensor:
        loss = mean.to(device).expand(shape).clone()
        if std_db > 0:
            loss = loss + std_db * torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
        return loss.clamp(min=0.0)

    u = one()
    return u, one()


@dataclass(frozen=True)
class RealisedMeshes:
    """The phases a batch of mesh pairs really applies, and the waveguide losses they really have.

    u, v: phases of the output-side and input-side meshes after DAC quantization, thermal crosstalk and
          static phase errors (radians, neither wrapped nor clipped: noise may leave the nominal ranges).
    u_mode_loss_db, v_mode_loss_db: [B, k] propagation loss of every waveguide over one mesh (dB), or
          None where the meshes have none.

    This is what :func:`compose_matrix` composes a chip from, and what a measured photonic chip is
    described by (a read-back chip, :mod:`analogllm.export.readback`), so both go through
    :func:`compose_realised`.
    """

    u: MeshPhases
    v: MeshPhases
    u_mode_loss_db: Tensor | None = None
    v_mode_loss_db: Tensor | None = None


def _with_noise(phases: MeshPhases, noise: tuple[Tensor, ...] | None) -> MeshPhases:
    if noise is None:
        return phases
    theta_noise, phi_noise, out_noise = noise
    return MeshPhases(theta=phases.theta + theta_noise, phi=phases.phi + phi_noise,
                      out_phase=phases.out_phase + out_noise, n=phases.n)


def realise_meshes(
    tile: MeshTile,
    *,
    phase_bits: int | None = None,
    phase_noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    crosstalk: float = 0.0,
    mode_loss_mean_db: float | Tensor = 0.0,
    mode_loss_std_db: float = 0.0,
) -> RealisedMeshes:
    """The phases and waveguide losses the chip realises for ``tile`` (see :func:`compose_matrix` for the
    order of the effects and of the random draws)."""
    u_phases, v_phases = tile.u, tile.v
    if phase_bits is not None:
        u_phases = quantize_phases(u_phases, phase_bits)[0]
        v_phases = quantize_phases(v_phases, phase_bits)[0]
    u_phases, v_phases = thermal_crosstalk(u_phases, crosstalk), thermal_crosstalk(v_phases, crosstalk)
    u_noise = _phase_noise(u_phases, phase_noise_std, generator)
    v_noise = _phase_noise(v_phases, phase_noise_std, generator)
    mode_loss = draw_mode_loss(tile, mode_loss_mean_db, mode_loss_std_db, generator)
    u_loss, v_loss = (None, None) if mode_loss is None else mode_loss
    return RealisedMeshes(u=_with_noise(u_phases, u_noise), v=_with_noise(v_phases, v_noise),
                          u_mode_loss_db=u_loss, v_mode_loss_db=v_loss)


def compose_realised(meshes: RealisedMeshes, sigma: Tensor, gain: Tensor, *, loss_db_per_mzi: float = 0.0,
                     balanced_edges: bool = False) -> Tensor:
    """The real [B, k, k] matrix gain * Re(U' diag(sigma) Vh') of meshes that apply ``meshes``' phases,
    with per-MZI insertion loss and the meshes' waveguide losses; in ``sigma``'s dtype."""
    u = mesh_matrix(meshes.u, loss_db_per_mzi=loss_db_per_mzi, mode_loss_db=meshes.u_mode_loss_db,
                    balanced_edges=balanced_edges)
    vh = mesh_matrix(meshes.v, loss_db_per_mzi=loss_db_per_mzi, mode_loss_db=meshes.v_mode_loss_db,
                     balanced_edges=balanced_edges)
    s = sigma.to(torch.float64)
    w = (u * s[:, None, :]) @ vh
    return (gain.to(torch.float64)[:, None, None] * w.real).to(sigma.dtype)


def compose_matrix(
    tile: MeshTile,
    *,
    phase_bits: int | None = None,
    phase_noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    loss_db_per_mzi: float = 0.0,
    crosstalk: float = 0.0,
    mode_loss_mean_db: float | Tensor = 0.0,
    mode_loss_std_db: float = 0.0,
    balanced_edges: bool = False,
) -> Tensor:
    """The real [B, k, k] matrix the chip realises: gain * Re(U' diag(sigma) Vh').

    U', Vh' are the meshes after, in this order: optional `phase_bits` quantization of every phase (the
    DAC codes), first-order thermal crosstalk `crosstalk` between neighbouring heaters
    (:func:`thermal_crosstalk`), then additive Gaussian noise of std `phase_noise_std` rad on every
    theta, phi and output phase, with per-MZI insertion loss (idle edge slots included when
    `balanced_edges`) and per-waveguide propagation loss (`mode_loss_mean_db`: one value or one per
    waveguide, plus a per-chip spread `mode_loss_std_db`, :func:`draw_mode_loss`). Random numbers come
    from `generator` in a fixed order (phase noise of U, then of V, then mode losses of U, then of V),
    so a seed fixes the chip instance and switching a later effect on does not move an earlier one's
    draws. The attenuators sigma and the electronic gain are applied exactly. The two steps are
    :func:`realise_meshes` (what the chip applies) and :func:`compose_realised` (what that computes).

    Why the real part: for a real W the SVD factors are real orthogonal and exact phases rebuild them,
    so the imaginary part is round-off (~1e-15). A perturbed mesh yields a complex matrix; coherent
    (homodyne) detection against an in-phase local oscillator reads its real quadrature.
    """
    meshes = realise_meshes(tile, phase_bits=phase_bits, phase_noise_std=phase_noise_std, generator=generator,
                            crosstalk=crosstalk, mode_loss_mean_db=mode_loss_mean_db,
                            mode_loss_std_db=mode_loss_std_db)
    return compose_realised(meshes, tile.sigma, tile.gain, loss_db_per_mzi=loss_db_per_mzi,
                            balanced_edges=balanced_edges)
