"""Gaussian noise for the chip: parallel, reproducible streams, drawn while the matmul runs on CPU.

An analogue forward needs one fresh normal sample per output element and tile (read noise, output
noise, training noise): as many random numbers as the matmul has outputs, and programming a chip
needs several per device. On CPU ``torch.randn`` runs on one core (one Mersenne-Twister stream), and
for a (1024 × 3072) output it costs about 40 % of the matmul. Here a large tensor is cut into chunks of
2^18 samples, each filled by its own generator seeded from the caller's generator, on a pool of
intra-op threads; a layer starts them *before* its matmul so that they overlap it (measured: +6 ms on
a 27 ms matmul instead of +12 ms for ``torch.randn`` after it, 2 cores). The scaling by the noise's
std stays on the calling thread: per-element variances computed on the workers slowed the matmul
more than they saved. The cut depends only on the size, so a seed gives the same samples on any
machine and thread count, exactly as Gaussian as ``torch.randn``. On accelerators the device's own
(parallel) generator is used directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

STREAM = 1 << 18  # samples per generator stream; below this the thread hand-off costs more than it saves
_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    """One pool per process and width (a forked child must not reuse its parent's dead threads)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
        if _pool is not None and _pool[0] == os.getpid():
            _pool[2].shutdown(wait=False)
        _pool = (os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="analogllm-noise"))
    return _pool[2]


class PendingNoise:
    """Standard normal samples being generated; :meth:`wait` returns them."""

    def __init__(self, out: torch.Tensor, futures: list[Future]) -> None:
        self._out, self._futures = out, futures

    def wait(self) -> torch.Tensor:
        for f in self._futures:
            f.result()
        return self._out


def gaussian(shape: tuple[int, ...] | torch.Size, like: torch.Tensor, generator: torch.Generator | None = None) -> PendingNoise:
    """Start drawing standard normal samples of ``shape`` with ``like``'s dtype and device.

    On CPU the split into streams depends only on the size, never on the thread count, so a given
    generator state gives the same samples on any machine (same chip instance for the same seed)."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    if like.device.type != "cpu":
        return PendingNoise(out.normal_(generator=generator), [])
    seeds = stream_seeds(out.numel(), generator)
    if seeds is None:
        return PendingNoise(out.normal_(generator=generator), [])
    return _fill_streams(out, seeds)


def stream_seeds(numel: int, generator: torch.Generator | None) -> list[int] | None:
    """The seeds of the streams :func:`gaussian` cuts a CPU draw of ``numel`` samples into (one per
    :data:`STREAM` samples, drawn from ``generator``), or None when the draw is one stream of
    ``generator`` itself. Taking the seeds first lets a caller draw the samples block by block:
    :func:`gaussian_block` gives any stream-aligned block of them, bit for bit."""
    chunks = -(-numel // STREAM)
    if chunks < 2:
        return None
    return torch.randint(0, 2**62, (chunks,), generator=generator).tolist()


def gaussian_block(like: torch.Tensor, seeds: list[int] | None, first: int,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Samples ``first`` … ``first + like.numel()`` of the draw whose streams are ``seeds``
    (:func:`stream_seeds`), shaped like ``like``; ``first`` is a multiple of :data:`STREAM`. With
    ``seeds`` None the block is the whole draw, taken from ``generator``."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    if seeds is None:
        return out.normal_(generator=generator)
    if first % STREAM:
        raise ValueError(f"a block of streamed samples starts at a multiple of {STREAM}, not at {first}")
    lo = first // STREAM
    return _fill_streams(out, seeds[lo:lo - (-out.numel() // STREAM)]).wait()


def _fill_streams(out: torch.Tensor, seeds: list[int]) -> PendingNoise:
    """Fill the contiguous ``out`` with one stream of :data:`STREAM` samples per seed, on the thread pool."""
    parts = out.view(-1).split(STREAM)
    workers = torch.get_num_threads()
    if workers < 2:
        for part, seed in zip(parts, seeds, strict=True):
            _fill(part, seed)
        return PendingNoise(out, [])
    pool = _executor(workers)
    return PendingNoise(out, [pool.submit(_fill, part, seed) for part, seed in zip(parts, seeds, strict=True)])


def _fill(part: torch.Tensor, seed: int) -> None:
    part.normal_(generator=torch.Generator().manual_seed(seed))


@contextmanager
def seeded(seed: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block on the global random streams seeded with ``seed`` (the CPU's, and ``device``'s when
    it is a GPU) and restore them afterwards, so a seeded step neither depends on nor shifts the
    caller's streams. ``seed=None`` leaves the streams untouched."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
