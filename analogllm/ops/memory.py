"""Handing freed memory back to the operating system between the layers of a long job.

glibc keeps freed heap memory for reuse, and once large blocks have been freed its mmap threshold
grows (up to 32 MiB), so it serves even multi-megabyte tensors from the heap; a heap page goes back to
the OS only when everything above it is free. A layer-by-layer job (deploy, a streamed load, an export)
frees hundreds of MiB of temporaries per layer, so without a trim the resident size stays at the
footprint of what was freed: measured on SmolLM2-135M, 1,526 MiB resident after ``deploy_`` instead of
956 MiB. ``malloc_trim(0)`` releases every free heap page; without glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def return_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc), so the resident size tracks what is live."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


__all__ = ["return_freed_memory"]
