"""AnalogMatrix: one weight matrix (or a stack of expert matrices) as it lives on the chip.

Every adapter (``nn.Linear``, GPT-2 ``Conv1D``, MoE experts, raw weights read by a model) owns one of
these and calls it in place of ``F.linear``. It implements the data path of one analogue matmul:

    x ─DAC(range r)─► split into T input tiles ─► y_t = x_t · W_tᵀ / s_t   (normalised units)
      ─► + noise ─► nonlinearity ─► ADC ─► Σ_t y_t · s_t ─► × r × gain + bias

where s_t is the abs-max of each output column within tile t (the per-tile, per-column scale a
crossbar needs to map weights onto conductances). Two modes:

* ``train()``: the digital weights are used, with hardware-aware noise sampled in *output* space
  (weight noise N(0, σ²) on W·x is exactly output noise of std σ‖x‖), optional clipping, and the
  converters with straight-through gradients.
* ``eval()``: the deployed chip. The matrix that this chip instance realises (programming noise,
  drift, levels, mesh errors; see :mod:`analogllm.devices`) is computed once per (seed, time) and
  cached, so a forward costs one matmul plus the read noise, which is again sampled in output space.

Tiling is one batched matmul over a (T, N, rows) view of the input (on CPU, T multithreaded matmuls
when the thread count does not divide T; see :func:`_tile_mm`); the inputs are split evenly over
ceil(in / tiling.rows) tiles. The whole chain is one autograd node
(:class:`_AnalogMVM`) that works in place and stores almost nothing for backward, and the Gaussian
samples of a read are drawn on background threads while the matmul runs (:mod:`analogllm.ops.noise`),
or, for chip reads on CPU, everything after the matmul runs in one pass of a fused kernel
(:mod:`analogllm.ops.cpu`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from analogllm.config import AnalogConfig
from analogllm.nn.transform import InputTransform
from analogllm.ops import cpu as kernel
from analogllm.ops.noise import PendingNoise, gaussian
from analogllm.ops.quant import adc_step, clip_bound, dac_levels

_EPS = 1e-12


@dataclass
class ChipState:
    """The cached realisation of one chip instance at one drift time.

    weight:   effective normalised weight, (E, T, rows, out) ready for a batched matmul (E = experts).
    scale:    (E, T, 1, out) per tile-column scale s_t.
    read_var: (E, T, 1, out) mean read-noise variance per input (fast mode), or (E, T, rows, out) in
              exact mode, or None.
    gain:     digital gain after the ADC (device gain × drift compensation).
    """

    weight: torch.Tensor
    scale: torch.Tensor
    read_var: torch.Tensor | None
    gain: float
    seed: int
    seconds: float
    version: tuple[int, int]


def chip_generator(seed: int, layer_id: int, device: torch.device) -> torch.Generator:
    """A generator for one layer of one chip: chip instances differ by seed, layers by id."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + layer_id * 7_919 + 104_729) % (2**63 - 1))
    return gen


class AnalogMatrix(nn.Module):
    """The analogue state and data path of a weight matrix of shape (out, in) or (E, out, in).

    It holds no copy of the weight: the owner passes it in, so peft, accelerate and ``state_dict`` see
    the original parameter. Its own parameter is the learned DAC input range (one per expert).
    """

    def __init__(self, config: AnalogConfig, layer_id: int, in_features: int, experts: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        self.in_features = in_features
        self.experts = experts
        # ceil(in / rows) arrays, the inputs split evenly across them (768 inputs on 512-row arrays use
        # 384 rows of each): the same number of ADCs as packing, without a mostly-empty last tile.
        self.tiles = math.ceil(in_features / (config.tiling.rows or in_features))
        self.rows = math.ceil(in_features / self.tiles)
        self.seconds = 0.0
        self.seed: int | None = None
        self.mode: str | None = None  # "digital": a plain matmul (calibration passes); None: by .training
        self._chip: ChipState | None = None
        self.deployed = False  # the digital weight was freed: only the cached chip remains (see release)
        shape = (experts,) if experts else ()
        self.transform: InputTransform | None = None
        if config.adc.bits is not None:
            # the ADC range of every input tile (normalised units): the profile's full scale until a
            # calibration (analogllm.mapping) narrows it, i.e. raises the gain in front of the ADC
            self.register_buffer("output_range", torch.full((*shape, self.tiles), float(config.adc.bound)))
        init = config.dac.init_range or 0.0
        if config.dac.range == "learned":
            self.input_range = nn.Parameter(torch.full(shape, float(init)))
            self.register_buffer("range_ready", torch.tensor(config.dac.init_range is not None))
        elif config.dac.range == "static":
            self.register_buffer("input_range", torch.full(shape, float(init)))

    def extra_repr(self) -> str:
        return f"device={self.config.device.kind}, tiles={self.tiles}x{self.rows}, layer_id={self.layer_id}"

    def set_transform(self, scale: bool = False, rotation_seed: int | None = None) -> InputTransform:
        """Put a digital input transform in front of the DAC (see :mod:`analogllm.nn.transform`); the
        owner's weight must absorb it (:meth:`InputTransform.absorb`) for the product to stay the same."""
        device = next(iter(self.buffers()), torch.empty(0)).device
        self.transform = InputTransform(self.in_features, scale, rotation_seed).to(device)
        return self.transform

    def adc_bounds(self, expert: int | None) -> torch.Tensor | None:
        """The ADC range per input tile, (T,), for this matrix (or expert); None without an ADC."""
        if self.config.adc.bits is None:
            return None
        return self.output_range if expert is None else self.output_range[expert]

    # ----- the forward data path ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, expert: int | None = None):
        """y = analogue(x · Wᵀ) + bias. ``weight`` is the owner's whole parameter: (out, in), or
        (E, out, in) for experts, in which case ``expert`` picks the matrix."""
        w = weight if expert is None else weight[expert]
        if self.transform is not None:
            x = self.transform(x)
        if self.config.is_identity or self.mode == "digital":
            return F.linear(x, w, bias)
        if torch.is_autocast_enabled(x.device.type):  # the chip's arithmetic runs in the weight's dtype
            with torch.autocast(x.device.type, enabled=False):
                return self._read(x.to(w.dtype), w, weight, bias, expert)
        return self._read(x, w, weight, bias, expert)

    def _read(self, x: torch.Tensor, w: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              expert: int | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        r = self._input_range(x2, expert)
        chip = None if self.training else self.chip(weight)
        need_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x2, w, r, bias))
        y = _AnalogMVM.apply(x2, w, r, bias, self, chip, 0 if expert is None else expert, need_grad)
        return y.reshape(*lead, y.shape[-1])

    def _input_range(self, x: torch.Tensor, expert: int | None) -> torch.Tensor:
        """The DAC range r: per row (dynamic, no gradient) or the layer's static/learned scalar."""
        dac = self.config.dac
        if dac.range == "dynamic":
            return x.detach().abs().amax(-1, keepdim=True).clamp_(min=_EPS)
        if dac.range == "learned" and not bool(self.range_ready):
            with torch.no_grad():  # data-initialised range: no clipping on the first batch seen
                self.input_range.fill_(float(x.abs().max().clamp(min=_EPS)))
                self.range_ready.fill_(True)
        r = self.input_range if expert is None else self.input_range[expert]
        return r.abs() + _EPS

    def _tile_input(self, u: torch.Tensor) -> torch.Tensor:
        """(N, in) → (T, N, rows): zero-padded and viewed per input tile."""
        if self.tiles == 1:
            return u.unsqueeze(0)
        pad = self.tiles * self.rows - u.shape[-1]
        if pad:
            u = F.pad(u, (0, pad))
        return u.view(u.shape[0], self.tiles, self.rows).transpose(0, 1)

    def _untile_input(self, g: torch.Tensor) -> torch.Tensor:
        """(T, N, rows) → (N, in): the inverse of :meth:`_tile_input` (padding dropped)."""
        return g.transpose(0, 1).reshape(g.shape[1], -1)[:, : self.in_features]

    def _tile_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(..., out, in) → (..., T, out, rows), zero-padded."""
        pad = self.tiles * self.rows - weight.shape[-1]
        if pad:
            weight = F.pad(weight, (0, pad))
        w = weight.reshape(*weight.shape[:-1], self.tiles, self.rows)
        return w.movedim(-2, -3)

    def _untile_weight(self, w: torch.Tensor) -> torch.Tensor:
        """(..., T, out, rows) → (..., out, in): the inverse of :meth:`_tile_weight`."""
        return w.movedim(-3, -2).reshape(*w.shape[:-3], w.shape[-2], -1)[..., : self.in_features]

    def normalised_tiles(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., out, in) → tiles normalised per tile column to [-1, 1], (..., T, out, rows), and their
        scales (..., T, out, 1): what the arrays hold and what is multiplied back after the ADC. The
        exporter uses this very function, so a map's targets are the layer's bit for bit."""
        self._require_digital()
        wt = self._tile_weight(weight)
        scale = wt.abs().amax(-1, keepdim=True).clamp(min=_EPS)
        return wt / scale, scale

    def _training_weights(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Clipped weight tiles normalised per tile column: (T, rows, out), their scale (T, 1, out),
        and the clipping bound (out, 1) or None."""
        bound = clip_bound(w, self.config.training.clip_sigma)
        wn, scale = self.normalised_tiles(w if bound is None else w.clamp(-bound, bound))
        return wn.transpose(-1, -2), scale.transpose(-1, -2), bound

    # ----- chip instances ----------------------------------------------------------------------------------
    def chip(self, weight: torch.Tensor) -> ChipState:
        """The cached chip state; (re)programmed when missing or when the weight changed in place
        (e.g. after an optimiser step), keeping the chip's seed and drift time."""
        if self.deployed:
            assert self._chip is not None
            return self._chip
        if self._chip is None or self._chip.version != (weight._version, weight.data_ptr()):
            self.program(weight, self.config.seed if self.seed is None else self.seed, self.seconds)
        assert self._chip is not None
        return self._chip

    @torch.no_grad()
    def program(self, weight: torch.Tensor, seed: int, seconds: float | None = None) -> ChipState:
        """Sample this matrix's chip instance ``seed`` and age it to ``seconds`` after programming."""
        self.seed = seed
        if seconds is not None:
            self.seconds = float(seconds)
        device = self.config.device
        w = weight.detach().float()
        if w.dim() == 2:
            w = w.unsqueeze(0)
        wn, scale = self.normalised_tiles(w)  # (E, T, out, rows), (E, T, out, 1)
        flat = wn.reshape(-1, *wn.shape[-2:])
        real = device.realise(flat, self.seconds, chip_generator(seed, self.layer_id, w.device))
        gain = float(real.gain)
        if self.config.drift.compensation and device.drifts and self.seconds > 0:
            ref = real.reference
            if ref is None:
                ref = device.realise(flat, 0.0, chip_generator(seed, self.layer_id, w.device)).weight
            gain *= _drift_compensation(ref, real.weight, self.config.drift.calibration_vectors)
        eff = real.weight.view_as(wn).transpose(-1, -2).contiguous().to(weight.dtype)  # (E, T, rows, out)
        read_var = None
        if real.read_std is not None:
            rv = real.read_std.view_as(wn).square()  # (E, T, out, rows)
            read_var = rv.transpose(-1, -2) if self.config.exact_read_noise else rv.mean(-1).unsqueeze(-2)
            read_var = read_var.contiguous().to(weight.dtype)
        self._chip = ChipState(
            weight=eff, scale=scale.transpose(-1, -2).to(weight.dtype), read_var=read_var, gain=gain, seed=seed,
            seconds=self.seconds, version=(weight._version, weight.data_ptr()),
        )
        return self._chip

    @torch.no_grad()
    def realised_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The dense (…, out, in) matrix this chip instance computes, scales and gain folded in
        (without converters or read noise): for raw-weight reads and for export checks."""
        chip = self.chip(weight)
        w = self._untile_weight((chip.weight * chip.scale).transpose(-1, -2)) * chip.gain
        return w if weight.dim() == 3 else w[0]

    @torch.no_grad()
    def release(self, weight: torch.Tensor, seed: int, seconds: float) -> None:
        """Program chip instance ``seed`` at ``seconds``, then free ``weight``'s storage (the owner's
        parameter keeps its shape, dtype and device as a one-element broadcast view). Reads need only
        the cached chip; everything that needs the digital weight raises afterwards."""
        if self.config.is_identity:
            raise ValueError("the ideal profile computes with the digital weights themselves: nothing to deploy")
        self.program(weight, seed, seconds)
        param = weight if weight._base is None else weight._base
        param.data = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)
        self.deployed = True

    def _require_digital(self) -> None:
        if self.deployed:
            raise RuntimeError(
                f"analogue layer {self.layer_id} was deployed with analogllm.deploy_: its digital weights were freed, "
                "so it can only read its chip. Reload the model to train, reprogram, drift, export or save it.")


def _drift_compensation(ref: torch.Tensor, now: torch.Tensor, vectors: int) -> float:
    """Global drift compensation α = Σ|X·W_ref| / Σ|X·W_now| for a fixed ±1 calibration input X."""
    gen = torch.Generator(device=ref.device).manual_seed(20)
    x = torch.randint(0, 2, (vectors, ref.shape[-1]), generator=gen, device=ref.device).to(ref.dtype) * 2 - 1
    num = torch.matmul(ref, x.T).abs().sum()
    den = torch.matmul(now, x.T).abs().sum().clamp(min=_EPS)
    return float(num / den)


class _AnalogMVM(torch.autograd.Function):
    """The whole analogue matmul as one autograd node.

    Forward runs DAC → tile matmuls → noise → nonlinearity → ADC → Σ tiles in place on one output
    buffer. Backward is the straight-through estimate: every rounding step passes the gradient, every
    saturation stops it. It keeps only the input, the weight (both already alive) and, when some
    output saturated or a nonlinearity is on, one gate per output; the DAC output and the clipped
    weights are recomputed (cheap, input- and weight-sized) rather than stored. When no output
    saturates, all tiles see the same gradient and backward is exactly ``nn.Linear``'s two matmuls.

    The learned DAC range r gets the STE derivative of r·Q(x/r): Σ g_u·(Q(x/r) − (x/r)·1[|x| ≤ r]) / r,
    i.e. the clipped inputs push r out and the rounding error pulls it in (as in LSQ).
    """

    @staticmethod
    def forward(ctx, x, w, r, bias, m: AnalogMatrix, chip: ChipState | None, e: int, need_grad: bool):  # type: ignore[override]
        cfg = m.config
        training = chip is None
        quantize = cfg.training.quantize or not training
        step = dac_levels(cfg.dac.bits) if quantize else None
        bound = None
        if training:
            wn, scale, bound = m._training_weights(w)
            gain = 1.0
        else:
            wn, scale, gain = chip.weight[e], chip.scale[e], chip.gain
        adc = (m.output_range[e] if m.experts else m.output_range) if cfg.adc.bits is not None and quantize else None
        fused = _fusable(chip, wn)
        if fused:
            need_usq = cfg.training.weight_noise > 0 if training else chip.read_var is not None
            ut, usq = kernel.dac(x, r, step, m.tiles, m.rows, need_usq=need_usq)
        else:
            ut = m._tile_input(_dac(x, r, step))
        noise = gaussian((m.tiles, x.shape[0], wn.shape[-1]), x) if _noisy(cfg, chip) and not fused else None
        y = _tile_mm(ut, wn)  # the noise is drawn meanwhile
        if fused:
            out, gate = _fused_read(y, usq, cfg, chip, e, scale, r, gain, bias, need_grad, adc)
        else:
            out, gate = _eager_read(y, ut, cfg, chip, e, scale, r, gain, bias, need_grad, adc, noise)
        if need_grad:
            ctx.save_for_backward(x, w if training else None, r, gate, bound)
            ctx.m, ctx.chip, ctx.e, ctx.gain, ctx.quantize = m, chip, e, gain, quantize
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w, r, gate, bound = ctx.saved_tensors
        m: AnalogMatrix = ctx.m
        rg = r * ctx.gain
        if w is not None:  # training: the clipped digital weight, (out, in)
            w_eff = w if bound is None else w.clamp(-bound, bound)
            tiles = m._tile_weight(w_eff) if gate is not None else None
        else:  # deployed chip: the realised tiles with their column scales, (T, out, rows)
            chip: ChipState = ctx.chip
            tiles = (chip.weight[ctx.e] * chip.scale[ctx.e]).transpose(-1, -2)
            w_eff = m._untile_weight(tiles) if gate is None else None
        if gate is None:  # every tile saw the same gradient: one dense matmul
            gt = None
            grad_u = g.mm(w_eff)
        else:
            gt = g.unsqueeze(0) * gate
            grad_u = m._untile_input(_tile_mm(gt, tiles))
        grad_u = grad_u * rg
        xr = x / r
        inside = xr.abs() <= 1.0
        grad_x = grad_u * inside / r if ctx.needs_input_grad[0] else None
        need_w = w is not None and ctx.needs_input_grad[1]
        u = _dac(x, r, dac_levels(m.config.dac.bits) if ctx.quantize else None) if need_w or ctx.needs_input_grad[2] else None
        grad_r = None
        if ctx.needs_input_grad[2]:
            grad_r = ((grad_u * (u - xr * inside)).sum() / r).reshape(r.shape)
        grad_w = None
        if need_w:
            u = u.mul_(rg)
            if gt is None:
                grad_w = g.t().mm(u)
            else:
                grad_w = m._untile_weight(_tile_mm(gt.transpose(1, 2), m._tile_input(u)))
            if bound is not None:
                grad_w = grad_w * (w.abs() <= bound)
        grad_b = g.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w, grad_r, grad_b, None, None, None, None


def _tile_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(T, N, K) @ (T, K, M) → (T, N, M), one product per tile. torch's CPU bmm hands whole tiles to
    threads, so a tile count the threads do not divide leaves cores idle (3 tiles on 2 threads: 25 %
    slower than three multithreaded mm); those run as T multithreaded mm into one buffer instead."""
    tiles = a.shape[0]
    if tiles == 1:
        return torch.mm(a[0], b[0]).unsqueeze(0)
    if a.device.type != "cpu" or tiles % torch.get_num_threads() == 0:
        return torch.bmm(a, b)
    out = torch.empty(tiles, a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    for t in range(tiles):
        torch.mm(a[t], b[t], out=out[t])
    return out


def _dac(x: torch.Tensor, r: torch.Tensor, step: float | None) -> torch.Tensor:
    """Normalised DAC output Q(x/r) ∈ [−1, 1] (no autograd: the MVM node does the STE)."""
    u = (x.detach() / r.detach()).clamp_(-1.0, 1.0)
    if step is not None:
        u.div_(step).round_().mul_(step)
    return u


def _eager_read(y: torch.Tensor, ut: torch.Tensor, cfg: AnalogConfig, chip: ChipState | None, e: int,
                scale: torch.Tensor, r: torch.Tensor, gain: float, bias: torch.Tensor | None, need_grad: bool,
                adc: torch.Tensor | None, noise: PendingNoise | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Everything after the tile matmuls, in place on ``y`` (T, N, out): noise, converters, Σ tiles,
    scales and bias (``adc``: the ADC range per tile, or None for no ADC). Returns the output and the
    backward gate."""
    if noise is not None:
        _add_noise(y, ut, cfg, chip, e, noise.wait())
    gate = _converters(y, cfg, adc, need_grad)
    scale, row_range = _output_scale(cfg, scale, r, gain, adc)
    if y.shape[0] > 1:
        out = y.mul_(scale).sum(0)
    elif bias is not None and not row_range:
        out = torch.addcmul(bias, y[0], scale[0])
        bias = None
    else:
        out = y[0].mul_(scale[0])
    if row_range:
        out.mul_(r * gain)
    if bias is not None:
        out.add_(bias)
    return out, gate


def _adc_steps(cfg: AnalogConfig, adc: torch.Tensor) -> torch.Tensor:
    """The ADC step of every tile, (T,): 2·range / (2^bits − 2)."""
    return adc.detach() * (2.0 / (2 ** cfg.adc.bits - 2))


def _output_scale(cfg: AnalogConfig, scale: torch.Tensor, r: torch.Tensor, gain: float,
                  adc: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """The per tile-column multiplier after the ADC: tile scale × ADC step (the outputs are codes) ×
    DAC range × gain, and whether the range is per input row (dynamic), in which case it multiplies the
    summed output instead."""
    if adc is not None:
        scale = scale * _adc_steps(cfg, adc).view(-1, 1, 1)
    row_range = r.dim() > 0 and r.numel() > 1
    if not row_range:
        scale = scale * (r.detach() * gain)
    return scale, row_range


def _fusable(chip: ChipState | None, wn: torch.Tensor) -> bool:
    """Whether a read can run on the fused CPU kernel: float32 on CPU and, on the chip, per-column read
    noise (the exact per-device read noise stays eager). Every such read does, with or without
    autograd, so a seed gives the same noise in eval and in training through the chip."""
    return (wn.device.type == "cpu" and wn.dtype == torch.float32
            and (chip is None or chip.read_var is None or chip.read_var.shape[-2] == 1)
            and kernel.library() is not None)


def _fused_read(y: torch.Tensor, usq: torch.Tensor | None, cfg: AnalogConfig, chip: ChipState | None, e: int,
                scale: torch.Tensor, r: torch.Tensor, gain: float, bias: torch.Tensor | None,
                need_grad: bool, adc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_eager_read` as one pass of :func:`analogllm.ops.cpu.read` (``usq``: Σ u² per tile and
    row, from :func:`analogllm.ops.cpu.dac`): the same arithmetic and distributions, the kernel's own
    noise samples. Training noise is the same read with σ_w² as every column's read variance."""
    if chip is None:
        sw = cfg.training.weight_noise
        rv = torch.full((y.shape[0], y.shape[-1]), sw**2, dtype=y.dtype) if sw > 0 else None
        shot2, const_var = 0.0, cfg.training.output_noise**2
    else:
        rv = None if chip.read_var is None else chip.read_var[e]
        shot2, const_var = cfg.device.output_var_terms()
        const_var += cfg.output.noise**2
    scale, row_range = _output_scale(cfg, scale, r, gain, adc)
    adc_spec = None if adc is None else (adc.detach().float(), _inverse_steps(cfg, adc))
    out, gate = kernel.read(y, scale.detach(), usq=usq, rv=rv, shot2=shot2, const_var=const_var,
                            sat=cfg.output.saturation if cfg.output.nonlinearity == "tanh" else None, adc=adc_spec,
                            bias=None if row_range else bias, need_gate=need_grad)
    if row_range:
        out.mul_(r * gain)
        if bias is not None:
            out.add_(bias)
    return out, gate


def _noisy(cfg: AnalogConfig, chip: ChipState | None) -> bool:
    if chip is None:
        return cfg.training.weight_noise > 0 or cfg.training.output_noise > 0
    return chip.read_var is not None or cfg.output.noise > 0 or cfg.device.output_noise


def _add_noise(y: torch.Tensor, ut: torch.Tensor, cfg: AnalogConfig, chip: ChipState | None, e: int,
               n: torch.Tensor) -> None:
    """Add, in place, all Gaussian noise of one read (``n`` standard normal), in normalised output
    units (T, N, out).

    Training: weight noise σ_w (relative to the tile column's abs-max) is output noise of std
    σ_w·‖u_t‖, plus output noise σ_o. Chip: read noise (per-column mean variance × ‖u_t‖², or the exact
    per-device sum), the profile's output noise, and signal-dependent detector noise."""
    if chip is None:
        sw, so = cfg.training.weight_noise, cfg.training.output_noise
        if sw > 0:
            y.addcmul_(n, ut.square().sum(-1, keepdim=True).mul_(sw**2).add_(so**2).sqrt_())
        else:
            y.add_(n, alpha=so)
        return
    var: torch.Tensor | None = None
    if chip.read_var is not None:
        rv = chip.read_var[e]
        var = ut.square().sum(-1, keepdim=True) * rv if rv.shape[-2] == 1 else torch.bmm(ut.square(), rv)
    dev_var = cfg.device.output_var(y)
    if dev_var is not None:
        var = dev_var if var is None else var.add_(dev_var)
    if var is None:  # only the profile's constant output noise
        y.add_(n, alpha=cfg.output.noise)
        return
    if cfg.output.noise > 0:
        var.add_(cfg.output.noise**2)
    y.addcmul_(n, var.sqrt_())


def _converters(y: torch.Tensor, cfg: AnalogConfig, adc: torch.Tensor | None, need_grad: bool) -> torch.Tensor | None:
    """Output nonlinearity and ADC (range per tile ``adc``, or None for none), in place on ``y``,
    leaving it in ADC codes when the ADC is on. Returns the backward gate (derivative of the
    nonlinearity × inside-the-bound mask) or None when it is all ones."""
    gate = None
    out = cfg.output
    if out.nonlinearity == "tanh":
        y.div_(out.saturation).tanh_()
        if need_grad:
            gate = 1.0 - y.square()
        y.mul_(out.saturation)
    if adc is None:
        return gate
    bound = adc.detach().to(y.dtype).view(-1, 1, 1)
    outside = (y.abs() > bound).any()
    if outside:
        if need_grad:
            inside = y.abs() <= bound
            gate = inside if gate is None else gate.mul_(inside)
        y.clamp_(-bound, bound)
    y.mul_(_inverse_steps(cfg, adc).to(y.dtype).view(-1, 1, 1)).round_()  # × 1/step, as the fused kernel
    return gate


def _inverse_steps(cfg: AnalogConfig, adc: torch.Tensor) -> torch.Tensor:
    """1 / ADC step per tile, in float32 as both read paths multiply by it (bit-identical codes)."""
    return 1.0 / _adc_steps(cfg, adc).float()
