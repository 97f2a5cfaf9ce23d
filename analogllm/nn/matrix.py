"""AnalogMatrix: one weight matrix (or a stack of expert matrices) as it lives on the chip.

Every adapter (``nn.Linear``, GPT-2 ``Conv1D``, MoE experts, raw weights read by a model) owns one of
these and calls it in place of ``F.linear``. It holds what the chip adds to a matmul — the converter
ranges, the digital input transform of the mapping, and the programmed chip (:class:`Chip`) — and runs
one read of :mod:`analogllm.ops.read`.

Its mode is explicit and independent of ``nn.Module.training`` (so ``model.train()`` from an HF
``Trainer``, accelerate or peft never swaps the chip for something else):

* ``chip`` (default): the programmed chip instance. Programmed lazily on first use (config seed, t = 0)
  and again whenever the weight changes in place, keeping seed and drift time; read noise is fresh per read.
  A weight that requires grad gets the straight-through gradient of the chip's product (training with
  the chip in the loop, e.g. analogue LoRA adapters), and is written to the chip again after each step.
* ``hwa``: hardware-aware training. The digital weights, clipped per channel, with training noise in
  output space (Gaussian of a fraction of the tile column's max, or the device's own statistics at a
  sampled deployment time) and the converters, all with straight-through gradients. The deterministic
  read-side effects of the profile (IR drop, DAC nonlinearity) are read too; the static ADC errors are a
  chip instance's, so only ``chip`` reads have them.
* ``digital``: a plain matmul on the (transformed) input: calibration passes and the exact reference.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from analogllm.chip.compensate import InputMoment
from analogllm.chip.correct import measured_correction
from analogllm.chip.state import (Chip, calibrated_gain, dense_weight, normalised_tiles, programming_targets, realise,
                                  stable_id)
from analogllm.config import AnalogConfig
from analogllm.nn.transform import InputTransform
from analogllm.ops.quant import clip_bound
from analogllm.ops.read import read, tile_weight, untile_weight

MODES = ("chip", "hwa", "digital")
M = TypeVar("M", bound=nn.Module)
_EPS = 1e-12


class AnalogMatrix(nn.Module):
    """The analogue state and data path of a weight matrix of shape (out, in) or (E, out, in).

    It holds no copy of the weight: the owner passes it in, so peft, accelerate and ``state_dict`` see
    the original parameter. ``name`` is the owning module's name; it identifies the matrix on a chip.
    """

    def __init__(self, config: AnalogConfig, name: str, in_features: int, experts: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.uid = stable_id(name)
        self.in_features = in_features
        self.experts = experts
        # ceil(in / rows) arrays, the inputs split evenly across them (768 inputs on 512-row arrays use
        # 384 rows of each): the same number of ADCs as packing, without a mostly-empty last tile.
        self.tiles = math.ceil(in_features / (config.tiling.rows or in_features))
        self.rows = math.ceil(in_features / self.tiles)
        self.mode = "chip"
        self.train_seconds = 0.0  # the deployment time whose device statistics HWA noise follows
        self.transform: InputTransform | None = None
        self.moment: InputMoment | None = None  # input statistics for closed-loop programming (mapping)
        self.chip = Chip()
        shape = (experts,) if experts else ()
        init = config.dac.init_range
        self.range_set = init is not None  # a Python flag: the forward never syncs to ask a tensor
        if config.dac.range == "learned":
            self.input_range = nn.Parameter(torch.full(shape, float(init or 0.0)))
            self.register_buffer("range_ready", torch.tensor(init is not None))
        elif config.dac.range == "static":
            self.register_buffer("input_range", torch.full(shape, float(init)))
        if config.adc.bits is not None:
            # the ADC range of every input tile (normalised units): the profile's full scale until a
            # calibration narrows it (a higher gain in front of the ADC) or training learns it
            self.output_range = nn.Parameter(torch.full((*shape, self.tiles), float(config.adc.bound)),
                                             requires_grad=False)

    def extra_repr(self) -> str:
        return f"{self.name}, device={self.config.device.kind}, tiles={self.tiles}x{self.rows}, mode={self.mode}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 (torch hook)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if hasattr(self, "range_ready"):
            self.range_set = bool(self.range_ready)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != "chip" and self.chip.deployed:
            raise RuntimeError(f"{self.name}: deployed with analogllm.deploy_, so only its chip remains ('chip' mode)")
        self.mode = mode

    def _state_device(self) -> torch.device:
        """Where this matrix's own state lives (its buffers'), for state added after conversion."""
        return next(iter(self.buffers()), torch.empty(0)).device

    def set_transform(self, scale: bool = False, rotation_seed: int | None = None) -> InputTransform:
        """Put a digital input transform in front of the DAC (see :mod:`analogllm.nn.transform`); the
        owner's weight must absorb it (:meth:`InputTransform.absorb`) for the product to stay the same."""
        self.transform = InputTransform(self.in_features, scale, rotation_seed).to(self._state_device())
        return self.transform

    def set_moment(self, rank: int) -> InputMoment:
        """Give the matrix input statistics of ``rank`` for closed-loop programming
        (:mod:`analogllm.chip.compensate`), zero until fitted or loaded."""
        self.moment = InputMoment(self.in_features, rank).to(self._state_device())
        return self.moment

    def mark_range_set(self) -> None:
        """Record that the DAC range was set (by calibration or a checkpoint), so no first-batch init."""
        self.range_set = True
        if hasattr(self, "range_ready"):
            self.range_ready.fill_(True)

    # ----- the forward data path ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, expert: int | None = None):
        """y = analogue(x · Wᵀ) + bias. ``weight`` is the owner's whole parameter: (out, in), or
        (E, out, in) for experts, in which case ``expert`` picks the matrix."""
        if self.transform is not None:
            x = self.transform(x)
        w = weight if expert is None else weight[expert]
        if self.mode == "digital" or self.config.is_identity:
            return F.linear(x, w, bias)
        if torch.is_autocast_enabled(x.device.type):  # the chip's arithmetic runs in the weight's dtype
            with torch.autocast(x.device.type, enabled=False):
                return self._read(x.to(self._dtype(w)), w, weight, bias, expert)
        return self._read(x, w, weight, bias, expert)

    def _dtype(self, w: torch.Tensor) -> torch.dtype:
        return self.chip.tiles.dtype if self.mode == "chip" and self.chip.programmed else w.dtype

    def _read(self, x: torch.Tensor, w: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              expert: int | None) -> torch.Tensor:
        cfg = self.config
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        e = 0 if expert is None else expert
        r = self._dac_range(x2, expert)
        if self.mode == "chip":
            self.ensure_programmed(weight)
            chip = self.chip
            tiles, scale, gain = chip.tiles[e], chip.scale[e], chip.gain[e]
            read_var = None if chip.read_var is None else chip.read_var[e]
            adc_gain = None if chip.adc_gain is None else chip.adc_gain[e]
            adc_offset = None if chip.adc_offset is None else chip.adc_offset[e]
            # a trainable weight read on the chip (an analogue LoRA adapter, chip-in-the-loop training)
            # gets the straight-through gradient of the chip's product; the chip is rewritten after a step
            w_arg, clip = (w, None) if w.requires_grad else (None, None)
            a, b = cfg.device.output_var_terms()
            out_var, shot, quantize = cfg.output.noise**2 + b, a, True
        else:
            tiles, scale, read_var, clip, out_var, shot, alpha = self._training_read(w)
            gain = torch.full((), alpha, dtype=w.dtype, device=w.device)
            w_arg, quantize = w, cfg.training.quantize
            adc_gain = adc_offset = None  # a chip's own ADCs; training does not know which chip it will run on
        adc = None
        if cfg.adc.bits is not None and quantize:
            adc = self.output_range if expert is None else self.output_range[expert]
        x2 = x2.to(tiles.dtype)
        need_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x2, w_arg, r, bias, adc))
        noisy = read_var is not None or out_var > 0 or shot > 0
        key = (torch.randint(0, 2**32, (2,), device=x2.device) if noisy
               else torch.zeros(2, dtype=torch.int64, device=x2.device))
        sat = cfg.output.saturation if cfg.output.nonlinearity == "tanh" else 0.0
        if adc is None:
            adc_gain = adc_offset = None
        rho = cfg.ir_drop_rho / self._pulse(e) if cfg.ir_drop_rho else 0.0
        out, _, _, _ = read(x2, tiles, scale, r.to(tiles.dtype), gain.to(tiles.dtype), adc, read_var,
                            None if bias is None else bias.to(tiles.dtype), w_arg, clip, key,
                            cfg.dac.bits or 0 if quantize else 0, cfg.adc.bits or 0, float(out_var), float(shot),
                            float(sat), need_grad, need_grad and adc is not None and adc.requires_grad,
                            adc_gain, adc_offset, rho, float(cfg.dac.inl) if quantize else 0.0)
        if self.mode == "chip" and self.chip.correct_in is not None:  # digital, after the ADCs
            out = out + (x2 @ self.chip.correct_in[e].T) @ self.chip.correct_out[e].T
        return out.reshape(*lead, out.shape[-1])

    def _dac_range(self, x: torch.Tensor, expert: int | None) -> torch.Tensor:
        """The DAC range r: per row (dynamic, no gradient) or the layer's static/learned scalar."""
        dac = self.config.dac
        if dac.range == "dynamic":
            return x.detach().abs().amax(-1).clamp_(min=_EPS)
        if dac.range == "learned" and not self.range_set:
            with torch.no_grad():  # data-initialised range: no clipping on the first batch seen
                self.input_range.fill_(float(x.abs().max().clamp(min=_EPS)))
            self.mark_range_set()
        # reshape: ZeRO-3 training holds the scalar range as (1,) (analogllm.training.sharding)
        r = self.input_range.reshape(()) if expert is None else self.input_range[expert]
        return r.abs() + _EPS

    def _pulse(self, e: int) -> float:
        """The factor α by which pulse compensation lengthens this read's pulses (1 without it). Longer
        pulses restore the charge, not the current: the wires carry the drifted devices' current, so the
        IR drop of tiles that hold α-scaled weights is priced at ρ/α."""
        if self.config.drift.compensation_at != "pulse":
            return 1.0
        if self.mode == "chip":
            return 1.0 if self.chip.pulse is None else float(self.chip.pulse[e])
        if self.config.training.noise == "device":  # the training read's tiles are the compensated ones
            from analogllm.chip.statistics import compensation_gain

            return compensation_gain(self.config, self.train_seconds)
        return 1.0

    def _training_read(self, w: torch.Tensor):
        """(tiles, scale, read_var, clip, out_var, shot, gain) of a hardware-aware training read: the
        clipped digital weight tiles, the training noise (see :class:`~analogllm.config.TrainingConfig`),
        and the digital gain after the ADC. With ``device`` noise and drift compensated digitally, the
        tiles are the drifted chip's (shrunk by 1/α) and the gain α restores them after the output noise
        and the ADC, as on the chip; pulse compensation restores them in front, so the gain stays 1."""
        if self.chip.deployed:
            raise RuntimeError(f"{self.name}: deployed with analogllm.deploy_; it has no digital weights to train")
        tr = self.config.training
        bound = clip_bound(w, tr.clip_sigma)
        wt = tile_weight(w if bound is None else w.clamp(-bound, bound), self.tiles, self.rows).detach()  # T, out, R
        scale = wt.abs().amax(-1, keepdim=True).clamp(min=_EPS)
        wn = wt / scale
        alpha = 1.0
        if tr.noise == "device":
            from analogllm.chip.statistics import compensation_gain, device_statistics

            bias, var = device_statistics(self.config, self.train_seconds)
            wn, read_var = bias.apply(wn), var.lookup(wn.abs()).mean(-1)
            a, b = self.config.device.output_var_terms()
            out_var, shot = self.config.output.noise**2 + b, a
            if self.config.drift.compensation_at == "digital":
                alpha = compensation_gain(self.config, self.train_seconds)
                if alpha != 1.0:
                    wn, read_var = wn / alpha, read_var / alpha**2
        else:
            read_var = torch.full(wn.shape[:2], tr.weight_noise**2, dtype=wn.dtype, device=wn.device) if tr.weight_noise else None
            out_var, shot = tr.output_noise**2, 0.0
        return wn.transpose(-1, -2), scale.squeeze(-1), read_var, bound, out_var, shot, alpha

    # ----- the chip -------------------------------------------------------------------------------------
    def ensure_programmed(self, weight: torch.Tensor) -> None:
        """Program the chip when it never was, or again (same seed and time) when the weight changed."""
        chip = self.chip
        if chip.fixed:  # deployed, or read back from a measured chip: never recomputed from the weight
            return
        if not chip.programmed or chip.source != (weight._version, weight.data_ptr()):
            self.program(weight, self.config.seed if chip.seed is None else chip.seed, chip.seconds)

    @torch.no_grad()
    def program(self, weight: torch.Tensor, seed: int, seconds: float | None = None,
                reference: torch.Tensor | None = None, **replay) -> Chip:
        """Sample chip instance ``seed`` of this matrix and read it ``seconds`` after programming
        (default: the chip's current age). ``replay`` passes ``device=``/``targets=`` to
        :func:`~analogllm.chip.state.realise` (programming from an exported map). ``reference``: the
        weight the measured correction aims the chip at, when ``weight`` is a map's targets rather than
        the model's (closed-loop programming moves the targets away from it); default ``weight``."""
        self.require_digital()
        self.chip.check_writable(self.name)
        seconds = self.chip.seconds if seconds is None else float(seconds)
        moment = None if replay else self.moment  # a replayed map holds its instance's targets already
        state = realise(self.config, weight, self.tiles, self.rows, seed, self.uid, seconds, moment=moment, **replay)
        if self.config.mapping.correction_rank:
            state.correct_in, state.correct_out = measured_correction(
                self.config, weight if reference is None else reference, state, self.moment, seed, self.uid, seconds)
        self.chip.store(state, weight, seed, seconds, (weight._version, weight.data_ptr()))
        return self.chip

    def calibrated_gain(self, weight: torch.Tensor, seed: int) -> torch.Tensor:
        """The digital gain (E,) chip instance ``seed`` applies at the chip's current age, without
        programming it (:func:`~analogllm.chip.state.calibrated_gain`: no realised layer is kept)."""
        self.require_digital()
        return calibrated_gain(self.config, weight, self.tiles, self.rows, seed, self.uid, self.chip.seconds,
                               moment=self.moment)

    def realised_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The dense (…, out, in) matrix this chip instance computes, scales, gain and measured correction
        folded in (without converters or read noise): for raw-weight reads and for export checks."""
        self.ensure_programmed(weight)
        chip = self.chip
        w = dense_weight(chip.tiles, chip.scale, chip.gain, self.in_features)
        if chip.correct_in is not None:
            w = w + chip.correct_out @ chip.correct_in
        return w if weight.dim() == 3 else w[0]

    def normalised_tiles(self, weight: torch.Tensor, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., out, in) → tiles normalised per tile column to [-1, 1], (..., T, out, rows), and their
        scales (..., T, out, 1): what the arrays hold. With ``seed``, the targets chip instance ``seed`` is
        programmed to (closed-loop programming moves them when the matrix has a moment), as (E, T, out,
        rows). The exporter uses this very function, so a map's targets are the layer's bit for bit."""
        self.require_digital()
        if seed is None:
            return normalised_tiles(weight, self.tiles, self.rows)
        return programming_targets(self.config, weight, self.tiles, self.rows, seed, self.uid, self.moment)

    def target_weight(self, weight: torch.Tensor, seed: int) -> torch.Tensor:
        """The dense (E, out, in) weight chip instance ``seed`` is programmed to: ``weight`` itself, or
        where closed-loop programming moved the targets, those (what an exported map of it holds)."""
        tiles, scale = self.normalised_tiles(weight, seed)
        return untile_weight(tiles * scale, self.in_features)

    def require_digital(self) -> None:
        if self.chip.deployed:
            raise RuntimeError(
                f"analogue layer {self.name} was deployed with analogllm.deploy_: its digital weights were freed, "
                "so it can only read its chip. Reload the model to train, reprogram, drift, export or save it.")


def beside(module: M, weight: torch.Tensor) -> M:
    """``module`` (the analogue state or a digital transform of a weight) on ``weight``'s device; left where
    it was made for a weight on the meta device (a model built empty: transformers' loader fills the
    state in, a streamed load keeps it on the CPU until its block's weights arrive,
    :mod:`analogllm.hf.streaming`)."""
    return module if weight.is_meta else module.to(weight.device)


__all__ = ["MODES", "AnalogMatrix", "beside"]
