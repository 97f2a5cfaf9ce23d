"""The fused CPU read kernel (``read_kernel.c``): noise, nonlinearity, ADC and the sum over tiles of
one analogue read in a single pass, with its own parallel Gaussian generator.

Why C: after the matmul an eager read makes about ten passes over the (tiles × tokens × outputs)
tile outputs, and torch's CPU normal generator is serial (3.6 ns per sample). For SmolLM2 that
was half of the eval time. The kernel does it all in one vectorised pass and draws its normals
from a counter-based generator (0.7 ns per sample per core), on torch's OpenMP threads.

The kernel is compiled on first use with the system C compiler (``cc`` or ``$CC``) into a cache
directory (``$ANALOGLLM_CACHE``, default ``~/.cache/analogllm``), keyed by the source, the compiler
and the CPU, and loaded with ctypes. Without a compiler, or with ``ANALOGLLM_KERNEL=0``, reads run
on the eager torch path: the same distributions, other samples. Only reads use it: programming a
chip stays on torch's generator, so a seed gives the same chip on every machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("read_kernel.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
_ROWS_PER_THREAD = 16  # fewer rows per thread: the hand-off costs more than it saves
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def cache_dir() -> Path:
    return Path(os.environ.get("ANALOGLLM_CACHE") or Path.home() / ".cache" / "analogllm")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's flags (Linux) or its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(), _cpu_id().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"read-{key}{'.dll' if sys.platform == 'win32' else '.so'}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".read-", suffix=target.suffix)
        os.close(fd)
        try:
            # with OpenMP (torch's own libgomp is already loaded, so the kernel shares its threads), else without
            for flags in ([*_FLAGS, "-fopenmp"], [*_FLAGS, "-fopenmp-simd"]):
                done = subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                      text=True, timeout=300)
                if done.returncode == 0:
                    break
            else:
                warnings.warn(f"analogllm: could not compile the fused read kernel ({compiler}); reads use the "
                              f"slower torch path.\n{done.stderr[-1500:]}", RuntimeWarning, stacklevel=3)
                return None
            os.replace(tmp, target)  # atomic: concurrent processes never load a half-written library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    f32, i64, u64, vp = ctypes.c_float, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    lib.analogllm_read.argtypes = [vp, vp, i64, i64, i64, ctypes.c_int, vp, vp, f32, f32, ctypes.c_int, u64,
                                   f32, vp, vp, vp, vp, vp]
    lib.analogllm_read.restype = i64
    lib.analogllm_dac.argtypes = [vp, vp, vp, i64, i64, i64, i64, vp, ctypes.c_int, f32, ctypes.c_int]
    lib.analogllm_dac.restype = None
    lib.analogllm_normals.argtypes = [vp, i64, u64, u64]
    lib.analogllm_normals.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None when it is switched off, there is no C compiler, or it cannot be
    built (warned once)."""
    global _lib
    if os.environ.get("ANALOGLLM_KERNEL", "1") == "0":
        return None
    if _lib is None:
        try:
            _lib = _build() or False
        except (OSError, RuntimeError) as e:  # unwritable cache or no home directory, unloadable library
            warnings.warn(f"analogllm: fused read kernel unavailable ({e}); reads use the torch path.",
                          RuntimeWarning, stacklevel=2)
            _lib = False
    return _lib or None


def normals(n: int, row: int = 0, key: int = 0) -> torch.Tensor:
    """The first n standard normals of tile output row ``row`` under ``key``, as a read draws them."""
    lib = library()
    if lib is None:
        raise RuntimeError("the fused read kernel is not available (no C compiler, or ANALOGLLM_KERNEL=0)")
    out = torch.empty(n)
    lib.analogllm_normals(out.data_ptr(), n, row, key)
    return out


def _threads(rows: int) -> int:
    return max(1, min(torch.get_num_threads(), rows // _ROWS_PER_THREAD))


def dac(x: torch.Tensor, r: torch.Tensor, step: float | None, tiles: int, rows: int,
        need_usq: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The DAC of a read for ``x`` (N, in): normalised, clipped, quantised inputs as (T, N, rows) tiles
    (zero-padded), and Σ u² per tile and row (T, N) when ``need_usq``; eager ``_dac`` in one pass."""
    lib = library()
    assert lib is not None
    x = x.detach().contiguous()
    N, n_in = x.shape
    r = r.detach().reshape(-1).contiguous()
    u = torch.empty(N, tiles * rows, dtype=x.dtype)
    usq = torch.empty(tiles, N, dtype=x.dtype) if need_usq else None
    lib.analogllm_dac(x.data_ptr(), u.data_ptr(), None if usq is None else usq.data_ptr(), N, n_in, tiles, rows,
                      r.data_ptr(), int(r.numel() > 1), step or 0.0, _threads(N))
    return u.view(N, tiles, rows).transpose(0, 1), usq


def read(y: torch.Tensor, scale: torch.Tensor, *, usq: torch.Tensor | None, rv: torch.Tensor | None,
         shot2: float, const_var: float, sat: float | None, adc: tuple[torch.Tensor, torch.Tensor] | None,
         bias: torch.Tensor | None, need_gate: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_t ADC(nonlinearity(y_t + noise)) · scale_t (+ bias) for tile outputs ``y`` (T, N, O), and the
    straight-through gate (T, N, O) when ``need_gate`` and some output saturated or ``sat`` is set
    (None when it would be all ones, as in eager ``_converters``).

    scale (T, O): per tile-column multiplier after the ADC (step × tile scale × range × gain);
    usq (T, N) and rv (T, O): read-noise variance usq·rv; shot2: variance per unit |y| (detector shot
    noise); const_var: output and thermal noise variance; adc: (bound, 1 / step) per tile, (T,) each, or None. All float32. The
    read's key comes from torch's global generator, so ``torch.manual_seed`` reproduces a read."""
    lib = library()
    assert lib is not None
    T, N, O = y.shape
    y = y.contiguous()
    scale = scale.reshape(T, O).contiguous()
    if usq is not None:
        usq, rv = usq.reshape(T, N).contiguous(), rv.reshape(T, O).contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    noise = usq is not None or shot2 > 0 or const_var > 0
    key = int(torch.randint(0, 2**63 - 1, (1,)).item()) if noise else 0  # from the global RNG: seeds reproduce
    out = torch.empty(N, O, dtype=y.dtype)
    gate = torch.empty_like(y) if need_gate and (sat or adc is not None) else None
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    bound, inv_step = (adc[0].contiguous(), adc[1].contiguous()) if adc is not None else (None, None)
    threads = _threads(N)
    clipped = lib.analogllm_read(ptr(y), ptr(out), T, N, O, threads, ptr(usq), ptr(rv), shot2, const_var, int(noise),
                                 key, sat or 0.0, ptr(bound), ptr(inv_step), ptr(scale), ptr(bias), ptr(gate))
    if clipped < 0:
        raise MemoryError("the fused read kernel could not allocate its scratch rows")
    if gate is not None and not sat and clipped == 0:
        gate = None  # nothing saturated: every tile passes the gradient unchanged
    return out, gate
