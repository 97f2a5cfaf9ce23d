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

Tiling is one batched matmul over a (T, N, rows) view of the input, never a Python loop over tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from analogllm.config import AnalogConfig
from analogllm.nn.quant import adc_step, clamp_round, dac_levels, saturate

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
        rows = config.tiling.rows or in_features
        self.rows = min(rows, in_features)
        self.tiles = math.ceil(in_features / self.rows)
        self.seconds = 0.0
        self.seed: int | None = None
        self._chip: ChipState | None = None
        shape = (experts,) if experts else ()
        init = config.dac.init_range or 0.0
        if config.dac.range == "learned":
            self.input_range = nn.Parameter(torch.full(shape, float(init)))
            self.register_buffer("range_ready", torch.tensor(config.dac.init_range is not None))
        elif config.dac.range == "static":
            self.register_buffer("input_range", torch.full(shape, float(init)))

    def extra_repr(self) -> str:
        return f"device={self.config.device.kind}, tiles={self.tiles}x{self.rows}, layer_id={self.layer_id}"

    # ----- the forward data path ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, expert: int | None = None):
        """y = analogue(x · Wᵀ) + bias. ``weight`` is the owner's whole parameter: (out, in), or
        (E, out, in) for experts, in which case ``expert`` picks the matrix."""
        cfg = self.config
        w = weight if expert is None else weight[expert]
        if cfg.is_identity:
            return F.linear(x, w, bias)
        lead = x.shape[:-1]
        xq, r = self._dac(x.reshape(-1, x.shape[-1]), expert)
        if self.training:
            y, scale, gain = self._train_matmul(xq, w)
        else:
            y, scale, gain = self._chip_matmul(xq, weight, expert)
        if cfg.output.nonlinearity != "none":
            y = saturate(y, cfg.output.nonlinearity, cfg.output.saturation)
        if cfg.adc.bits is not None and (cfg.training.quantize or not self.training):
            y = clamp_round(y, cfg.adc.bound, adc_step(cfg.adc.bits, cfg.adc.bound))
        y = y * scale
        y = y.sum(0) if self.tiles > 1 else y[0]
        y = y * (r * gain)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])

    def _dac(self, x: torch.Tensor, expert: int | None) -> tuple[torch.Tensor, torch.Tensor | float]:
        dac = self.config.dac
        if dac.range == "dynamic":
            r = x.detach().abs().amax(-1, keepdim=True).clamp(min=_EPS)
        else:
            if dac.range == "learned" and not bool(self.range_ready):
                with torch.no_grad():  # data-initialised range: no clipping on the first batch seen
                    self.input_range.fill_(float(x.abs().max().clamp(min=_EPS)))
                    self.range_ready.fill_(True)
            r = self.input_range if expert is None else self.input_range[expert]
            r = r.abs() + _EPS
        step = dac_levels(dac.bits) if (self.config.training.quantize or not self.training) else None
        if step is None and dac.range == "dynamic":
            return x / r, r
        return clamp_round(x / r, 1.0, step), r

    def _tile_input(self, xq: torch.Tensor) -> torch.Tensor:
        """(N, in) → (T, N, rows): zero-padded and viewed per input tile."""
        if self.tiles == 1:
            return xq.unsqueeze(0)
        pad = self.tiles * self.rows - xq.shape[-1]
        if pad:
            xq = F.pad(xq, (0, pad))
        return xq.view(xq.shape[0], self.tiles, self.rows).transpose(0, 1)

    def _tile_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(..., out, in) → (..., T, out, rows), zero-padded."""
        pad = self.tiles * self.rows - weight.shape[-1]
        if pad:
            weight = F.pad(weight, (0, pad))
        w = weight.reshape(*weight.shape[:-1], self.tiles, self.rows)
        return w.movedim(-2, -3)

    def _train_matmul(self, xq: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        tr = self.config.training
        w = weight
        if tr.clip_sigma is not None:
            bound = tr.clip_sigma * w.detach().std(-1, keepdim=True)
            w = torch.minimum(torch.maximum(w, -bound), bound)
        wt = self._tile_weight(w)  # (T, out, rows)
        scale = wt.detach().abs().amax(-1).clamp(min=_EPS).unsqueeze(-2)  # (T, 1, out)
        xt = self._tile_input(xq)  # (T, N, rows)
        if self.tiles == 1:
            y = F.linear(xt[0], w).unsqueeze(0)
        else:
            y = torch.bmm(xt, wt.transpose(-1, -2))
        y = y / scale
        var = None
        if tr.weight_noise > 0:  # weight noise σ·s on every weight ⇔ output noise σ·‖x_t‖ in normalised units
            var = xt.detach().square().sum(-1, keepdim=True) * tr.weight_noise**2
        if tr.output_noise > 0:
            var = tr.output_noise**2 if var is None else var + tr.output_noise**2
        if var is not None:
            y = y + torch.randn_like(y) * (var.sqrt() if isinstance(var, torch.Tensor) else math.sqrt(var))
        return y, scale, 1.0

    def _chip_matmul(self, xq: torch.Tensor, weight: torch.Tensor, expert: int | None):
        chip = self.chip(weight)
        e = 0 if expert is None else expert
        w, scale = chip.weight[e], chip.scale[e]  # (T, rows, out), (T, 1, out)
        xt = self._tile_input(xq)
        y = torch.bmm(xt, w) if self.tiles > 1 else torch.mm(xt[0], w[0]).unsqueeze(0)
        var = None
        if chip.read_var is not None:
            rv = chip.read_var[e]
            if rv.shape[-2] == 1:  # mean variance per column × ‖x_t‖²
                var = xt.square().sum(-1, keepdim=True) * rv
            else:
                var = torch.bmm(xt.square(), rv)
        noise = self.config.output.noise
        if noise > 0:
            var = noise**2 if var is None else var + noise**2
        dev_std = self.config.device.output_std(y)
        if dev_std is not None:
            var = dev_std.square() if var is None else var + dev_std.square()
        if var is not None:
            y = y + torch.randn_like(y) * (var.sqrt() if isinstance(var, torch.Tensor) else math.sqrt(var))
        return y, scale, chip.gain

    # ----- chip instances ----------------------------------------------------------------------------------
    def chip(self, weight: torch.Tensor) -> ChipState:
        """The cached chip state; (re)programmed when missing or when the weight changed in place
        (e.g. after an optimiser step), keeping the chip's seed and drift time."""
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
        wt = self._tile_weight(w)  # (E, T, out, rows)
        scale = wt.abs().amax(-1, keepdim=True).clamp(min=_EPS)  # (E, T, out, 1)
        wn = wt / scale
        flat = wn.reshape(-1, *wn.shape[-2:])
        real = device.realise(flat, self.seconds, chip_generator(seed, self.layer_id, w.device))
        gain = float(real.gain)
        if self.config.drift.compensation and device.drifts and self.seconds > 0:
            ref = device.realise(flat, 0.0, chip_generator(seed, self.layer_id, w.device))
            gain *= _drift_compensation(ref.weight, real.weight, self.config.drift.calibration_vectors)
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
        w = (chip.weight * chip.scale).transpose(-1, -2)  # (E, T, out, rows)
        w = w.movedim(-3, -2).reshape(*w.shape[:-3], w.shape[-2], -1)[..., : self.in_features] * chip.gain
        return w if weight.dim() == 3 else w[0]

    def drop_chip(self) -> None:
        """Forget the cached chip state (it is recomputed on the next eval forward)."""
        self._chip = None


def _drift_compensation(ref: torch.Tensor, now: torch.Tensor, vectors: int) -> float:
    """Global drift compensation α = Σ|X·W_ref| / Σ|X·W_now| for a fixed ±1 calibration input X."""
    gen = torch.Generator(device=ref.device).manual_seed(20)
    x = torch.randint(0, 2, (vectors, ref.shape[-1]), generator=gen, device=ref.device).to(ref.dtype) * 2 - 1
    num = torch.matmul(ref, x.T).abs().sum()
    den = torch.matmul(now, x.T).abs().sum().clamp(min=_EPS)
    return float(num / den)
