"""Measured low-rank correction: a digital side path that cancels a programmed chip's weight error where
the layer's inputs live.

Programming is done once, but the error it leaves keeps changing: every device drifts with its own
exponent, so after a day or a year the weights a chip holds are off by far more than closed-loop
programming left (on PCM the exponent spread alone is a third of a small weight after a year), and no
gain per layer or column undoes that. Rewriting the arrays is slow and wears the devices. Reading them is
not: each time the chip is brought to a new age it reads every device once (the read its program-and-
verify already does) and knows E = W − Ŵ, the model's weights less the weights it holds. A rank-k
digital path y += B·(A·x) after the ADCs then cancels E where it matters: the A, B that minimise the
expected output error E‖(E − BA)·x‖² over the layer's inputs, whose second moment H = L·Lᵀ the mapping
stored (:class:`~analogllm.chip.compensate.InputMoment`), are the truncated SVD U·S·Vᵀ of E·L with
B = U·S and A = Vᵀ·L⁻¹ (without a moment, H = I: the plain truncated SVD of E).

That read carries the devices' read noise (1/f noise: averaging reads lowers it far less than √n, so one
read is the default, as for closed-loop programming's verify reads). The chip knows its devices'
read-noise statistics but not the noise, so every kept direction is shrunk by its Wiener factor
(S² − N²)/S², N the same-rank singular value of a noise-only read drawn from those statistics: a
direction the noise dominates (the programming error that closed-loop programming already cancelled) is
dropped, one that drift dominates is kept nearly whole.
A device model without read noise (the photonic mesh: its read is a measurement of the mesh's transfer
matrix, which the model does not give a noise) is read exactly: an upper bound for such chips.

Cost: k·(in + out) digital MACs per token and matrix (9 % of SmolLM2's analogue MACs at k = 32) and one
read of every device each time the chip is recalibrated. Measured on SmolLM2-135M (pcm + IR drop, the
recipes' training-free mapping, 3 chips × 32 Shakespeare blocks; docs/mapping.md): rank 32 from one read
gives 1.58× / 2.01× / 2.56× digital perplexity at 0 s / 1 day / 1 year against 1.68× / 2.54× / 5.32×
without.
"""

from __future__ import annotations

import torch

from analogllm.chip.compensate import InputMoment
from analogllm.chip.state import Programmed, chip_generator, stable_id
from analogllm.config import AnalogConfig

#: stream of the correction's device reads, apart from the devices' own draws and the verify reads
CORRECTION_STREAM = stable_id("correction reads")


def read_error(state: Programmed, weight: torch.Tensor, reads: int, generator: torch.Generator,
               read: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W less what one averaged read of every device of ``state`` measures, (E, out, in); a noise-only
    read drawn from the same statistics, or None without read noise). ``weight`` is (E, out, in). With
    ``read=False`` the state is itself a measurement (a chip read back) and is taken as it is."""
    in_features = weight.shape[-1]
    if state.read_var is None:
        return weight - state.dense(in_features), None
    std = (state.read_var / reads).sqrt()
    std = std.unsqueeze(-2) if std.dim() == 3 else std  # one variance per tile column, or per device
    measured = state
    if read:
        noise = std * torch.randn(state.tiles.shape, generator=generator)
        measured = Programmed(tiles=state.tiles + noise, scale=state.scale, read_var=None, gain=state.gain)
    twin = Programmed(tiles=std * torch.randn(state.tiles.shape, generator=generator), scale=state.scale,
                      read_var=None, gain=state.gain)
    return weight - measured.dense(in_features), twin.dense(in_features)


def top_svd(m: torch.Tensor, rank: int, generator: torch.Generator,
            iters: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets (U, S, Vᵀ) of ``m``: a randomised range finder with
    ``iters`` power iterations (Halko et al. 2011) drawing from ``generator``, so a chip stays a function of
    its seed; the full SVD where the sketch would not be much smaller. On SmolLM2 (whose weighted errors
    have a few strong directions) 4 s per chip instance against 16 s for the full SVDs."""
    sketch = min(rank + 16, *m.shape)
    if 2 * sketch > min(m.shape):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    y = m @ torch.randn(m.shape[1], sketch, generator=generator)
    for _ in range(iters):
        y = m @ (m.T @ torch.linalg.qr(y).Q)
    q = torch.linalg.qr(y).Q
    u, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh[:rank]


def low_rank(error: torch.Tensor, noise: torch.Tensor | None, chol: torch.Tensor | None, rank: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) with B·A the best rank-``rank`` approximation of ``error`` (out, in)
    in the metric ‖·L‖ (``chol`` = L, or None for the plain one), each direction shrunk by its Wiener
    factor against the singular values of ``noise`` (what the measurement's noise alone would give)."""
    u, s, vh = top_svd(error if chol is None else error @ chol, rank, generator)
    if noise is not None:
        n = top_svd(noise if chol is None else noise @ chol, rank, generator)[1]
        s = (s - n.square() / s.clamp(min=1e-30)).clamp(min=0.0)
    a = vh if chol is None else torch.linalg.solve_triangular(chol, vh, upper=False, left=False)
    return a, u * s


@torch.no_grad()
def measured_correction(config: AnalogConfig, weight: torch.Tensor, state: Programmed, moment: InputMoment | None,
                        seed: int, uid: int, seconds: float, read: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The correction (A (E, k, in), B (E, out, k)) chip instance ``seed`` of matrix ``uid`` measures at
    ``seconds`` after programming, for the model weight ``weight`` ((out, in) or (E, out, in)), with
    k = ``config.mapping.correction_rank``. Expert stacks use H = I (no moment is stored per expert).
    ``read=False``: ``state`` is a measured chip, already the read the correction needs."""
    w = weight.detach().to("cpu", torch.float32)
    w = w.unsqueeze(0) if w.dim() == 2 else w
    rank = min(config.mapping.correction_rank, *w.shape[-2:])
    generator = chip_generator(seed, uid ^ CORRECTION_STREAM ^ stable_id(f"{float(seconds)!r}"))
    error, noise = read_error(state, w, config.mapping.correction_reads, generator, read)
    chol = moment.cholesky() if moment is not None and w.shape[0] == 1 else None
    parts = [low_rank(error[e], None if noise is None else noise[e], chol, rank, generator) for e in range(w.shape[0])]
    return torch.stack([a for a, _ in parts]), torch.stack([b for _, b in parts])


def correction_macs(rank: int, in_features: int, out_features: int) -> int:
    """Digital MACs per token of a rank-``rank`` correction of an (out, in) matrix (a rank above the
    matrix's own is capped, as :func:`measured_correction` caps it)."""
    return min(rank, in_features, out_features) * (in_features + out_features)
