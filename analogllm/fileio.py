"""Atomic outputs: readers see the old file or folder, or the whole new one, never a half-written one.

Every artefact analogllm writes (checkpoints, maps, adapters, reports, caches) is built under a
temporary name beside its destination and renamed into place: a rename within one directory is
atomic, so a crash, a full disk or Ctrl-C leaves no partial output, and concurrent processes (ranks
of one ``accelerate`` job) never read a torn cache entry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would otherwise become the file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes ``path``.

    An existing ``path`` is replaced only once the new folder is complete; with ``keep_existing``
    (caches) a folder that another process finished first is kept and the new one discarded. On any
    error the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become the folder's mode
        yield tmp
        if keep_existing:
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.is_dir():
                    raise
        elif path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """Root of analogllm's on-disk cache: ``$ANALOGLLM_CACHE``, else ``~/.cache/analogllm``.

    Read on every call (not at import) so that tests and scripts can redirect it with an
    environment variable at any time. The directory is created only when something is written.
    """
    return Path(os.environ.get("ANALOGLLM_CACHE") or "~/.cache/analogllm").expanduser()
