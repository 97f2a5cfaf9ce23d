"""Tests for analogllm.devices.mesh (Clements MZI meshes)."""

from __future__ import annotations

import math

import pytest
import torch

from analogllm.devices import mesh

TWO_PI = 2.0 * math.pi


def haar_unitaries(batch: int, n: int, seed: int) -> torch.Tensor:
    """Haar-random unitaries: QR of a complex Gaussian with R's diagonal phases divided out."""
    g = torch.Generator().manual_seed(seed)
    z = torch.complex(
        torch.randn(batch, n, n, generator=g, dtype=torch.float64),
        torch.randn(batch, n, n, generator=g, dtype=torch.float64),
    )
    q, r = torch.linalg.qr(z)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    return q * (d / d.abs())[:, None, :]


def random_phases(batch: int, n: int, seed: int) -> mesh.MeshPhases:
    g = torch.Generator().manual_seed(seed)
    m = mesh.num_mzis(n)
    return mesh.MeshPhases(
        theta=torch.rand(batch, m, generator=g, dtype=torch.float64) * (math.pi / 2),
        phi=torch.rand(batch, m, generator=g, dtype=torch.float64) * TWO_PI,
        out_phase=torch.rand(batch, n, generator=g, dtype=torch.float64) * TWO_PI,
        n=n,
    )


def reference_mesh(phases: mesh.MeshPhases, loss_db: float = 0.0) -> torch.Tensor:
    """Slow dense reference: embed every MZI in an N x N matrix and multiply in phase order.

    Written independently of mesh_matrix from the documented convention: T acts on (mode, mode + 1)
    as [[e^{i phi} cos, -sin], [e^{i phi} sin, cos]], each MZI scales its outputs by 10^(-dB/20),
    columns are applied in increasing order, then diag(e^{i out_phase}).
    """
    n = phases.n
    eta = 10.0 ** (-loss_db / 20.0)
    _, modes = mesh.mesh_layout(n)
    out = []
    for b in range(phases.theta.shape[0]):
        x = torch.eye(n, dtype=torch.complex128)
        for k, m in enumerate(modes.tolist()):
            t, p = phases.theta[b, k].item(), phases.phi[b, k].item()
            e = complex(math.cos(p), math.sin(p))
            full = torch.eye(n, dtype=torch.complex128)
            full[m : m + 2, m : m + 2] = eta * torch.tensor(
                [[e * math.cos(t), -math.sin(t)], [e * math.sin(t), math.cos(t)]], dtype=torch.complex128
            )
            x = full @ x
        d = torch.polar(torch.ones(n, dtype=torch.float64), phases.out_phase[b])
        out.append(d[:, None] * x)
    return torch.stack(out)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-tile relative Frobenius error ||a - b|| / ||b||."""
    return (a - b).norm(dim=(-2, -1)) / b.norm(dim=(-2, -1))


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7])
def test_layout_is_rectangular_clements_mesh(n: int) -> None:
    column, mode = mesh.mesh_layout(n)
    assert column.dtype == torch.long and mode.dtype == torch.long
    assert column.numel() == mode.numel() == n * (n - 1) // 2 == mesh.num_mzis(n)
    if n == 1:
        return
    assert bool((column[1:] >= column[:-1]).all()), "ordered column by column"
    assert bool(((mode - column) % 2 == 0).all()), "column c pairs modes starting at c % 2"
    assert int(mode.min()) >= 0 and int(mode.max()) <= n - 2
    assert int(column.max()) == n - 1 or n == 2, "depth N (an N=2 mesh has one MZI)"
    slots = set(zip(column.tolist(), mode.tolist()))
    assert len(slots) == column.numel()
    for c in range(n):  # every legal slot is filled: a full rectangle
        for m in range(c % 2, n - 1, 2):
            assert (c, m) in slots


# ----------------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_haar_unitaries_round_trip(n: int) -> None:
    u = haar_unitaries(3, n, seed=n)
    phases = mesh.clements_decompose(u)
    m = n * (n - 1) // 2
    assert phases.theta.shape == (3, m) and phases.phi.shape == (3, m)
    assert phases.out_phase.shape == (3, n)
    assert phases.n == n
    rebuilt = mesh.mesh_matrix(phases)
    assert rebuilt.dtype == torch.complex128
    assert (rebuilt - u).abs().max().item() < 1e-10
    assert bool(((phases.theta >= 0) & (phases.theta <= math.pi / 2)).all())
    for p in (phases.phi, phases.out_phase):
        assert bool(((p >= 0) & (p < TWO_PI)).all())


def test_decomposition_matches_independent_reference() -> None:
    u = haar_unitaries(2, 5, seed=11)
    phases = mesh.clements_decompose(u)
    assert (reference_mesh(phases) - u).abs().max().item() < 1e-10


def test_decompose_64_modes_is_accurate() -> None:
    u = haar_unitaries(2, 64, seed=64)
    assert (mesh.mesh_matrix(mesh.clements_decompose(u)) - u).abs().max().item() < 1e-10


def test_matrices_with_zero_entries_and_real_input() -> None:
    """Identity, permutations and sign flips null with exact zeros: the angle formulas must cope."""
    n = 6
    perm = torch.eye(n, dtype=torch.float64)[torch.tensor([3, 0, 5, 1, 2, 4])]
    u = torch.stack([torch.eye(n, dtype=torch.float64), perm, -perm, torch.diag(torch.tensor([1.0, -1] * 3))])
    phases = mesh.clements_decompose(u)
    assert torch.isfinite(phases.theta).all() and torch.isfinite(phases.phi).all()
    assert (mesh.mesh_matrix(phases) - u).abs().max().item() < 1e-12


def test_batch_is_decomposed_like_single_tiles() -> None:
    u = haar_unitaries(4, 7, seed=3)
    batched = mesh.clements_decompose(u)
    for b in range(4):
        single = mesh.clements_decompose(u[b : b + 1])
        torch.testing.assert_close(single.theta[0], batched.theta[b], rtol=0, atol=1e-12)
        rebuilt = mesh.mesh_matrix(single)[0]
        torch.testing.assert_close(rebuilt, mesh.mesh_matrix(batched)[b], rtol=0, atol=1e-12)


def test_mesh_matrix_matches_reference_and_is_differentiable() -> None:
    phases = random_phases(3, 6, seed=5)
    for loss in (0.0, 0.7):
        torch.testing.assert_close(
            mesh.mesh_matrix(phases, loss_db_per_mzi=loss), reference_mesh(phases, loss), rtol=0, atol=1e-12
        )
    small = random_phases(1, 4, seed=6)

    def f(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        return mesh.mesh_matrix(mesh.MeshPhases(theta, phi, small.out_phase, small.n))

    assert torch.autograd.gradcheck(
        f, (small.theta.clone().requires_grad_(), small.phi.clone().requires_grad_())
    )


def test_noise_arguments_add_to_phases() -> None:
    phases = random_phases(2, 5, seed=8)
    g = torch.Generator().manual_seed(0)
    dt = torch.randn(phases.theta.shape, generator=g, dtype=torch.float64)
    dp = torch.randn(phases.phi.shape, generator=g, dtype=torch.float64)
    do = torch.randn(phases.out_phase.shape, generator=g, dtype=torch.float64)
    shifted = mesh.MeshPhases(phases.theta + dt, phases.phi + dp, phases.out_phase + do, phases.n)
    torch.testing.assert_close(
        mesh.mesh_matrix(phases, dt, dp, out_phase_noise=do), reference_mesh(shifted), rtol=0, atol=1e-12
    )


# ----------------------------------------------------------------------------- SVD mapping


@pytest.mark.parametrize("k", [16, 7])
def test_weight_tiles_round_trip(k: int) -> None:
    w = torch.randn(4, k, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 3.0
    tile = mesh.decompose_matrix(w)
    assert bool((tile.sigma <= 1.0).all()) and bool((tile.sigma >= 0).all())
    torch.testing.assert_close(tile.sigma.amax(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(tile.gain, torch.linalg.matrix_norm(w, ord=2))
    out = mesh.compose_matrix(tile)
    assert out.dtype == torch.float64 and out.shape == w.shape
    assert (out - w).abs().max().item() < 1e-6
    # The real part is all there is: exact meshes of a real W are real to round-off.
    complex_w = (mesh.mesh_matrix(tile.u) * tile.sigma[:, None, :]) @ mesh.mesh_matrix(tile.v)
    assert complex_w.imag.abs().max().item() < 1e-12


def test_svd_tiles_normalises_and_handles_zero_tile() -> None:
    w = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w[1] = 0.0
    u, sigma, vh, gain = mesh.svd_tiles(w)
    assert gain[1].item() == 0.0 and torch.isfinite(sigma).all()
    torch.testing.assert_close(gain[:, None, None] * (u * sigma[:, None, :]) @ vh, w)
    out = mesh.compose_matrix(mesh.decompose_matrix(w))
    assert out[1].abs().max().item() == 0.0


def test_float32_tiles_compose_to_float32() -> None:
    w = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2))
    out = mesh.compose_matrix(mesh.decompose_matrix(w))
    assert out.dtype == torch.float32
    assert (out - w).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- quantization


def test_codes_round_trip_and_ranges() -> None:
    phases = random_phases(3, 9, seed=4)
    # Edge values: theta endpoints are distinct codes; phi just below 2 pi wraps to code 0.
    theta = phases.theta.clone()
    theta[0, :2] = torch.tensor([0.0, math.pi / 2], dtype=torch.float64)
    phi = phases.phi.clone()
    phi[0, 0] = TWO_PI - 1e-9
    phases = mesh.MeshPhases(theta, phi, phases.out_phase, phases.n)
    for bits in (1, 4, 8):
        q, codes = mesh.quantize_phases(phases, bits)
        levels = 2**bits
        assert codes.bits == bits
        for c in (codes.theta, codes.phi, codes.out_phase):
            assert c.dtype == torch.int32
            assert int(c.min()) >= 0 and int(c.max()) <= levels - 1
        assert codes.theta[0, 0].item() == 0 and codes.theta[0, 1].item() == levels - 1
        assert codes.phi[0, 0].item() == 0
        back = mesh.dequantize_codes(codes)
        for a, b in ((back.theta, q.theta), (back.phi, q.phi), (back.out_phase, q.out_phase)):
            assert torch.equal(a, b)
        assert back.n == phases.n
        # Rounding error at most half a step (periodic distance for phi and out_phase).
        assert (q.theta - phases.theta).abs().max().item() <= (math.pi / 2) / (levels - 1) / 2 + 1e-12
        for a, b in ((q.phi, phases.phi), (q.out_phase, phases.out_phase)):
            dist = torch.remainder(a - b + math.pi, TWO_PI) - math.pi
            assert dist.abs().max().item() <= TWO_PI / levels / 2 + 1e-12
            assert bool(((a >= 0) & (a < TWO_PI)).all())


def test_phase_quantization_error_band_and_monotonicity() -> None:
    """Measured on 20 random 16 x 16 tiles: 6/8/10/12 bits -> ~3.9 / 0.97 / 0.24 / 0.06 %.

    physics.md quotes ~4 / 1.0 / 0.25 / 0.06 %; the error falls ~4x per 2 bits (proportional to the
    step). The bands leave ~+-15 % around the measured means, which vary by ~3 % across seeds.
    """
    w = torch.randn(20, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tile = mesh.decompose_matrix(w)
    err = {b: rel_error(mesh.compose_matrix(tile, phase_bits=b), w).mean().item() for b in (6, 8, 10, 12)}
    assert 0.0085 < err[8] < 0.011
    assert 0.0021 < err[10] < 0.0028
    assert err[6] > err[8] > err[10] > err[12] > 0


# ----------------------------------------------------------------------------- phase noise


def test_phase_noise_error_band_growth_and_reproducibility() -> None:
    """Measured on 20 random 16 x 16 tiles: 0.005 / 0.01 / 0.02 rad -> ~2.7 / 5.4 / 10.8 % (linear in std).

    physics.md quotes ~2.8 / 5.5 / 11 %.
    """
    w = torch.randn(20, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tile = mesh.decompose_matrix(w)

    def noisy(std: float, seed: int) -> torch.Tensor:
        return mesh.compose_matrix(tile, phase_noise_std=std, generator=torch.Generator().manual_seed(seed))

    err = {s: rel_error(noisy(s, 0), w).mean().item() for s in (0.005, 0.01, 0.02)}
    assert 0.046 < err[0.01] < 0.063
    assert err[0.005] < err[0.01] < err[0.02]
    assert torch.equal(noisy(0.01, 7), noisy(0.01, 7))
    assert (noisy(0.01, 7) - noisy(0.01, 8)).abs().max().item() > 1e-3
    # Noise on top of quantized phases still adds error.
    quantized = mesh.compose_matrix(tile, phase_bits=10)
    g = torch.Generator().manual_seed(0)
    both = mesh.compose_matrix(tile, phase_bits=10, phase_noise_std=0.01, generator=g)
    assert rel_error(both, w).mean().item() > 5 * rel_error(quantized, w).mean().item()


# ----------------------------------------------------------------------------- insertion loss


@pytest.mark.parametrize("n", [6, 7])
def test_insertion_loss_per_path(n: int) -> None:
    """A Clements mesh is not loss-balanced: idle edge slots let edge modes skip MZIs.

    With all MZIs in the bar state (theta = 0) every input stays on its mode, so |M[m, m]| =
    eta^(number of MZIs mode m crosses): N for interior modes; N/2 for both edge modes when N is even;
    (N+1)/2 for mode 0 and (N-1)/2 for mode N-1 when N is odd.
    """
    loss_db = 0.5
    eta = 10.0 ** (-loss_db / 20.0)
    m = mesh.num_mzis(n)
    g = torch.Generator().manual_seed(n)
    bar = mesh.MeshPhases(
        theta=torch.zeros(2, m, dtype=torch.float64),
        phi=torch.rand(2, m, generator=g, dtype=torch.float64) * TWO_PI,
        out_phase=torch.rand(2, n, generator=g, dtype=torch.float64) * TWO_PI,
        n=n,
    )
    out = mesh.mesh_matrix(bar, loss_db_per_mzi=loss_db)
    counts = [n] * n
    counts[0], counts[-1] = (n // 2, n // 2) if n % 2 == 0 else ((n + 1) // 2, (n - 1) // 2)
    expected = torch.tensor([eta**c for c in counts], dtype=torch.float64).expand(2, n)
    torch.testing.assert_close(torch.diagonal(out, dim1=-2, dim2=-1).abs(), expected, rtol=0, atol=1e-12)
    assert (out - torch.diag_embed(torch.diagonal(out, dim1=-2, dim2=-1))).abs().max().item() < 1e-15


def test_insertion_loss_bounds_on_random_mesh() -> None:
    """Even N: every even column covers all modes (scale eta), odd columns leave the edges at 1, so all
    singular values of the lossy mesh lie in [eta^N, eta^(N/2)]; without loss they are all 1."""
    n, loss_db = 8, 0.3
    eta = 10.0 ** (-loss_db / 20.0)
    phases = mesh.clements_decompose(haar_unitaries(4, n, seed=2))
    s_lossless = torch.linalg.svdvals(mesh.mesh_matrix(phases))
    torch.testing.assert_close(s_lossless, torch.ones_like(s_lossless))
    s = torch.linalg.svdvals(mesh.mesh_matrix(phases, loss_db_per_mzi=loss_db))
    assert s.min().item() >= eta**n - 1e-12
    assert s.max().item() <= eta ** (n // 2) + 1e-12
    assert s.max().item() < 1.0 and s.min().item() < eta ** (n // 2) - 1e-3, "loss is not uniform"


# ----------------------------------------------------------------------------- scale


def test_decompose_64_tiles_of_64() -> None:
    w = torch.randn(64, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tile = mesh.decompose_matrix(w)
    assert tile.u.theta.shape == (64, 2016)
    assert (mesh.compose_matrix(tile) - w).abs().max().item() < 1e-6
