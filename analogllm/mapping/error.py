"""The expected error of one analogue layer, from calibration inputs and the device's own statistics.

Every mapping choice (an input range, an ADC range, a per-channel rescaling) trades one error against
another: a narrow DAC range clips outliers but resolves the bulk finely and lifts the signal above the
output noise; a wide one does the opposite. To choose, the mapping needs the chip's error as a number.
For a layer with (transformed) weight ``W`` and a sample ``X`` of the inputs its DAC sees, the output of
token n on tile t, column o is ``r · M[t,o] · Σ_i q[n,t,i] · w[t,o,i]`` (``M`` the tile-column scale,
``w`` the normalised weight, ``q`` the DAC codes ``Q(clip(x/r))``), and its expected squared error is
the sum of

    DAC      r² Σ_i (q − x/r)²[n,t,i] · Σ_o M²[t,o] w²[t,o,i]          clipping and rounding
    weights  r² Σ_i q²[n,t,i] · Σ_o M²[t,o] v(|w[t,o,i]|)               programming/read noise, drift
    output   r² Σ_o M²[t,o] (σ_out² + a·|y| + b)                         output and detector noise
    ADC      r² Σ_o M²[t,o] (T·(|y[n,t,o]| − B_t)₊² + Δ_t²/12)           saturation and the step Δ_t = 2B_t/(2^bits−2)

with ``v(|w|)``, the variance of a realised normalised weight around its target, measured by realising
a probe tile on the device model itself at the deployment time (:func:`device_variance`): programming
noise, drift spread after global drift compensation, read noise, levels, mesh errors — whatever the
device models. Errors of different inputs are treated as independent, the usual first-order model,
except saturation: an output too large for the ADCs is cut towards zero on each of the T tiles whose
partial sum saturates, so those errors add coherently, and the square of their sum is bounded by T
times the sum of their squares (Cauchy–Schwarz). Counting them as independent underestimated the
saturation of SmolLM2's massive-activation tokens (2–3 % of tokens, 59 % of one down projection's output
power) by about 3× on three-tile layers and chose DAC ranges that cut those tokens' outputs by 15 %.

The score is the mean over tokens of the error *relative to that token's output power*. A plain mean
squared error is dominated by the few tokens with huge activations (attention sinks) and then picks
ranges that leave every other token buried in output noise, which wrecks the model (measured on
SmolLM2: the relative score maps it to perplexity 270, the absolute one to 92,000).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analogllm.chip.statistics import Table, device_statistics, output_variance
from analogllm.config import AnalogConfig

#: a token's output power is floored at this fraction of the mean, so near-zero outputs do not dominate
_FLOOR = 0.05
#: log-spaced histogram of tile outputs for the ADC saturation sums: bins over this many decades below the max
_BINS, _DECADES = 256, 6
#: log-arithmetic bin positions this close to an edge (in bins) are checked by a binary search
_NEAR = 1e-3


def device_variance(config: AnalogConfig, seconds: float) -> Table:
    """The variance of a realised normalised weight vs |w| (:mod:`analogllm.chip.statistics`), bias
    included: the error model counts the mean error as part of the squared error."""
    bias, var = device_statistics(config, seconds)
    return Table(var.values + bias.values.square())


def token_weights(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The weight of each token (N,) in the score: one over its output power ``|x Wᵀ|²``, floored at
    :data:`_FLOOR` of the mean so near-zero outputs do not dominate."""
    return _inverse_power((x @ w.T).square().sum(-1))


def _inverse_power(sig: torch.Tensor) -> torch.Tensor:
    return 1.0 / (sig + _FLOOR * sig.mean()).clamp(min=1e-30)


@dataclass
class LayerErrors:
    """The parts of a layer's relative error at its chosen ranges (means over calibration tokens)."""

    dac: float
    weights: float
    output: float
    adc: float

    @property
    def total(self) -> float:
        return self.dac + self.weights + self.output + self.adc


class LayerModel:
    """The error model of one layer for a calibration sample ``x`` (N, in) of its DAC-side inputs.

    ``tiles`` splits inputs like the layer (:class:`~analogllm.nn.matrix.AnalogMatrix`); ``weight`` is
    the (transformed) matrix (out, in). Everything that does not depend on the ranges is computed once.
    """

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, tiles: int, rows: int, config: AnalogConfig,
                 variance: Table) -> None:
        self.config = config
        w = weight.detach().float()
        x = x.detach().float()
        self.x = x
        pad = tiles * rows - w.shape[-1]
        # T, N, R, contiguous: every range candidate's DAC codes are computed from it
        self.xt = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], tiles, rows).transpose(0, 1).contiguous()
        self.n = x.shape[0]
        self.rms = float(x.square().mean().sqrt().clamp(min=1e-12))
        self.amax = float(x.abs().max().clamp(min=1e-12))
        # One tile at a time: the normalised weight and its variance lookup are several copies of the
        # tile, and a billion-parameter layer's all at once would be a gigabyte of transient memory.
        m2, g, h, y0 = [], [], [], []
        out = torch.zeros(x.shape[0], w.shape[0], device=x.device)
        for t in range(tiles):
            wt = torch.nn.functional.pad(w[:, t * rows:(t + 1) * rows], (0, max(0, (t + 1) * rows - w.shape[-1])))
            m = wt.abs().amax(-1).clamp(min=1e-12)  # out
            m2.append(m.square())
            wn = wt / m.unsqueeze(-1)
            g.append(m2[-1] @ wn.square())  # DAC error weights
            h.append(m2[-1] @ variance.lookup(wn.abs()))  # weight-noise weights
            # the tile's outputs; as |normalised outputs| at the reference range r0 = rms, without the DAC,
            # y(r) ≈ y0 · r0 / r; their sum over tiles is the layer's output x Wᵀ (no second matmul)
            yt = self.xt[t] @ wt.T  # N, out
            out += yt
            y0.append(yt.abs_().div_(m * self.rms))
        self.inv_den = _inverse_power(out.square_().sum(-1))
        self.m2, self.g, self.h = torch.stack(m2), torch.stack(g), torch.stack(h)  # T, out / T, R / T, R
        a = config.device.output_var_terms()[0]
        self.out_var = output_variance(config)
        # the detector's signal-dependent term a·|y|, weighted like the score: Σ_n w_n Σ_o m2 |y0|
        self.shot = a * sum(float(self.inv_den @ y @ m) for y, m in zip(y0, m2)) if a else 0.0
        self.m2w = self.m2.sum(-1) * float(self.inv_den.sum())  # T: Σ_o m2 · Σ_n w_n
        # ADC saturation for any threshold c (in y0 units): Σ ω (y0 − c)₊² = S2 − 2c·S1 + c²·S0 over the
        # outputs above c, ω = m2[t, o]·w[n]. The sums come from a histogram of |y0| per tile on
        # :data:`_BINS` log-spaced bins (suffix sums over bins; a sort would cost 5× more), so a bin's
        # values count once the threshold is below the bin's lower edge: relative error < 1 bin width.
        top = float(max(y.max() for y in y0).clamp(min=1e-30))
        self.edges = top * torch.logspace(-_DECADES, 0, _BINS + 1, dtype=torch.float64)[:-1]  # lower edges
        self._log_edge0 = float(self.edges[0].log10())
        sums = torch.zeros(3, tiles, _BINS, dtype=torch.float64)
        den = self.inv_den.double()
        for t, (y, m) in enumerate(zip(y0, m2)):
            flat = y.flatten()
            idx = self._bin(flat)
            # ω, ω·y, ω·y² in float64, each one pass over the tile (float32 y promoted in the product)
            weights = torch.outer(den, m.double()).flatten()
            moment = weights * flat
            for k, v in enumerate((weights, moment, moment.mul(flat))):
                sums[k, t].scatter_add_(0, idx, v)
        sums = torch.cat([sums.flip(-1).cumsum(-1).flip(-1), torch.zeros(3, tiles, 1, dtype=torch.float64)], -1)
        self.s0, self.s1, self.s2 = sums.unbind(0)

    def _bin(self, y: torch.Tensor) -> torch.Tensor:
        """The histogram bin of every |y0| (0.._BINS-1; below the lowest edge: bin 0), as a binary search
        over the edges would give it. The bins are log-spaced, so the index is arithmetic on log y in
        float32 (a binary search, ``bucketize``, took 39 s of a 155 s mapping of SmolLM2); the few values
        within rounding of an edge, where that arithmetic can be one bin off, are searched exactly."""
        pos = y.float().log10().sub_(self._log_edge0).mul_(_BINS / _DECADES)
        low = pos.floor()
        near = pos.sub_(low).sub_(0.5).abs_() > 0.5 - _NEAR  # pos is now its fraction, centred
        idx = low.clamp_(0, _BINS - 1).long()
        sel = near.nonzero().squeeze(1)
        if sel.numel():
            exact = torch.bucketize(y[sel].double(), self.edges, right=True) - 1
            idx[sel] = exact.clamp_(0, _BINS - 1)
        return idx

    def _saturation(self, c: torch.Tensor) -> torch.Tensor:
        """Σ_n w_n Σ_o m2 (y0 − c_t)₊² per tile, for thresholds ``c`` (T,) or (K, T) in y0 units."""
        c = c.double()
        flat = c.reshape(-1, c.shape[-1]).T.contiguous()  # T, K
        idx = torch.searchsorted(self.edges, flat, right=False).clamp(max=_BINS)  # first bin above c
        s0, s1, s2 = (torch.gather(s, 1, idx) for s in (self.s0, self.s1, self.s2))
        out = (s2 - 2 * flat * s1 + flat * flat * s0).clamp(min=0).T  # K, T
        return out.reshape(c.shape).float()

    def errors(self, r: float, adc: torch.Tensor | None) -> LayerErrors:
        """The relative error parts at DAC range ``r`` and ADC ranges ``adc`` (T,) (None: no ADC)."""
        cfg = self.config
        # in DAC steps (unit steps; an ideal DAC: in units of the range): x/(r·step) clamped and rounded
        step = 1.0 if cfg.dac.bits is None else 1.0 / (2 ** (cfg.dac.bits - 1) - 1)
        u = self.xt * (1.0 / (r * step))
        q = u.clamp(-1.0 / step, 1.0 / step)
        if cfg.dac.bits is not None:
            q.round_()
        s2 = (r * step) ** 2
        n = self.n
        # token-weighted sums over the tokens as one batched matrix product per term: 3× faster than a
        # three-operand einsum, and the mapping evaluates this ~25,000 times for SmolLM2
        w = self.inv_den.view(1, 1, n).expand(len(self.xt), 1, n)
        e_dac = s2 * float(torch.bmm(w, u.sub_(q).square_()).squeeze(1).mul_(self.g).sum()) / n
        e_w = s2 * float(torch.bmm(w, q.square_()).squeeze(1).mul_(self.h).sum()) / n
        r2 = r * r
        e_out = r2 * (self.out_var * float(self.m2w.sum()) + self.shot * self.rms / r) / n
        e_adc = 0.0
        if adc is not None and cfg.adc.bits is not None:
            e_adc = r2 * float(self._adc_cost(r, adc.view(1, -1)).sum()) / n
        return LayerErrors(dac=e_dac, weights=e_w, output=e_out, adc=e_adc)

    def _adc_cost(self, r: float, bounds: torch.Tensor) -> torch.Tensor:
        """Saturation + step error per candidate and tile, (K, T), at DAC range r (before the r² factor)."""
        bits = self.config.adc.bits
        k = self.rms / r  # y = y0 · k
        # × T: a saturated output is cut towards zero on every tile it saturates, so the tiles' errors
        # add coherently and their sum's square is up to T times the sum of squares (Cauchy–Schwarz)
        sat = self._saturation(bounds / k) * (k * k * self.m2.shape[0])
        step = (2 * bounds / (2**bits - 2)).square() / 12 * self.m2w
        return sat + step

    def best_adc(self, r: float, bound: float, per_tile: bool, grid: int = 24) -> torch.Tensor:
        """The ADC ranges (T,) minimising saturation + step error at DAC range ``r``: a search over
        ``grid`` ranges from bound/64 up to the profile's full scale ``bound`` (a calibration can raise
        the gain in front of the ADC, never widen its full scale)."""
        tiles = self.m2.shape[0]
        cands = (bound * torch.logspace(-6, 0, grid, base=2.0))[:, None].expand(grid, tiles)
        cost = self._adc_cost(r, cands)  # grid, T
        if per_tile:
            return cands[cost.argmin(0), torch.arange(tiles)].clone()
        return cands[cost.sum(-1).argmin()].clone()


__all__ = ["LayerErrors", "LayerModel", "device_variance", "token_weights"]
