"""The fused CPU kernel of the chip read (``read_kernel.c``): building it, loading it, calling it.

Why C: after the tile matmuls a read makes about ten passes over the (tiles × tokens × outputs) tile
outputs in eager torch, and drawing the read noise is as costly as the rest together. The kernel does
IR drop, noise (Philox-4x32-10, the same numbers as :mod:`analogllm.ops.philox`), nonlinearity, the ADC
with its static errors and the sum over tiles in one vectorised pass on torch's own OpenMP threads (the
IR drop's two extra tile matmuls stay in torch).

It is compiled on first use with the system C compiler (``$CC``, which may carry arguments such as
``ccache gcc``, else ``cc``/``gcc``/``clang``) into ``$ANALOGLLM_CACHE/kernels`` (default
``~/.cache/analogllm``), keyed by the source, the flags, the compiler and the CPU, written atomically and
loaded with ctypes. Every way this can fail (no compiler, a compiler that errors or hangs, an unwritable
cache, a library that does not load) is caught and reported once as a warning; reads then run the
torch reference of :mod:`analogllm.ops.read`, which gives the same results. ``ANALOGLLM_KERNEL=0``
switches the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from analogllm.fileio import cache_dir

_SOURCE = Path(__file__).with_name("read_kernel.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
_TIMEOUT = 120  # seconds for one compiler run; a hung compiler must not hang the first forward
_ROWS_PER_THREAD = 16  # fewer rows per thread: the hand-off costs more than it saves
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's flags (Linux) or its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` split like a shell would (``ccache gcc`` is two words), else the
    first of cc, gcc, clang on the PATH; None when there is none."""
    env = os.environ.get("CC")
    if env:
        words = shlex.split(env)
        return words if words and shutil.which(words[0]) else None
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


class BuildError(RuntimeError):
    """The kernel could not be built or loaded; the message says why."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{' '.join(cmd[:2])} did not finish within {_TIMEOUT} s") from None
    except OSError as exc:
        raise BuildError(f"cannot run {cmd[0]}: {exc}") from None


def build() -> Path:
    """Compile the kernel into the cache (if not there yet) and return the library's path."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (set CC or install cc/gcc/clang)")
    version = _run([*cc, "--version"]).stdout
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), " ".join(cc).encode(), version.encode(),
                                     _cpu_id().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"read-{key}{'.dll' if sys.platform == 'win32' else '.so'}"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".read-", suffix=target.suffix)
    except OSError as exc:
        raise BuildError(f"cannot write the kernel cache {target.parent}: {exc}") from None
    os.close(fd)
    try:
        # with OpenMP (torch's own libgomp is already loaded, so the kernel shares its threads), else without
        errors = []
        for flags in ([*_FLAGS, "-fopenmp"], [*_FLAGS, "-fopenmp-simd"]):
            done = _run([*cc, *flags, str(_SOURCE), "-o", tmp, "-lm"])
            if done.returncode == 0:
                break
            errors.append(done.stderr[-1500:])
        else:
            raise BuildError(f"{' '.join(cc)} failed:\n{errors[-1]}")
        os.replace(tmp, target)  # atomic: concurrent processes never load a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BuildError(f"cannot load {path}: {exc}") from None
    f32, i64, u64, vp, ci = ctypes.c_float, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
    lib.analogllm_read.argtypes = [vp, vp, i64, i64, i64, ci, vp, vp, f32, f32, ci, u64, f32, vp, vp, vp, vp, vp, vp,
                                   vp, vp, f32, vp, vp]
    lib.analogllm_read.restype = i64
    lib.analogllm_dac.argtypes = [vp, vp, vp, i64, i64, i64, i64, vp, ci, f32, f32, ci]
    lib.analogllm_dac.restype = None
    lib.analogllm_dac_backward.argtypes = [vp, vp, i64, i64, f32, vp, vp, vp, i64, i64, i64, i64, vp, ci, f32, f32, ci]
    lib.analogllm_dac_backward.restype = None
    lib.analogllm_adc_grad.argtypes = [vp, vp, vp, i64, i64, i64, ci]
    lib.analogllm_adc_grad.restype = None
    lib.analogllm_normals.argtypes = [vp, i64, i64, i64, u64]
    lib.analogllm_normals.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None when it is switched off or cannot be had (warned once, with why)."""
    global _lib
    if os.environ.get("ANALOGLLM_KERNEL", "1") == "0":
        return None
    if _lib is None:
        try:
            _lib = _load(build())
        except BuildError as exc:
            warnings.warn(f"analogllm: fused read kernel unavailable ({exc}); reads use the torch reference.",
                          RuntimeWarning, stacklevel=2)
            _lib = False
    return _lib or None


def reset() -> None:
    """Forget the loaded kernel (the next read tries again): for tests and changed environments."""
    global _lib
    _lib = None


def normals(tiles: int, rows: int, outputs: int, key: int) -> torch.Tensor:
    """The kernel's (tiles, rows, outputs) read normals under ``key`` (for tests and statistics)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the fused read kernel is not available (no C compiler, or ANALOGLLM_KERNEL=0)")
    out = torch.empty(tiles, rows, outputs)
    lib.analogllm_normals(out.data_ptr(), tiles, rows, outputs, key & ((1 << 64) - 1))
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for ctypes, None (NULL) for an absent one."""
    return None if t is None else t.data_ptr()


def _threads(rows: int) -> int:
    return max(1, min(torch.get_num_threads(), rows // _ROWS_PER_THREAD))


def dac(x: torch.Tensor, r: torch.Tensor, step: float | None, tiles: int, rows: int,
        need_usq: bool, inl: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The DAC of a read for ``x`` (N, in): normalised, clipped, quantised inputs as (T, N, rows) tiles
    (zero-padded), with the level error ``inl``·u(1 − u²) of a nonlinear DAC (0: none), and Σ u² per
    tile and row (T, N) when ``need_usq``."""
    lib = library()
    assert lib is not None
    x = x.detach().contiguous()
    n, n_in = x.shape
    r = r.detach().reshape(-1).contiguous().float()
    u = torch.empty(n, tiles * rows, dtype=x.dtype)
    usq = torch.empty(tiles, n, dtype=x.dtype) if need_usq else None
    lib.analogllm_dac(x.data_ptr(), u.data_ptr(), _ptr(usq), n, n_in, tiles, rows,
                      r.data_ptr(), int(r.numel() > 1), step or 0.0, inl, _threads(n))
    return u.view(n, tiles, rows).transpose(0, 1), usq


def dac_backward(x: torch.Tensor, grad_u: torch.Tensor, gscale: float, r: torch.Tensor, step: float | None,
                 tiles: int, rows: int, inl: float, need_x: bool, need_r: bool, need_u: bool,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The DAC's share of a read's backward in one pass (see ``analogllm_dac_backward``): for the
    gradient ``gscale``·``grad_u`` at the DAC outputs, dense (N, in) or tiled (T, N, rows), returns the
    gradient of ``x`` (N, in), the range's derivative per row (N,) and the inputs the weights saw, u·r, as
    (T, N, rows) tiles (zero-padded), each only when asked for."""
    lib = library()
    assert lib is not None
    x = x.detach().contiguous()
    n, n_in = x.shape
    grad_u = grad_u.contiguous()
    ts, ns = (n * rows, rows) if grad_u.dim() == 3 else (rows, n_in)  # tiled (T, N, rows) or dense (N, in)
    r = r.detach().reshape(-1).contiguous().float()
    gx = torch.empty_like(x) if need_x else None
    gr = torch.empty(n, dtype=x.dtype) if need_r else None
    ur = torch.empty(n, tiles * rows, dtype=x.dtype) if need_u else None
    lib.analogllm_dac_backward(x.data_ptr(), grad_u.data_ptr(), ts, ns, gscale, _ptr(gx), _ptr(gr), _ptr(ur), n, n_in,
                               tiles, rows, r.data_ptr(), int(r.numel() > 1), step or 0.0, inl, _threads(n))
    return gx, gr, None if ur is None else ur.view(n, tiles, rows).transpose(0, 1)


def adc_grad(g: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """Σ_n g[n, o] · resid[t, n, o] per tile column (T, O) for a read's gradient ``g`` (N, O) and its ADC
    derivative ``resid`` (T, N, O) (see ``analogllm_adc_grad``), without (T, N, O) temporaries."""
    lib = library()
    assert lib is not None
    g, resid = g.contiguous(), resid.contiguous()
    t, n, o = resid.shape
    out = torch.empty(t, o, dtype=g.dtype)
    lib.analogllm_adc_grad(g.data_ptr(), resid.data_ptr(), out.data_ptr(), t, n, o,
                           max(1, min(torch.get_num_threads(), t * -(-o // 64))))
    return out


def read(y: torch.Tensor, scale: torch.Tensor, *, usq: torch.Tensor | None, rv: torch.Tensor | None,
         shot2: float, const_var: float, key: int, sat: float | None,
         adc: tuple[torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None, need_gate: bool,
         need_resid: bool, ir: tuple[torch.Tensor, torch.Tensor, float] | None = None,
         adc_errors: tuple[torch.Tensor, torch.Tensor] | None = None,
         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """Σ_t ADC(errors(nonlinearity(y_t − IR drop + noise))) · scale_t (+ bias) for tile outputs ``y``
    (T, N, O); returns (out, gate, resid, clipped): the straight-through gate (T, N, O) when
    ``need_gate`` and a nonlinearity or ADC is on (float with a nonlinearity, else the ADC's inside mask as bool), the ADC-range derivative when ``need_resid``, and the
    number of saturated outputs. scale (T, O); usq (T, N) and rv (T, O) give the read-noise variance
    usq·rv; shot2 the variance per unit |y|; const_var the output and thermal variance; adc (bound,
    1/step) per tile or None; ir (column loads (T, N, O), position-weighted products (T, N, O), ρ·rows)
    or None; adc_errors (gain, offset in normalised units), (T, O) each, or None. All float32."""
    lib = library()
    assert lib is not None
    t, n, o = y.shape
    y = y.contiguous()
    scale = scale.reshape(t, o).contiguous()
    if usq is not None:
        usq, rv = usq.reshape(t, n).contiguous(), rv.reshape(t, o).contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    noise = usq is not None or shot2 > 0 or const_var > 0
    out = torch.empty(n, o, dtype=y.dtype)
    # the gate: the nonlinearity's derivative (float), or the ADC's inside mask alone (bool: a quarter the memory)
    gate = (torch.empty_like(y, dtype=y.dtype if sat else torch.bool) if need_gate and (sat or adc is not None)
            else None)
    resid = torch.empty_like(y) if need_resid and adc is not None else None
    bound, inv_step = (adc[0].contiguous(), adc[1].contiguous()) if adc is not None else (None, None)
    cur = yd = None
    irk = 0.0
    if ir is not None:
        cur, yd, irk = ir[0].contiguous(), ir[1].contiguous(), float(ir[2])
    again = aoff = None
    if adc_errors is not None and adc is not None:
        again, aoff = adc_errors[0].reshape(t, o).contiguous(), adc_errors[1].reshape(t, o).contiguous()
    clipped = lib.analogllm_read(_ptr(y), _ptr(out), t, n, o, _threads(n), _ptr(usq), _ptr(rv), shot2, const_var,
                                 int(noise), key & ((1 << 64) - 1), sat or 0.0, _ptr(bound), _ptr(inv_step),
                                 _ptr(scale), _ptr(bias), _ptr(gate), _ptr(resid), _ptr(cur), _ptr(yd), irk, _ptr(again),
                                 _ptr(aoff))
    if clipped < 0:
        raise MemoryError("the fused read kernel could not allocate its scratch rows")
    return out, gate, resid, int(clipped)


__all__ = ["BuildError", "adc_grad", "build", "compiler", "dac", "dac_backward", "library", "normals", "read", "reset"]
