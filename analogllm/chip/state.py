"""A chip instance as module state: what one weight matrix (or stack of expert matrices) is programmed to.

Programming is random but fixed once written: programming noise, device-to-device variation, drift
exponents, mesh phase errors, and the static gain and offset errors of the chip's column ADCs. :class:`Chip`
holds the result as buffers — the realised normalised tiles, their column scales, the per-read noise
variance, the digital gain and the ADC errors — so ``.to()``, ``deepcopy``, pickling and device moves
carry the chip along. The buffers are not part of ``state_dict``: a chip is a
deterministic function of (weights, seed, time), and a checkpoint stores those instead.

A chip is always realised on a CPU generator seeded from (chip seed, the matrix's module name), so a seed
gives the same chip on every device and in every conversion order; the tensors then move to the
weight's device.

Drift compensation is the chip's own calibration: a fixed input (documented below) is read through the
arrays right after programming and again at time t, both reads with the chip's read and output noise,
IR drop and ADC gain and offset errors, and one digital gain per layer restores the mean output magnitude
(aihwkit GlobalDriftCompensation).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from analogllm.chip.compensate import InputMoment, compensated_targets
from analogllm.chip.statistics import output_variance
from analogllm.config import AnalogConfig
from analogllm.devices.base import Device

_EPS = 1e-12
#: the drift-compensation calibration input: ``vectors`` rows of ±1, from this generator seed
CALIBRATION_SEED = 20


def stable_id(name: str) -> int:
    """A 63-bit id of a module name: chips differ by layer through their names, not conversion order."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def chip_generator(seed: int, uid: int) -> torch.Generator:
    """The CPU generator of one matrix of chip instance ``seed``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + uid) % (2**63 - 1))


#: streams of the column ADCs' static errors, apart from the devices' (switching an error on or off moves
#: no other random number of the chip), and the same at every drift time (the ADCs do not age)
ADC_GAIN_STREAM, ADC_OFFSET_STREAM = stable_id("adc gain errors"), stable_id("adc offset errors")


#: stream of the verify reads of closed-loop programming, apart from the devices' own draws
VERIFY_STREAM = stable_id("verify reads")


def adc_errors(config: AnalogConfig, shape: tuple[int, ...], seed: int,
               uid: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The static (gain, offset) of every column ADC of chip instance ``seed`` ((E, T, out) each, offsets in
    LSB), or (None, None) with ideal ADCs: g = 1 + gain_std·z, o = offset_std·z', z and z' ~ N(0, 1) from
    streams of their own (an error that is off draws nothing)."""
    adc = config.adc
    if not adc.has_errors:
        return None, None
    gain = torch.ones(shape)
    if adc.gain_std > 0:
        gain = gain + adc.gain_std * torch.randn(shape, generator=chip_generator(seed, uid ^ ADC_GAIN_STREAM))
    offset = torch.zeros(shape)
    if adc.offset_std > 0:
        offset = adc.offset_std * torch.randn(shape, generator=chip_generator(seed, uid ^ ADC_OFFSET_STREAM))
    return gain, offset


@dataclass
class Programmed:
    """The arrays of one programming (CPU, float32): tiles (E, T, rows, out), scale (E, T, out),
    read_var (E, T, out) or exact (E, T, rows, out) or None, the digital gain (E,), and the column ADCs'
    static errors adc_gain, adc_offset (E, T, out; offsets in LSB) or None. ``pulse`` (E,) is the drift
    compensation applied as longer input pulses (``drift.compensation_at: pulse``): already folded into
    ``tiles`` and ``read_var``, kept to report it. ``correct_in`` (E, k, in) and ``correct_out`` (E, out, k)
    are the measured low-rank correction the chip adds digitally after its ADCs (:mod:`analogllm.chip.correct`),
    or None."""

    tiles: torch.Tensor
    scale: torch.Tensor
    read_var: torch.Tensor | None
    gain: torch.Tensor
    adc_gain: torch.Tensor | None = None
    adc_offset: torch.Tensor | None = None
    pulse: torch.Tensor | None = None
    correct_in: torch.Tensor | None = None
    correct_out: torch.Tensor | None = None

    @property
    def compensation(self) -> torch.Tensor:
        """The layer's whole output-scale correction (E,): digital gain × pulse factor."""
        return whole_compensation(self.gain, self.pulse)

    def dense(self, in_features: int) -> torch.Tensor:
        """The (E, out, in) matrix the arrays compute, scales and digital gain folded in (no converters,
        read noise or correction)."""
        return dense_weight(self.tiles, self.scale, self.gain, in_features)


def dense_weight(tiles: torch.Tensor, scale: torch.Tensor, gain: torch.Tensor, in_features: int) -> torch.Tensor:
    """Tiles (E, T, rows, out) with their column scales (E, T, out) and gain (E,) as the dense (E, out, in)
    matrix they compute."""
    from analogllm.ops.read import untile_weight

    return untile_weight(tiles.transpose(-1, -2) * scale.unsqueeze(-1), in_features) * gain.view(-1, 1, 1)


def whole_compensation(gain: torch.Tensor, pulse: torch.Tensor | None) -> torch.Tensor:
    """Digital gain × pulse factor (E,): the drift compensation wherever the chip applies it (what a map
    records as ``gain``)."""
    return gain if pulse is None else gain * pulse


def compensate(config: AnalogConfig, state: Programmed, alpha: torch.Tensor) -> Programmed:
    """Apply the drift compensation ``alpha`` (E,) where ``config.drift.compensation_at`` says the chip
    applies it: a digital gain after the ADC, or longer input pulses, which scale what the arrays output
    (their read noise included) in front of the output stage and the ADC."""
    if config.drift.compensation_at == "digital":
        state.gain = state.gain * alpha
        return state
    state.tiles.mul_(alpha.view(-1, 1, 1, 1))  # in place: a Programmed owns its arrays
    if state.read_var is not None:
        state.read_var.mul_(alpha.square().view(-1, *([1] * (state.read_var.dim() - 1))))
    state.pulse = alpha if state.pulse is None else state.pulse * alpha
    return state


_BUFFERS = ("tiles", "scale", "read_var", "gain", "adc_gain", "adc_offset", "pulse", "correct_in", "correct_out")


class Chip(nn.Module):
    """The programmed state of one :class:`~analogllm.nn.matrix.AnalogMatrix` (all its experts)."""

    def __init__(self) -> None:
        super().__init__()
        for name in _BUFFERS:
            self.register_buffer(name, None, persistent=False)
        self.seed: int | None = None
        self.seconds = 0.0
        self.source: tuple[int, int] | None = None  # (weight._version, data_ptr) it was programmed from
        self.deployed = False
        #: set when the state was read back from a measured chip (analogllm.export.readback): what was
        #: measured (map and measurement checksums, folder, time). Such a state is not a function of
        #: (weights, seed, time), so nothing may recompute it.
        self.read_back: dict[str, Any] | None = None

    @property
    def programmed(self) -> bool:
        return self.tiles is not None

    @property
    def fixed(self) -> bool:
        """True when the state must never be recomputed from the weight: a deployed chip (its digital
        weights are gone) or one read back from measurements (it is whatever the hardware holds)."""
        return self.deployed or self.read_back is not None

    def check_writable(self, name: str) -> None:
        """Raise unless this state may be (re)programmed: a read-back chip is a measurement of a physical
        chip, and programming or ageing the simulation would silently replace it with a simulated one."""
        if self.read_back is not None:
            raise RuntimeError(
                f"analogue layer {name} holds a chip read back from measurements "
                f"({self.read_back.get('measured', 'a measurement')}): it cannot be reprogrammed, drifted or "
                "merged in simulation. Measure the chip again and read it back to follow it, or load the "
                "model from the map to simulate a fresh chip instance.")

    def extra_repr(self) -> str:
        if not self.programmed:
            return "not programmed"
        where = ", read back" if self.read_back is not None else ", deployed" if self.deployed else ""
        return f"seed={self.seed}, seconds={self.seconds:g}{where}"

    def store(self, state: Programmed, like: torch.Tensor, seed: int, seconds: float, source: tuple[int, int]) -> None:
        """Keep ``state`` on ``like``'s device and dtype."""
        kw = dict(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
        for name in _BUFFERS:
            value = getattr(state, name)
            setattr(self, name, None if value is None else value.to(**kw))
        self.seed, self.seconds, self.source = seed, float(seconds), source

    def clear(self) -> None:
        """Drop the realised arrays, keeping which chip this is (seed, time): it is realised again, the
        same, on next use. What lets a map be written layer by layer without holding every chip."""
        for name in _BUFFERS:
            setattr(self, name, None)
        self.source = None

    @property
    def compensation(self) -> torch.Tensor:
        """The layer's whole output-scale correction (E,): :func:`whole_compensation` of its buffers."""
        return whole_compensation(self.gain, self.pulse)


def tile_scales(weight: torch.Tensor, tiles: int, rows: int) -> torch.Tensor:
    """max |w| of every tile column of ``weight`` (..., out, in), (..., T, out, 1), from the weight itself
    (the norm kernel takes no |w| copy of the tiles); a tile of padding only is 0, clamped."""
    return torch.stack([torch.linalg.vector_norm(weight[..., t * rows:(t + 1) * rows], ord=float("inf"), dim=-1)
                        if t * rows < weight.shape[-1] else weight.new_zeros(weight.shape[:-1])
                        for t in range(tiles)], dim=-2).unsqueeze(-1).clamp_(min=_EPS)


def normalised_tiles(weight: torch.Tensor, tiles: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) → per tile-column normalised tiles (..., T, out, rows) in [−1, 1] and their scales
    (..., T, out, 1): what the arrays hold and what is multiplied back after the ADC."""
    from analogllm.ops.read import tile_weight

    wt = tile_weight(weight, tiles, rows)
    scale = tile_scales(weight, tiles, rows)
    # written contiguous: the devices realise it flat without another copy
    return torch.div(wt, scale, out=torch.empty(wt.shape, dtype=wt.dtype, device=wt.device)), scale


class LazyTiles:
    """The normalised tiles of :func:`normalised_tiles` made a flat range at a time, for a caller that
    reads them once in order (a layer's drift calibration) and so need not hold the whole layer: their
    scales are taken up front (one float per tile row), and ``tiles[a:b]`` gives the values a flat view
    of the (E, T, out, rows) tiles holds in that range, bit for bit."""

    def __init__(self, weight: torch.Tensor, tiles: int, rows: int) -> None:
        self.weight, self.tiles, self.rows = weight, tiles, rows  # weight (E, out, in)
        e, out, _ = weight.shape
        self.shape = (e, tiles, out, rows)
        self.scale = tile_scales(weight, tiles, rows)

    def numel(self) -> int:
        return self.shape[0] * self.tiles * self.shape[2] * self.rows

    def __getitem__(self, span: slice) -> torch.Tensor:
        start, stop = span.start or 0, min(span.stop, self.numel())
        rows, out = self.rows, self.shape[2]
        first, last = start // rows, -(-stop // rows)  # the tile rows the range touches
        parts, row = [], first
        while row < last:  # one part per tile (e, t): its rows are consecutive outputs
            tile, o = divmod(row, out)
            e, t = divmod(tile, self.tiles)
            end = min(out, o + last - row)
            part = self.weight[e, o:end, t * rows:(t + 1) * rows]
            if part.shape[-1] < rows:
                part = torch.nn.functional.pad(part, (0, rows - part.shape[-1]))
            parts.append(torch.div(part, self.scale[e, t, o:end]))
            row += end - o
        flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).view(-1)
        return flat[start - first * rows:stop - first * rows]


@torch.no_grad()
def realise(config: AnalogConfig, weight: torch.Tensor, tiles: int, rows: int, seed: int, uid: int,
            seconds: float, device: Device | None = None, targets: torch.Tensor | None = None,
            moment: InputMoment | None = None) -> Programmed:
    """Program chip instance ``seed`` of the matrix ``uid`` with ``weight`` ((out, in) or (E, out, in))
    and read it ``seconds`` later. ``device`` replaces the profile's device (e.g. a map being replayed);
    ``targets`` (E, T, out, rows) replaces the normalised tiles computed from the weight; ``moment`` (the
    layer's input statistics) programs it in closed loop (:mod:`analogllm.chip.compensate`)."""
    device = device or config.device
    wn, scale = programming_targets(config, weight, tiles, rows, seed, uid, moment if targets is None else None)
    if targets is not None:
        wn = targets
    flat = wn.reshape(-1, *wn.shape[-2:])
    # the normalised tiles are this function's own (not the caller's targets): the device may overwrite them
    realise_flat = device.realise if targets is not None else device.realise_consuming
    real = realise_flat(flat, seconds, chip_generator(seed, uid))
    gain = torch.full((wn.shape[0],), float(real.gain))
    adc_gain, adc_offset = adc_errors(config, wn.shape[:-1], seed, uid)
    alpha = None
    if config.drift.compensation and device.drifts and seconds > 0:
        ref, ref_read = real.reference, None
        if ref is None:
            at0 = device.realise(flat, 0.0, chip_generator(seed, uid))
            ref, ref_read = at0.weight, at0.read_std
        alpha = torch.full_like(gain, drift_compensation(config, ref, ref_read, real.weight, real.read_std, seed,
                                                         uid, adc_gain=adc_gain, adc_offset=adc_offset))
        del ref, ref_read
    # from here on each array is dropped as soon as its successor exists: the peak is a few copies of a layer
    shape, real.reference, flat, wn = wn.shape, None, None, None
    eff = real.weight.view(shape).transpose(-1, -2).contiguous()  # (E, T, rows, out)
    real.weight = None
    read_var = None
    if real.read_std is not None:
        rv = real.read_std.view(shape).square_()  # (E, T, out, rows)
        real.read_std = None
        read_var = rv.transpose(-1, -2).contiguous() if config.exact_read_noise else rv.mean(-1)
    state = Programmed(tiles=eff, scale=scale.squeeze(-1), read_var=read_var, gain=gain, adc_gain=adc_gain,
                       adc_offset=adc_offset)
    return state if alpha is None else compensate(config, state, alpha)


def programming_targets(config: AnalogConfig, weight: torch.Tensor, tiles: int, rows: int, seed: int, uid: int,
                        moment: InputMoment | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised tiles (E, T, out, rows) chip instance ``seed`` is programmed to, and their scales
    (E, T, out, 1): the weight's own tiles, or with a ``moment`` the targets closed-loop programming ends
    with for this instance (what an exported map holds, so replaying it gives the same chip)."""
    w = weight.detach().to("cpu", torch.float32)
    w = w.unsqueeze(0) if w.dim() == 2 else w
    wn, scale = normalised_tiles(w, tiles, rows)
    if moment is not None and w.shape[0] == 1:
        aimed = compensated_targets(config.device, wn, scale, moment, w.shape[-1], chip_generator(seed, uid),
                                    chip_generator(seed, uid ^ VERIFY_STREAM), config.mapping.verify_reads)
        wn = wn if aimed is None else aimed
    return wn, scale


def calibration_input(config: AnalogConfig, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed ±1 drift-compensation input, (``drift.calibration_vectors``, rows), from generator seed
    :data:`CALIBRATION_SEED`: the same vectors for every chip and layer, as a chip's periphery stores them."""
    vectors = config.drift.calibration_vectors
    x = torch.randint(0, 2, (vectors, rows), generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    return x.to(dtype) * 2 - 1


def reference_gain(config: AnalogConfig, ref: torch.Tensor, now: torch.Tensor) -> float:
    """Global drift compensation α = Σ|X·W_ref| / Σ|X·W_now| without read noise, for tiles (…, out, rows)
    whose reference is known rather than read (a read-back chip calibrated against the map's targets)."""
    x = calibration_input(config, ref.shape[-1], ref.dtype)
    num = torch.matmul(ref, x.T).abs().sum()
    den = torch.matmul(now.to(ref.dtype), x.T).abs().sum().clamp(min=_EPS)
    return float(num / den)


def drift_compensation(config: AnalogConfig, ref: torch.Tensor, ref_read: torch.Tensor | None, now: torch.Tensor,
                       now_read: torch.Tensor | None, seed: int, uid: int, adc_gain: torch.Tensor | None = None,
                       adc_offset: torch.Tensor | None = None) -> float:
    """Global drift compensation α = Σ|X·W_ref| / Σ|X·W_now| from two reads of the fixed calibration
    input X (``drift.calibration_vectors`` rows of ±1 from generator seed :data:`CALIBRATION_SEED`),
    each read with the chip's read noise and output noise as every other read (noise from a stream of
    this chip and layer, so the calibration is part of the chip instance), the IR drop of its column
    wires (a ±1 input loads them fully) and the static gain and offset errors of its column ADCs
    (``adc_gain``/``adc_offset``, (..., T, out), offsets in LSB of the profile's full-scale range)."""
    from analogllm.ops.read import adc_steps, ir_drop_attenuation

    x = calibration_input(config, ref.shape[-1], ref.dtype)
    gen = chip_generator(seed + 7_777, uid)
    out_var = output_variance(config)
    rho = config.ir_drop_rho
    errors = None
    if adc_gain is not None and adc_offset is not None and config.adc.bits is not None:
        step = float(adc_steps(torch.tensor(config.adc.bound), config.adc.bits))
        errors = adc_gain.reshape(-1, ref.shape[-2], 1), adc_offset.reshape(-1, ref.shape[-2], 1) * step

    def read(w: torch.Tensor, std: torch.Tensor | None) -> torch.Tensor:
        y = torch.matmul(w, x.T)  # (tiles, out, vectors)
        if rho > 0:  # the same IR drop as a read: inputs (tiles, vectors, rows), tiles (tiles, rows, out)
            u = x.unsqueeze(0).expand(w.shape[0], -1, -1)
            y = y - ir_drop_attenuation(u, w.transpose(-1, -2), rho).transpose(-1, -2)
        # x is ±1, so every vector's read variance is Σ std² along the row (no squared copy)
        return noisy_read(y, None if std is None else torch.linalg.vector_norm(std, dim=-1, keepdim=True).square_())

    def noisy_read(y: torch.Tensor, row_var: torch.Tensor | None) -> torch.Tensor:
        var = torch.full_like(y, out_var)
        if row_var is not None:
            var = var + row_var
        y = y + torch.randn(y.shape, generator=gen, dtype=y.dtype) * var.sqrt()
        return y if errors is None else y * errors[0] + errors[1]

    if isinstance(ref, CalibrationSums):  # accumulated block by block (calibrated_gain)
        num = noisy_read(ref.output(), ref.variance()).abs().sum()
        den = noisy_read(now.output(), now.variance()).abs().sum().clamp(min=_EPS)
    else:
        num = read(ref, ref_read).abs().sum()
        den = read(now, now_read).abs().sum().clamp(min=_EPS)
    return float(num / den)


class CalibrationSums:
    """The noiseless part of a drift-calibration read of tiles (R = E·T·out rows, ``rows`` inputs),
    accumulated from flat blocks of the realised weight in any split (a block may start or end inside a
    row): X·Wᵀ, and for the IR drop the position-weighted product and the column loads, plus Σ std²
    per row. What :func:`drift_compensation` reads, without the layer ever being whole."""

    def __init__(self, config: AnalogConfig, shape: tuple[int, int, int]) -> None:
        self.shape, self.rows, self.dtype = shape, shape[-1], torch.float32
        count = shape[0] * shape[1]
        self.x = calibration_input(config, self.rows)  # (V, rows)
        self.rho = config.ir_drop_rho
        self.y = torch.zeros(count, self.x.shape[0])
        if self.rho > 0:
            from analogllm.ops.read import ir_profile

            self.xp = self.x * ir_profile(self.rows)
            self.drop, self.load = torch.zeros_like(self.y), torch.zeros(count, 1)
        self.row_var: torch.Tensor | None = None

    def add(self, start: int, w: torch.Tensor, std: torch.Tensor | None) -> None:
        """Add the flat block ``w`` (its read-noise std ``std``, or None) that begins at flat index ``start``."""
        end, pos = start + w.numel(), start
        while pos < end:  # the head of a row, whole rows, the tail of a row
            row, col = divmod(pos, self.rows)
            if col == 0 and end - pos >= self.rows:
                count = (end - pos) // self.rows
                length = count * self.rows
            else:
                count, length = 1, min(self.rows - col, end - pos)
            part = w[pos - start:pos - start + length].view(count, -1)
            cols = slice(col, col + part.shape[1])
            # in place, without temporaries of the block's size: they would fragment the heap block by block
            self.y[row:row + count].addmm_(part, self.x[:, cols].T)
            if self.rho > 0:
                self.drop[row:row + count].addmm_(part, self.xp[:, cols].T)
                self.load[row:row + count].add_(torch.linalg.vector_norm(part, ord=1, dim=-1, keepdim=True))
            if std is not None:
                sq = torch.linalg.vector_norm(std[pos - start:pos - start + length].view(count, -1), dim=-1, keepdim=True)
                self.row_var = torch.zeros(self.y.shape[0], 1) if self.row_var is None else self.row_var
                self.row_var[row:row + count].add_(sq.square_())
            pos += length

    def variance(self) -> torch.Tensor | None:
        """Σ std² per row, (E·T, out, 1), or None without read noise."""
        return None if self.row_var is None else self.row_var.view(*self.shape[:2], 1)

    def output(self) -> torch.Tensor:
        """X·Wᵀ less the IR drop, (E·T, out, V)."""
        y = self.y
        if self.rho > 0:
            from analogllm.ops.read import ir_factor

            y = y - ir_factor(self.load * (self.rho * self.rows)) * self.drop
        return y.view(*self.shape[:2], -1)


def calibrated_gain(config: AnalogConfig, weight: torch.Tensor, tiles: int, rows: int, seed: int, uid: int,
                    seconds: float, moment: InputMoment | None = None) -> torch.Tensor:
    """The drift-compensation gain (E,) of chip instance ``seed`` read ``seconds`` after programming:
    what :func:`realise` gives as ``compensation`` (digital gain or pulse factor), for a caller that needs
    only that (an exported map's record).
    A device that realises in blocks (PCM without stuck devices) feeds its drift calibration block by
    block, so the layer's realised weight, reference and read noise are never whole: the transient is
    a few blocks and the calibration sums instead of about five copies of the layer. Equal to
    :func:`realise`'s up to float32 summation order."""
    device = config.device
    blocks = getattr(device, "device_blocks", None)
    if blocks is None or moment is not None or getattr(device, "stuck_low", 0) or getattr(device, "stuck_high", 0):
        return realise(config, weight, tiles, rows, seed, uid, seconds, moment=moment).compensation
    w = weight.detach().to("cpu", torch.float32)
    w = w.unsqueeze(0) if w.dim() == 2 else w
    gain = torch.ones(w.shape[0])
    if not (config.drift.compensation and device.drifts and seconds > 0):
        return gain  # a PCM realisation's own gain is 1
    wn = LazyTiles(w, tiles, rows)  # the device reads the tiles block by block: they are never whole
    shape = (wn.shape[0] * wn.shape[1], wn.shape[2], rows)
    now, ref = CalibrationSums(config, shape), CalibrationSums(config, shape)
    for start, w_now, w_ref, std in blocks(wn, seconds, chip_generator(seed, uid)):
        now.add(start, w_now, std)
        ref.add(start, w_ref, None)
    adc_gain, adc_offset = adc_errors(config, wn.shape[:-1], seed, uid)
    return gain * drift_compensation(config, ref, None, now, None, seed, uid, adc_gain=adc_gain, adc_offset=adc_offset)


class FreedWeight(torch.Tensor):
    """The placeholder of a weight that :func:`analogllm.deploy_` freed: it keeps the shape, dtype and
    device (so peft, ``.to()``, ``deepcopy`` and ``state_dict`` work) but holds no data, and any
    computation with it raises a clear error instead of silently computing with zeros."""

    @staticmethod
    def __new__(cls, shape: torch.Size, dtype: torch.dtype, device: torch.device, requires_grad: bool = False):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=requires_grad)

    def __repr__(self) -> str:  # type: ignore[override]
        return f"FreedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __reduce_ex__(self, protocol):  # type: ignore[override]
        return FreedWeight, (self.shape, self.dtype, self.device, self.requires_grad)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default, aten.clone.default, aten._to_copy.default,
                    aten.lift_fresh.default):
            src = args[0]
            return FreedWeight(src.shape, kwargs.get("dtype") or src.dtype, kwargs.get("device") or src.device)
        if func in _VIEWS:  # views keep no data either: the same op on meta tensors gives the shape
            src = args[0]
            meta = [torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, FreedWeight) else a for a in args]
            out = func(*meta, **kwargs)
            return FreedWeight(out.shape, out.dtype, src.device)
        raise RuntimeError(
            f"this weight was freed by analogllm.deploy_ ({func}): a deployed chip keeps only its programmed "
            "arrays. Reload the model to train, reprogram, drift, export or save it.")


_VIEWS = {getattr(torch.ops.aten, op).default for op in ("t", "view", "_unsafe_view", "expand", "unsqueeze", "alias")} | {
    torch.ops.aten.transpose.int, torch.ops.aten.select.int, torch.ops.aten.slice.Tensor, torch.ops.aten.permute.default,
    torch.ops.aten.squeeze.dim}


def free(param: nn.Parameter) -> nn.Parameter:
    """A :class:`FreedWeight` parameter in place of ``param``."""
    return nn.Parameter(FreedWeight(param.shape, param.dtype, param.device), requires_grad=False)


def is_freed(t: torch.Tensor) -> bool:
    return isinstance(t, FreedWeight) or isinstance(getattr(t, "data", None), FreedWeight)


__all__ = ["ADC_GAIN_STREAM", "ADC_OFFSET_STREAM", "CALIBRATION_SEED", "Chip", "FreedWeight", "Programmed",
           "adc_errors", "calibration_input", "chip_generator", "compensate", "drift_compensation", "free", "is_freed",
           "normalised_tiles", "programming_targets", "realise", "reference_gain", "stable_id", "whole_compensation"]
