"""The chip read: one analogue matmul as one ``torch.library`` custom op, ``analogllm::read``.

    x ─DAC(range r, INL)─► T input tiles u_t ─► y_t = u_t · tiles_t − IR drop   (normalised units)
      ─► + noise ─► nonlinearity ─► ADC gain/offset ─► ADC (range B_t) ─► Σ_t code_t · s_t · step_t · r · gain + bias

``tiles`` are the normalised weights the arrays hold (T, rows, out): the programmed chip's realised
weights, or, in hardware-aware training, the clipped digital weights (with the device's drift bias).
``scale`` are the tile-column scales s_t. Noise has the variance ``Σu²·read_var + shot·|y| + out_var``
per output (weight noise of variance v on every device is output noise of variance v·Σu², exactly),
drawn from Philox-4x32-10 under a per-read ``key`` (:mod:`analogllm.ops.philox`). The read-side
non-idealities of the periphery are part of the read: the DAC's integral nonlinearity (:func:`dac`), the
IR drop of the column wires (:func:`ir_drop_attenuation`) and the static gain and offset errors of every
column's ADC (``adc_gain``, ``adc_offset``: a chip's, drawn when it is programmed). Each is off at 0 /
None, and then the read is computed exactly as without it.

One definition, three implementations of it:

* the **reference** in torch, for every device (GPU included: no host syncs, no data-dependent control
  flow, so it runs under ``torch.compile`` and in CUDA graphs) and as the CPU fallback;
* the **CPU kernel** (:mod:`analogllm.ops.cpu`), the same arithmetic and the same Philox numbers fused
  into one vectorised pass (normals agree to ~1e-6, so codes agree except at rounding ties);
* a **fake** kernel giving output shapes, for ``torch.compile`` and meta tensors.

Gradients are straight-through (registered on the op): every rounding step passes the gradient, every
saturation stops it (the ``gate``), so backward is ``nn.Linear``'s two matmuls when nothing saturated.
The DAC range r gets the LSQ derivative Σ g_u·(Q(x/r) − (x/r)·1[|x| ≤ r]) / r, an ADC range B_t the
derivative of its codes (``resid``: sign(y) where saturated, (Q − y)/B inside). In training the op also
takes the digital ``weight`` (and its clipping bound) purely to give it its gradient. The static ADC gain
errors are a fixed linear factor of the chip, like its realised weights, so the backward includes them;
the DAC nonlinearity passes the gradient like its rounding (the inputs the weights saw, INL included,
give the weight gradient), and the IR drop passes it straight through, like the noise.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from analogllm.ops import cpu
from analogllm.ops.philox import normals

_EMPTY = ()


def dac_step(bits: int) -> float | None:
    """Step of a signed DAC on [−1, 1] (2^(bits−1) − 1 levels per sign); ``bits`` 0 = no quantisation."""
    return 1.0 / (2 ** (bits - 1) - 1) if bits else None


def adc_steps(adc_range: Tensor, bits: int) -> Tensor:
    """The ADC step of every tile: 2·B / (2^bits − 2) (aihwkit's convention)."""
    return adc_range * (2.0 / (2**bits - 2))


def tile_mm(a: Tensor, b: Tensor) -> Tensor:
    """(T, N, K) @ (T, K, M) → (T, N, M). torch's CPU bmm hands whole tiles to threads, so a tile count
    the threads do not divide leaves cores idle (3 tiles on 2 threads: 25 % slower than three
    multithreaded mm); those run as T multithreaded mm into one buffer instead."""
    tiles = a.shape[0]
    if tiles == 1:
        return torch.mm(a[0], b[0]).unsqueeze(0)
    if a.device.type != "cpu" or tiles % torch.get_num_threads() == 0:
        return torch.bmm(a, b)
    out = torch.empty(tiles, a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    for t in range(tiles):
        torch.mm(a[t], b[t], out=out[t])
    return out


def tile_input(u: Tensor, tiles: int, rows: int) -> Tensor:
    """(N, in) → (T, N, rows): zero-padded and viewed per input tile."""
    pad = tiles * rows - u.shape[-1]
    if pad:
        u = F.pad(u, (0, pad))
    return u.view(u.shape[0], tiles, rows).transpose(0, 1)


def untile_input(g: Tensor, features: int) -> Tensor:
    """(T, N, rows) → (N, in): the inverse of :func:`tile_input` (padding dropped)."""
    return g.transpose(0, 1).reshape(g.shape[1], -1)[:, :features]


def tile_weight(weight: Tensor, tiles: int, rows: int) -> Tensor:
    """(..., out, in) → (..., T, out, rows), zero-padded."""
    pad = tiles * rows - weight.shape[-1]
    if pad:
        weight = F.pad(weight, (0, pad))
    return weight.reshape(*weight.shape[:-1], tiles, rows).movedim(-2, -3)


def untile_weight(w: Tensor, features: int) -> Tensor:
    """(..., T, out, rows) → (..., out, in): the inverse of :func:`tile_weight`."""
    return w.movedim(-3, -2).reshape(*w.shape[:-3], w.shape[-2], -1)[..., :features]


def dac_inl_coefficient(bits: int, inl: float) -> float:
    """k of a DAC's level error k·u(1 − u²): ``inl`` LSB at the bow's peak |u| = 1/√3 (0 without bits)."""
    step = dac_step(bits)
    return inl * step * 1.5 * math.sqrt(3.0) if step is not None and inl else 0.0


def dac(x: Tensor, r: Tensor, bits: int, inl: float = 0.0) -> Tensor:
    """Normalised DAC output Q(x/r) ∈ [−1, 1] (``r`` a scalar or one range per row, (N, 1)).

    ``inl`` (in LSB) is the DAC's integral nonlinearity as a smooth odd bow: the analogue level of code
    u is u + k·u(1 − u²), k = inl·LSB·3√3/2, which vanishes at 0 and at ±1 (INL is measured against the
    end-point line), peaks at ±inl LSB at |u| = 1/√3 and is odd, as a sign-magnitude DAC's error is. It
    distorts every input the same way, which is what makes it different from rounding noise."""
    u = (x.detach() / r.detach()).clamp(-1.0, 1.0)
    step = dac_step(bits)
    if step is not None:
        u = torch.round(u / step) * step
        k = dac_inl_coefficient(bits, inl)
        if k:
            u = u + k * u * (1.0 - u * u)
    return u


def ir_profile(rows: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """P_j = 1 + 1/n − j(j + 1)/n² of rows j = 0 … n − 1 (row 0 the far end of the column, row n − 1
    next to the ADC): the wire voltage at row j of a uniformly loaded column, relative to its value at
    the far end, exactly, to first order in ρ (the n − j wire segments between row j and the ADC each
    carry the current of all rows beyond them)."""
    j = torch.arange(rows, device=device, dtype=torch.float64)
    return (1.0 + 1.0 / rows - j * (j + 1.0) / rows**2).to(dtype)


def ir_factor(a: Tensor) -> Tensor:
    """c(a) = (3/2)(1 − tanh(√a)/√a): the relative voltage of a column wire's far end, to all orders, for
    a uniformly loaded continuous line of load a (the exact solution of φ'' = a(1 − φ) with the ADC end
    held at 0): a/2 − a²/5 + 17a³/210 − … (aihwkit's cubic fit is a/2 − a²/5 + a³/20). Below a = 0.25 its
    Taylor series to a⁵ (error < 1e-5 relative; the closed form cancels there), above it the closed form."""
    series = a * (0.5 + a * (-0.2 + a * (17.0 / 210 + a * (-31.0 / 945 + a * (691.0 / 51975)))))
    s = a.clamp(min=0.25).sqrt()
    return torch.where(a < 0.25, series, 1.5 * (1.0 - torch.tanh(s) / s))


def ir_drop_attenuation(u: Tensor, tiles: Tensor, rho: float) -> Tensor:
    """The IR drop of every tile output, (T, N, out), to subtract from y = u · tiles.

    What is modelled (first order, as aihwkit's ``IOParameters.ir_drop``, in a vectorised form of our
    own): each column wire of an array has resistance R between adjacent cells and ends in the ADC's
    virtual ground after its last row. Inputs are pulses of a fixed read voltage whose length encodes
    |u| (PWM, as on IBM's HERMES chip), so a device's charge is reduced by the relative voltage φ_j its
    column wire sits at while it conducts: y_o = Σ_j w_jo u_j (1 − φ_jo). With ρ = R·g_max and the
    column's load I_o = Σ_j |w_jo||u_j| (its time-averaged current in units of g_max·V_read), the wire
    voltage is taken as that of a uniformly loaded column carrying I_o,
        φ_jo = c(a_o) · P_j,   a_o = ρ · n · I_o,
    with the position profile P_j of :func:`ir_profile` (exact to first order in ρ) and the far-end
    level c(a) of :func:`ir_factor` (exact to all orders for a uniform load). The drop is then
    c(a_o) · Σ_j w_jo u_j P_j: two extra tile matmuls, (u ⊙ P) · W and |u| · |W|.

    What is not modelled: the non-uniformity of the load along the column (φ follows the uniform-load
    profile, scaled to the actual total current), the time dependence of the current while pulses end
    (aihwkit's IRDropT), cancellation of currents of opposite sign on a wire (the load counts |w||u|, as
    aihwkit does), the row (word-line) wires and the drivers' output resistance, access transistors and
    sneak paths, and separate columns for G+ and G− (the pair's weight loads one wire). Valid for
    a ≲ 1 (c(1) = 0.36; at the far end the exact uniform solution gives 0.35)."""
    rows = tiles.shape[-2]
    profile = ir_profile(rows, u.device, u.dtype)
    drop = tile_mm(u * profile, tiles)
    load = tile_mm(u.abs(), tiles.abs())
    return ir_factor(load * (rho * rows)) * drop


def _multiplier(scale: Tensor, r: Tensor, gain: Tensor, adc_range: Optional[Tensor], adc_bits: int) -> Tensor:
    """Per tile-column factor after the ADC, (T, out): scale × step (the ADC returns codes) × r × gain;
    a per-row range r multiplies the summed output instead."""
    m = scale * gain
    if adc_range is not None:
        m = m * adc_steps(adc_range, adc_bits).view(-1, 1)
    if r.numel() == 1:
        m = m * r.reshape(())
    return m


def _variance(y: Tensor, u: Tensor, read_var: Optional[Tensor], out_var: float, shot: float) -> Optional[Tensor]:
    """The noise variance of every tile output (T, N, out), or None when the read is noiseless."""
    var = None
    if read_var is not None:
        if read_var.dim() == 2:  # per tile column: Σu² of the row × the column's mean device variance
            var = u.square().sum(-1, keepdim=True) * read_var.unsqueeze(1)
        else:  # exact, per device (T, rows, out)
            var = torch.bmm(u.square(), read_var)
    if shot > 0:
        var = y.abs() * shot if var is None else var + y.abs() * shot
    if out_var > 0:
        var = torch.full_like(y, out_var) if var is None else var + out_var
    return var


def adc_offset_units(adc_offset: Tensor, adc_range: Tensor, adc_bits: int) -> Tensor:
    """Offsets given in LSB of every column's ADC (T, out) in normalised output units: × the tile's step
    (an ADC's offset is a fraction of its own full scale, whatever range it is set to)."""
    return adc_offset * adc_steps(adc_range.detach(), adc_bits).view(-1, 1).to(adc_offset.dtype)


def reference(x: Tensor, tiles: Tensor, scale: Tensor, dac_range: Tensor, gain: Tensor, adc_range: Optional[Tensor],
              read_var: Optional[Tensor], bias: Optional[Tensor], key: Tensor, dac_bits: int, adc_bits: int,
              out_var: float, shot: float, saturation: float, need_gate: bool, need_resid: bool,
              adc_gain: Optional[Tensor] = None, adc_offset: Optional[Tensor] = None, ir_drop: float = 0.0,
              dac_inl: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The read in torch (any device): see the module docstring. Returns (out, gate, resid, clipped):
    gate and resid empty when not needed; ``clipped`` (a 0-d tensor) counts saturated outputs, or is −1
    where counting would cost a host sync (the reference does not count)."""
    t_count, rows, outs = tiles.shape
    r = dac_range.reshape(-1, 1) if dac_range.numel() > 1 else dac_range
    u = tile_input(dac(x, r, dac_bits, dac_inl), t_count, rows)
    y = tile_mm(u, tiles)
    if ir_drop > 0:
        y = y - ir_drop_attenuation(u, tiles, ir_drop)
    var = _variance(y, u, read_var, out_var, shot)
    if var is not None:
        y = y + normals(key, t_count, x.shape[0], outs, device=x.device, dtype=y.dtype) * var.sqrt()
    gate = None
    if saturation > 0:
        y = torch.tanh(y / saturation)
        gate = 1.0 - y.square()
        y = y * saturation
    resid = None
    if adc_range is not None:
        if adc_gain is not None and adc_offset is not None:  # the column ADCs' static errors, before rounding
            y = y * adc_gain.to(y.dtype).unsqueeze(1) + adc_offset_units(adc_offset, adc_range, adc_bits).to(y.dtype).unsqueeze(1)
        bound = adc_range.to(y.dtype).view(-1, 1, 1)
        inside = y.abs() <= bound
        gate = inside if gate is None else gate * inside  # the ADC alone: a boolean mask
        step = adc_steps(adc_range, adc_bits).to(y.dtype).view(-1, 1, 1)
        codes = torch.round(torch.minimum(torch.maximum(y, -bound), bound) * (1.0 / step))
        if need_resid:
            resid = torch.where(inside, (codes * step - y) / bound, torch.sign(y))
        y = codes
    out = (y * _multiplier(scale, dac_range, gain, adc_range, adc_bits).unsqueeze(1).to(y.dtype)).sum(0)
    if dac_range.numel() > 1:
        out = out * r
    if bias is not None:
        out = out + bias
    unknown = torch.full((), -1, dtype=torch.int64, device=x.device)
    gate = gate if need_gate and gate is not None else x.new_empty(0)
    return out, gate, resid if resid is not None else x.new_empty(0), unknown


def _kernel(x: Tensor, tiles: Tensor, scale: Tensor, dac_range: Tensor, gain: Tensor, adc_range: Optional[Tensor],
            read_var: Optional[Tensor], bias: Optional[Tensor], key: Tensor, dac_bits: int, adc_bits: int,
            out_var: float, shot: float, saturation: float, need_gate: bool, need_resid: bool,
            adc_gain: Optional[Tensor] = None, adc_offset: Optional[Tensor] = None, ir_drop: float = 0.0,
            dac_inl: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The read on the fused CPU kernel (float32; per-column read noise). The IR drop's two extra tile
    matmuls run in torch; its factor and subtraction, like the ADC errors, are fused into the kernel."""
    t_count, rows, outs = tiles.shape
    need_usq = read_var is not None
    u, usq = cpu.dac(x, dac_range, dac_step(dac_bits), t_count, rows, need_usq, dac_inl_coefficient(dac_bits, dac_inl))
    y = tile_mm(u, tiles)
    ir = None
    if ir_drop > 0:
        ir = (tile_mm(u.abs(), tiles.abs()), tile_mm(u * ir_profile(rows, u.device, u.dtype), tiles), ir_drop * rows)
    mult = _multiplier(scale, dac_range, gain, adc_range, adc_bits).float()
    adc = errors = None
    if adc_range is not None:
        adc = (adc_range.detach().float(), (1.0 / adc_steps(adc_range.detach(), adc_bits)).float())
        if adc_gain is not None and adc_offset is not None:
            errors = (adc_gain.float(), adc_offset_units(adc_offset, adc_range, adc_bits).float())
    row_range = dac_range.numel() > 1
    k = key.tolist()
    out, gate, resid, clipped = cpu.read(
        y, mult, usq=usq, rv=read_var, shot2=shot, const_var=out_var, key=(k[1] << 32) | k[0],
        sat=saturation or None, adc=adc, bias=None if row_range else bias, need_gate=need_gate, need_resid=need_resid,
        ir=ir, adc_errors=errors)
    if row_range:
        out = out * dac_range.reshape(-1, 1)
        if bias is not None:
            out = out + bias
    return (out, gate if gate is not None else x.new_empty(0), resid if resid is not None else x.new_empty(0),
            torch.tensor(clipped, dtype=torch.int64))


def _kernel_takes(*tensors: Tensor) -> bool:
    """Whether the CPU kernel can take these tensors: all float32 on the CPU, and the kernel built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and cpu.library() is not None


def fusable(x: Tensor, read_var: Optional[Tensor]) -> bool:
    """Whether the CPU kernel can run this read: float32 on CPU, per-column read noise."""
    return (read_var is None or read_var.dim() == 2) and _kernel_takes(x)


@torch.library.custom_op("analogllm::read", mutates_args=())
def read(x: Tensor, tiles: Tensor, scale: Tensor, dac_range: Tensor, gain: Tensor, adc_range: Optional[Tensor],
         read_var: Optional[Tensor], bias: Optional[Tensor], weight: Optional[Tensor], clip: Optional[Tensor],
         key: Tensor, dac_bits: int, adc_bits: int, out_var: float, shot: float, saturation: float, need_gate: bool,
         need_resid: bool, adc_gain: Optional[Tensor] = None, adc_offset: Optional[Tensor] = None,
         ir_drop: float = 0.0, dac_inl: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chip read (see the module docstring): (out, gate, resid, clipped). ``weight``/``clip`` are
    only used by the backward (hardware-aware training: the digital weight that the tiles were made
    from, and its clipping bound). ``adc_gain``/``adc_offset`` (T, out) are the static errors of the
    column ADCs (a factor, and an offset in LSB); ``ir_drop`` is ρ = R_wire·g_max per cell (0: no IR
    drop); ``dac_inl`` the DAC's integral nonlinearity in LSB."""
    args = (x, tiles, scale, dac_range, gain, adc_range, read_var, bias, key, dac_bits, adc_bits, out_var, shot,
            saturation, need_gate, need_resid, adc_gain, adc_offset, ir_drop, dac_inl)
    return _kernel(*args) if fusable(x, read_var) else reference(*args)


@read.register_fake
def _(x, tiles, scale, dac_range, gain, adc_range, read_var, bias, weight, clip, key, dac_bits, adc_bits, out_var,
      shot, saturation, need_gate, need_resid, adc_gain=None, adc_offset=None, ir_drop=0.0, dac_inl=0.0):
    t_count, _, outs = tiles.shape
    gated = need_gate and (saturation > 0 or adc_range is not None)
    gate = (x.new_empty(t_count, x.shape[0], outs, dtype=x.dtype if saturation > 0 else torch.bool) if gated
            else x.new_empty(0))
    resid = x.new_empty(t_count, x.shape[0], outs) if need_resid and adc_range is not None else x.new_empty(0)
    return x.new_empty(x.shape[0], outs), gate, resid, x.new_empty((), dtype=torch.int64)


def _setup(ctx, inputs, output) -> None:
    (x, tiles, scale, dac_range, gain, adc_range, _, _, weight, clip, _, dac_bits, adc_bits, _, _, saturation,
     _, _, adc_gain, _, _, dac_inl) = inputs
    _, gate, resid, clipped = output
    if gate.numel() and not saturation:
        # the gate is only the ADC's inside mask (booleans): none at all when the kernel saw nothing
        # saturate (every tile then passes the same gradient)
        known = type(clipped) is torch.Tensor and clipped.device.type == "cpu"  # not traced (fake / functional)
        gate = gate.new_empty(0) if known and int(clipped) == 0 else gate
    # the ADCs' gain errors multiply the chip's product like its realised weights do (not the ADC range's
    # derivative, which is taken at the ADC's own input)
    weight_scale = scale * adc_gain if adc_gain is not None and adc_range is not None else scale
    ctx.save_for_backward(x, tiles, scale, weight_scale, dac_range, gain, adc_range, weight, clip, gate, resid)
    ctx.dac_bits, ctx.adc_bits, ctx.dac_inl = dac_bits, adc_bits, dac_inl
    ctx.set_materialize_grads(False)  # gate, resid and clipped are never differentiated: no zero tensors for them


def dac_backward_reference(x: Tensor, grad_u: Tensor, rg: Tensor, r: Tensor, dac_bits: int, dac_inl: float,
                           rows: int, need_x: bool, need_r: bool, need_u: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The DAC's share of a read's backward in torch (see :func:`dac_backward`)."""
    tiles = math.ceil(x.shape[-1] / rows)
    if grad_u.dim() == 3:
        grad_u = untile_input(grad_u, x.shape[-1])
    grad_u = grad_u * rg
    xr = x / r
    inside = xr.abs() <= 1.0
    grad_x = grad_u * inside / r if need_x else x.new_empty(0)
    u = dac(x, r, dac_bits, dac_inl) if (need_u or need_r) else None
    grad_r = (grad_u * (u - xr * inside) / r).sum(-1) if need_r else x.new_empty(0)
    ur = tile_input(u * r, tiles, rows) if need_u else x.new_empty(0)
    return grad_x, grad_r, ur


@torch.library.custom_op("analogllm::dac_backward", mutates_args=())
def dac_backward(x: Tensor, grad_u: Tensor, rg: Tensor, r: Tensor, dac_bits: int, dac_inl: float, rows: int,
                 need_x: bool, need_r: bool, need_u: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The DAC's share of a read's backward, for the gradient ``rg``·``grad_u`` at the DAC outputs, dense
    (N, in) or tiled (T, N, rows) as the tile matmuls leave it: (the gradient of ``x``, clipped
    straight-through; the LSQ derivative of the range r (a scalar or (N, 1)) summed per row, (N,); the
    inputs the weights saw, u·r, as (T, N, rows) tiles), each empty when not asked for. An op of its own
    so that the backward traces (``torch.compile``) while the CPU kernel does it in one pass over x
    instead of about fifteen."""
    if _kernel_takes(x, grad_u):
        grad_x, grad_r, ur = cpu.dac_backward(x, grad_u, float(rg), r, dac_step(dac_bits), math.ceil(x.shape[-1] / rows),
                                              rows, dac_inl_coefficient(dac_bits, dac_inl), need_x, need_r, need_u)
        return tuple(x.new_empty(0) if t is None else t for t in (grad_x, grad_r, ur))
    return dac_backward_reference(x, grad_u, rg, r, dac_bits, dac_inl, rows, need_x, need_r, need_u)


@dac_backward.register_fake
def _(x, grad_u, rg, r, dac_bits, dac_inl, rows, need_x, need_r, need_u):
    tiles = math.ceil(x.shape[-1] / rows)
    return (x.new_empty(x.shape if need_x else 0), x.new_empty(x.shape[0] if need_r else 0),
            x.new_empty(x.shape[0], tiles, rows).transpose(0, 1) if need_u else x.new_empty(0))


@torch.library.custom_op("analogllm::adc_grad_sums", mutates_args=())
def adc_grad_sums(g: Tensor, resid: Tensor) -> Tensor:
    """Σ_n g[n, o] · resid[t, n, o] per tile column, (T, out): a learned ADC range's derivative before its
    column factors, for the read's gradient g (N, out) and ADC derivative ``resid`` (T, N, out). The CPU
    kernel makes no (T, N, out) temporary (two of them in torch, each a fresh allocation)."""
    if _kernel_takes(g, resid):
        return cpu.adc_grad(g, resid)
    return (g.unsqueeze(0) * resid).sum(1)


@adc_grad_sums.register_fake
def _(g, resid):
    return g.new_empty(resid.shape[0], resid.shape[2])


def _backward(ctx, grad, _grad_gate, _grad_resid, _grad_clipped):
    if grad is None:  # the output was not used (grads are not materialised): nothing flows back
        return (None,) * len(ctx.needs_input_grad)
    x, tiles, scale, weight_scale, dac_range, gain, adc_range, weight, clip, gate, resid = ctx.saved_tensors
    rows = tiles.shape[1]
    features = x.shape[-1]
    row_range = dac_range.numel() > 1
    r = dac_range.reshape(-1, 1) if row_range else dac_range
    g = grad * r if row_range else grad  # the per-row range multiplied the summed output
    rg = gain if row_range else dac_range.reshape(()) * gain
    need_x, need_r, need_b, need_w, need_adc = (ctx.needs_input_grad[i] for i in (0, 3, 7, 8, 5))
    realised = tiles.transpose(-1, -2) * weight_scale.unsqueeze(-1)  # (T, out, rows), weight units
    if gate.numel() == 0:  # every tile saw the same gradient: one dense matmul
        gt = None
        grad_u = g.mm(untile_weight(realised, features).to(g.dtype))
    else:
        gt = torch.where(gate, g.unsqueeze(0), 0.0) if gate.dtype == torch.bool else g.unsqueeze(0) * gate
        grad_u = tile_mm(gt, realised)
    need_u = need_w and weight is not None
    grad_x, grad_r, ur = dac_backward(x, grad_u, rg, r, ctx.dac_bits, ctx.dac_inl, rows, need_x, need_r, need_u)
    grad_x = grad_x if need_x else None
    grad_r = (grad_r.reshape(dac_range.shape) if row_range else grad_r.sum().reshape(dac_range.shape)) if need_r else None
    grad_w = None
    if need_u:
        grad_w = (g.t().mm(untile_input(ur, features)) if gt is None else
                  untile_weight(tile_mm(gt.transpose(1, 2), ur), features))
        if clip is not None:
            grad_w = grad_w.masked_fill_(weight.abs() > clip, 0.0)  # in place: no float copy of the mask
    grad_adc = None
    if need_adc and adc_range is not None and resid.numel():
        per = (scale * gain * (1.0 if row_range else dac_range.reshape(()))).unsqueeze(1)  # (T, 1, out)
        grad_adc = (adc_grad_sums(g, resid) * per.squeeze(1)).sum(-1).reshape(adc_range.shape)
    grad_b = grad.sum(0) if need_b else None
    return (grad_x, None, None, grad_r, None, grad_adc, None, grad_b, grad_w, None, None, None, None, None, None, None,
            None, None, None, None, None, None)


read.register_autograd(_backward, setup_context=_setup)


__all__ = ["adc_grad_sums", "adc_offset_units", "adc_steps", "dac", "dac_backward", "dac_backward_reference", "dac_inl_coefficient", "dac_step", "fusable", "ir_drop_attenuation",
           "ir_factor", "ir_profile", "read", "reference", "tile_input", "tile_mm", "tile_weight", "untile_input",
           "untile_weight"]
