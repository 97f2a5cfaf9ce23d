"""Hadamard rotations: orthogonal transforms that spread activation outliers over all channels.

An orthogonal matrix ``R`` leaves a matmul unchanged when the weight absorbs its inverse,
``(x R)(W R)ᵀ = x Wᵀ``, but it reshapes the input distribution: a vector with a few huge channels
becomes one whose channels are all about its RMS (QuaRot, Ashkboos et al. 2024). A static DAC range
then resolves every token's bulk instead of being set by its outliers.

A Hadamard matrix ``H`` (entries ±1, ``H Hᵀ = n I``) divided by √n is such a rotation, and it can be
applied in O(n log n): the fast Walsh–Hadamard transform (FWHT) for the power-of-two factor and one
small dense product for the rest. Orders that are not a power of two come from Kronecker products
``H_m ⊗ H_{2^k}`` with ``H_m`` from Paley's constructions (m = q + 1 for a prime q ≡ 3 mod 4,
m = 2(q + 1) for a prime q ≡ 1 mod 4): 576 = 36 · 16, 1536 = 12 · 128, 2304 = 36 · 64, 5632 = 44 · 128.
A random ±1 diagonal in front (a *randomised* Hadamard transform) keeps outliers that happen to line up
with Hadamard rows from staying concentrated. :func:`rotation` returns such a transform for any order
it can build and ``None`` otherwise, so callers can fall back to a dense random orthogonal matrix.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

#: elements of a weight that :meth:`Rotation.exact` transforms at a time
_BLOCK = 1 << 20


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) with χ the quadratic character of the integers mod the prime q."""
    squares = torch.zeros(q, dtype=torch.long)
    squares[(torch.arange(1, q) ** 2) % q] = 1
    chi = torch.where(squares.bool(), 1, -1)
    chi[0] = 0
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Paley's first or second construction, or None."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: H = I + S, S skew with first row (0, 1, …, 1)
        s = torch.zeros(m, m, dtype=torch.long)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return torch.eye(m, dtype=torch.long) + s
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II: symmetric conference matrix C, then C ⊗ H2 + I ⊗ D
            c = torch.zeros(m // 2, m // 2, dtype=torch.long)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(q)
            h2 = torch.tensor([[1, 1], [1, -1]])
            d = torch.tensor([[1, -1], [-1, -1]])
            return torch.kron(c, h2) + torch.kron(torch.eye(m // 2, dtype=torch.long), d)
    return None


@lru_cache(maxsize=None)
def factor(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m · 2^k and a Hadamard matrix of order m known (m = 1, or Paley), largest 2^k
    first; None when no such split exists."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # the power of two dividing n
    for j in range(k, -1, -1):
        m = n >> j
        if m in (1, 2) or _paley(m) is not None:
            return m, 1 << j
    return None


@lru_cache(maxsize=None)
def _small(m: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.long) if m == 1 else (torch.tensor([[1, 1], [1, -1]]) if m == 2 else _paley(m))
    assert h is not None
    return h.to(torch.float64)


def hadamard_matrix(n: int) -> torch.Tensor:
    """The dense n × n Hadamard matrix that :func:`fwht` multiplies by (float64, entries ±1)."""
    split = factor(n)
    if split is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here (n = m·2^k with m = 1, 2 or a Paley order)")
    m, p = split
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < p:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    return torch.kron(_small(m), sylvester)


def fwht(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x @ H / √n (``transpose``: x @ Hᵀ / √n) along the last axis in O(n log n), H = H_m ⊗ H_{2^k}
    (:func:`hadamard_matrix`; only a Paley factor H_m is not symmetric)."""
    n = x.shape[-1]
    split = factor(n)
    if split is None:
        raise ValueError(f"no fast Hadamard transform of order {n}")
    m, p = split
    lead = x.shape[:-1]
    y = x.reshape(-1, m, p)
    h = 1
    while h < p:  # butterflies on the power-of-two factor
        y = y.view(-1, m, p // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:  # (H_m ⊗ H_p) acts on index i·p + j as H_m on i and H_p on j
        y = torch.einsum("ab,nbp->nap" if transpose else "ba,nbp->nap", _small(m).to(y.dtype).to(y.device), y)
    return (y * (1.0 / math.sqrt(n))).reshape(*lead, n)


class Rotation(torch.nn.Module):
    """A seeded orthogonal transform x ↦ x R of order n: a randomised Hadamard transform (signs, then
    :func:`fwht`) when the order allows it, else a dense random orthogonal matrix (O(n²) per token).

    ``matrix()`` gives R densely (float64) to fold into weights; ``forward`` applies it to activations
    (the *online* transform a chip's digital periphery runs before the DAC)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.n = n
        self.seed = seed
        self.fast = factor(n) is not None
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float32) * 2 - 1
        self.register_buffer("signs", signs)
        if not self.fast:
            self.register_buffer("dense", _haar(n, gen).to(torch.float32))

    def extra_repr(self) -> str:
        return f"n={self.n}, {'fast Hadamard' if self.fast else 'dense orthogonal'}"

    def matrix(self) -> torch.Tensor:
        """R as a dense float64 (n, n) matrix: x R = forward(x)."""
        gen = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, (self.n,), generator=gen).to(torch.float64) * 2 - 1
        if not self.fast:
            return _haar(self.n, gen)  # regenerated in float64 from the seed: the buffer is rounded
        return signs[:, None] * hadamard_matrix(self.n) / math.sqrt(self.n)

    def macs_per_token(self) -> int:
        """Digital work of one online application: n·log2(n)-ish adds for the fast form, n² MACs dense."""
        if not self.fast:
            return self.n * self.n
        m, p = factor(self.n)  # type: ignore[misc]
        return self.n * (int(math.log2(p)) + m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return x @ self.dense.to(x.dtype)
        return fwht(x * self.signs.to(x.dtype))

    def exact(self, x: torch.Tensor, transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """x R (``transpose``: x Rᵀ) computed in float64, to fold into weights, written into ``out`` (any
        dtype, may be ``x`` itself) or returned in float64. The fast transform where the order
        has one (O(n log n) per row: rotating a 2048 × 8192 weight costs 0.2 G operations instead of a
        275 GFLOP dense product), else the dense matrix regenerated in float64. Rows go :data:`_BLOCK`
        elements at a time: the butterflies' float64 temporaries of a whole large weight would be ten
        times its size."""
        if out is None:
            out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
        elif not out.is_contiguous():  # a transposed view (GPT-2's Conv1D weights): rows are not rows there
            return out.copy_(self.exact(x, transpose))
        rows, dest = x.reshape(-1, self.n), out.view(-1, self.n)
        q = None if self.fast else self.matrix().to(x.device)
        signs = self.signs.to(x.device, torch.float64)
        step = max(1, _BLOCK // self.n)
        for start in range(0, rows.shape[0], step):
            block = rows[start:start + step].double()
            if q is not None:
                block = block @ (q.T if transpose else q)
            else:
                block = fwht(block, transpose=True) * signs if transpose else fwht(block * signs)
            dest[start:start + step] = block
        return out

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x ↦ x Rᵀ, undoing :meth:`forward` (R is orthogonal)."""
        if not self.fast:
            return x @ self.dense.to(x.dtype).T
        return fwht(x, transpose=True) * self.signs.to(x.dtype)


def _haar(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random n × n orthogonal matrix (float64) from the QR decomposition of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded n × n orthogonal matrix (float64): the fused residual rotation, where speed does not
    matter because it is folded into the weights once. A randomised Hadamard when the order allows it
    (as QuaRot), else Haar-random from a QR decomposition."""
    return Rotation(n, seed).matrix()


__all__ = ["Rotation", "factor", "fwht", "hadamard_matrix", "random_orthogonal"]
