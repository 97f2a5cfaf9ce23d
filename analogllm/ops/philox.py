"""Counter-based Gaussian noise: Philox-4x32-10 (Salmon et al., SC 2011) and Box–Muller, in torch.

A read of the chip needs one fresh normal per tile output, and the same read must give the same numbers
whichever code computes it: this torch implementation (on any device), or the fused CPU kernel
(``read_kernel.c``), which implements the very same function. A sample is a pure function of a 64-bit
key and its position, so no generator state is shared between threads, the split over threads never
changes a number, and a key drawn once per read reproduces the read exactly.

Layout: the normal of tile ``t``, row ``n``, output ``o`` in stream ``s`` is word ``o % 4`` of the
Box–Muller transform of ``Philox(counter = (o // 4, n, t, s), key)``; words 0–1 and 2–3 are the two
uniform pairs, ``u1 = (w_a >> 8 + 1)·2⁻²⁴ ∈ (0, 1]`` and ``u2 = (w_b >> 8)·2⁻²⁴``, giving
``√(−2 ln u1)·(cos, sin)(2π u2)``. Its tails end at 5.77σ (probability 8·10⁻⁹), a 24-bit uniform's limit.

Integer arithmetic runs on int64 tensors holding 32-bit values: a 32 × 32-bit product fits in 64 bits
modulo 2⁶⁴, which is exactly how int64 multiplication wraps.
"""

from __future__ import annotations

import math

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF
ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = b * a
    return (p >> 32) & _MASK, p & _MASK


def philox(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int | torch.Tensor,
           k1: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 of the counters (broadcastable int64 tensors of 32-bit values) under key (k0, k1),
    Python ints or int64 tensors (a key on the device keeps the computation free of host syncs)."""
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def split_key(key: int) -> tuple[int, int]:
    key &= (1 << 64) - 1
    return key & _MASK, key >> 32


def normals(key: int | torch.Tensor, tiles: int, rows: int, outputs: int, stream: int = 0,
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (tiles, rows, outputs) standard normals of one read under ``key``: a 64-bit int, or an int64
    tensor of its two 32-bit halves (low, high), e.g. drawn on the device (see the module docstring)."""
    k0, k1 = split_key(key) if isinstance(key, int) else (key[0], key[1])
    groups = -(-outputs // 4)
    kw = dict(dtype=torch.int64, device=device)
    c0 = torch.arange(groups, **kw).view(1, 1, groups)
    c1 = torch.arange(rows, **kw).view(1, rows, 1)
    c2 = torch.arange(tiles, **kw).view(tiles, 1, 1)
    c3 = torch.full((1, 1, 1), stream, **kw)
    w = philox(c0, c1, c2, c3, k0, k1)
    w = [v.expand(tiles, rows, groups) for v in w]
    z = torch.empty(tiles, rows, groups, 4, dtype=torch.float32, device=device)
    for pair, (a, b) in enumerate(((w[0], w[1]), (w[2], w[3]))):
        u1 = ((a >> 8) + 1).to(torch.float32) * (1.0 / 16777216.0)
        u2 = (b >> 8).to(torch.float32) * (1.0 / 16777216.0)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        z[..., 2 * pair] = radius * torch.cos(angle)
        z[..., 2 * pair + 1] = radius * torch.sin(angle)
    return z.reshape(tiles, rows, groups * 4)[..., :outputs].to(dtype)


__all__ = ["ROUNDS", "normals", "philox", "split_key"]
