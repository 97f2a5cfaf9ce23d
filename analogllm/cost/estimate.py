"""Counts × hardware profile → energy, latency, throughput and area of one token.

Energies are computed in picojoules per component and summed; the report gives the total in joules as
well (one value, two units, so a reader never rescales by hand). Times are in seconds, areas in mm².

Pipeline assumptions (stated in every report):

* weight-stationary: every array / mesh of the model is resident (the chip count says how many chips
  that takes); nothing is reprogrammed between tokens;
* within a layer all arrays are read at once (one array read time per token, per active expert set),
  then the periphery adds the tile partial sums;
* layers run one after another for one token (q/k/v or gate/up could overlap: the single-stream latency
  is an upper bound for that), and the digital unit runs the model's digital parts in between;
* single-stream throughput = 1 / latency (decoding one sequence: token t + 1 needs token t); with many
  independent sequences in flight, every layer works on a different token and throughput is set by the
  slowest stage: the slowest layer step or the digital unit's total per-token work (it is shared);
* photonic phase shifters hold their phases continuously: their holding power × the single-stream time
  of one token is charged to that token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from analogllm.cost.counts import DigitalOp, LayerCounts, Workload
from analogllm.cost.hardware import CrossbarCost, DigitalCost, GPUCost, HardwareProfile, PhotonicCost

PJ = 1e-12

ASSUMPTIONS = (
    "one decode step: one new token of one sequence with `context` tokens in the KV cache (batch 1)",
    "weight-stationary: all arrays resident, none reprogrammed between tokens",
    "all arrays of a layer read in parallel; layers in sequence; the digital unit runs between layers",
    "pipelined throughput: many independent sequences in flight, set by the slowest layer step or the shared digital unit",
    "digital weights (LM head, routers, convolutions), the KV cache and embedding rows come from DRAM every token",
    "leakage, clocking and on-chip interconnect between cores are not counted beyond what the anchor measurements include",
)


@dataclass(frozen=True)
class LayerCost:
    counts: LayerCounts
    energy_pj: dict[str, float]
    latency_s: float
    array_area_um2: float   #: one array (crossbar) or one mesh pair with its I/O (photonic)

    @property
    def area_mm2(self) -> float:
        return self.counts.arrays * self.array_area_um2 * 1e-6

    @property
    def total_pj(self) -> float:
        return sum(self.energy_pj.values())


@dataclass(frozen=True)
class DigitalCostRow:
    op: DigitalOp
    energy_pj: dict[str, float]
    latency_s: float

    @property
    def total_pj(self) -> float:
        return sum(self.energy_pj.values())


@dataclass(frozen=True)
class GPUBaseline:
    profile: HardwareProfile
    ops: float
    bytes: float
    energy_pj: dict[str, float]
    latency_s: float
    energy_at_tdp_j: float

    @property
    def energy_j(self) -> float:
        return sum(self.energy_pj.values()) * PJ


@dataclass(frozen=True)
class CostReport:
    """Everything ``analogllm cost`` reports for one model on one chip, per generated token."""

    workload: Workload
    hardware: HardwareProfile
    layers: tuple[LayerCost, ...]
    digital: tuple[DigitalCostRow, ...]
    products_pj: dict[str, float]
    products_latency_s: float
    holding_w: float
    latency_s: float
    pipelined_s: float
    area_mm2: float
    chips: int | None
    baseline: GPUBaseline | None
    assumptions: tuple[str, ...] = field(default=ASSUMPTIONS)

    @property
    def breakdown_pj(self) -> dict[str, float]:
        """Energy per token by component, summed over layers, digital parts and attention products."""
        out: dict[str, float] = {}
        for row in (*self.layers, *self.digital):
            for k, v in row.energy_pj.items():
                out[k] = out.get(k, 0.0) + v
        for k, v in self.products_pj.items():
            out[k] = out.get(k, 0.0) + v
        return out

    @property
    def energy_pj(self) -> float:
        return sum(self.breakdown_pj.values())

    @property
    def energy_j(self) -> float:
        return self.energy_pj * PJ

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.latency_s

    @property
    def tokens_per_s_pipelined(self) -> float:
        return 1.0 / self.pipelined_s


def _digital_row(op: DigitalOp, d: DigitalCost) -> DigitalCostRow:
    b = d.bytes_per_value
    energy = {"digital_compute": op.flops * d.pj_per_flop, "dram": op.dram_values * b * d.dram_pj_per_byte,
              "sram": op.sram_values * b * d.sram_pj_per_byte}
    latency = op.flops / d.flops_per_s + op.dram_values * b / d.dram_bytes_per_s
    return DigitalCostRow(op=op, energy_pj=energy, latency_s=latency)


def _crossbar_layer(layer: LayerCounts, hw: CrossbarCost, d: DigitalCost, adc_bits: int | None) -> LayerCost:
    analog_macs = layer.macs if layer.analog else 0
    energy = {
        "array": analog_macs * hw.mac_pj(adc_bits),
        "dac": layer.dac_conversions * hw.dac_pj,
        "adc": layer.adc_conversions * hw.adc_pj(adc_bits),
        "periphery": layer.periphery_flops * d.pj_per_flop,
    }
    latency = (hw.read_time_s if layer.analog else 0.0) + layer.periphery_flops / d.flops_per_s
    cells = layer.array_rows * layer.array_cols
    area_um2 = cells * hw.array_area_mm2 / (hw.anchor_rows * hw.anchor_cols) * 1e6
    return LayerCost(counts=layer, energy_pj=energy, latency_s=latency, array_area_um2=area_um2)


def mesh_transmission(k: int, loss_db_per_mzi: float) -> float:
    """Optical power transmission through U, the attenuators and V: 2·k + 1 MZIs in series."""
    return 10.0 ** (-loss_db_per_mzi * (2 * k + 1) / 10.0)


def mesh_holding_w(k: int, p_pi_mw: float) -> float:
    """Mean holding power of one mesh pair's thermal shifters (θ and attenuators P_π/2, φ and output
    phases P_π; see PhotonicCost)."""
    m = k * (k - 1) // 2
    return p_pi_mw * 1e-3 * (2 * m * 0.5 + 2 * m * 1.0 + 2 * k * 1.0 + k * 0.5)


def laser_pj_per_detection(hw: PhotonicCost, k: int, loss_db_per_mzi: float) -> float:
    return hw.detector_fj * 1e-3 / (mesh_transmission(k, loss_db_per_mzi) * hw.laser_efficiency)


def _photonic_layer(layer: LayerCounts, hw: PhotonicCost, d: DigitalCost, adc_bits: int | None,
                    loss_db: float) -> LayerCost:
    k = layer.array_rows
    energy = {
        "laser": layer.detections * laser_pj_per_detection(hw, k, loss_db),
        "modulators": layer.dac_conversions * hw.modulator_pj,
        "dac": layer.dac_conversions * hw.dac_pj,
        "detectors": layer.detections * hw.tia_pj,
        "adc": layer.adc_conversions * hw.adc_pj(adc_bits),
        "periphery": layer.periphery_flops * d.pj_per_flop,
        "phase_holding": 0.0,  # filled in once the token time is known
    }
    latency = (hw.read_time_s if layer.analog else 0.0) + layer.periphery_flops / d.flops_per_s
    m = k * (k - 1) // 2
    area_um2 = ((2 * m + k) * hw.mzi_area_mm2 + 2 * k * hw.io_area_mm2) * 1e6
    return LayerCost(counts=layer, energy_pj=energy, latency_s=latency, array_area_um2=area_um2)


def gpu_baseline(workload: Workload, profile: HardwareProfile) -> GPUBaseline:
    """The same token on a GPU: every MAC digital (2 ops), elementwise FLOPs 1 op, weights and KV from HBM.
    The chip's own repairs (the measured correction) are left out: the GPU runs the exact model."""
    if profile.kind != "gpu" or profile.gpu is None:
        raise ValueError(f"baseline profile {profile.name!r} is not a gpu profile")
    g: GPUCost = profile.gpu
    t = workload.totals()
    model_ops = [op for op in workload.digital if not op.chip_only]
    ops = 2.0 * t["macs"] + sum(op.flops for op in model_ops)
    layer_weights = sum(layer.macs for layer in workload.layers)  # active weights, one read per token
    values = layer_weights + sum(op.dram_values + op.sram_values for op in model_ops)
    nbytes = values * g.bytes_per_value
    energy = {"compute": ops / g.tops_per_w, "hbm": nbytes * 8 * g.hbm_pj_per_bit}  # 1 TOPS/W = 1 op/pJ
    latency = max(ops / (g.peak_tops * 1e12), nbytes / g.hbm_bytes_per_s)
    return GPUBaseline(profile=profile, ops=ops, bytes=nbytes, energy_pj=energy, latency_s=latency,
                       energy_at_tdp_j=g.tdp_w * latency)


def estimate(workload: Workload, hardware: HardwareProfile, baseline: HardwareProfile | None = None) -> CostReport:
    """Price one decode step of ``workload`` on ``hardware`` (and on the ``baseline`` GPU)."""
    if hardware.kind != workload.target:
        raise ValueError(f"hardware profile {hardware.name!r} is a {hardware.kind} chip but the model is mapped "
                         f"to {workload.target}; choose a {workload.target} profile")
    d = hardware.digital
    assert d is not None
    adc_bits = workload.config.adc.bits
    if hardware.kind == "crossbar":
        hw_x = hardware.crossbar
        assert hw_x is not None
        layers = tuple(_crossbar_layer(layer, hw_x, d, adc_bits) for layer in workload.layers)
        read_time = hw_x.read_time_s
        mac_pj = hw_x.mac_pj(adc_bits)
        conv = (hw_x.dac_pj, hw_x.adc_pj(adc_bits))
    else:
        hw_p = hardware.photonic
        assert hw_p is not None
        loss = float(getattr(workload.config.device, "loss_db_per_mzi", 0.0))
        layers = tuple(_photonic_layer(layer, hw_p, d, adc_bits, loss) for layer in workload.layers)
        read_time = hw_p.read_time_s
        k = getattr(workload.config.device, "mesh_size", 16)
        mac_pj = laser_pj_per_detection(hw_p, k, loss) / k  # light per MAC: one detection feeds k MACs
        conv = (hw_p.dac_pj + hw_p.modulator_pj, hw_p.adc_pj(adc_bits) + hw_p.tia_pj)
    digital = tuple(_digital_row(op, d) for op in workload.digital)
    products_pj: dict[str, float] = {}
    products_latency = 0.0
    p = workload.products
    if p is not None:
        products_pj = {"attention_products": p.macs * mac_pj + p.dac_conversions * conv[0]
                       + p.adc_conversions * conv[1]}
        products_latency = p.reads * read_time
    digital_s = sum(r.latency_s for r in digital)
    latency = sum(r.latency_s for r in layers) + products_latency + digital_s
    stages = [r.latency_s for r in layers] + [digital_s] + ([read_time] if p is not None else [])
    pipelined = max(stages)
    holding_w = 0.0
    if hardware.kind == "photonic":
        assert hardware.photonic is not None
        per_mesh = mesh_holding_w(getattr(workload.config.device, "mesh_size", 16), hardware.photonic.p_pi_mw)
        holding_w = per_mesh * sum(r.counts.arrays for r in layers)
        layers = tuple(
            LayerCost(counts=r.counts, energy_pj={**r.energy_pj, "phase_holding": per_mesh * r.counts.arrays * latency / PJ},
                      latency_s=r.latency_s, array_area_um2=r.array_area_um2)
            for r in layers
        )
    area = sum(r.area_mm2 for r in layers)
    chips = None
    if hardware.kind == "crossbar":
        assert hardware.crossbar is not None
        c = hardware.crossbar
        chips = math.ceil(sum(r.counts.cells for r in layers) / (c.anchor_arrays * c.anchor_rows * c.anchor_cols))
    base = gpu_baseline(workload, baseline) if baseline is not None else None
    return CostReport(workload=workload, hardware=hardware, layers=layers, digital=digital, products_pj=products_pj,
                      products_latency_s=products_latency, holding_w=holding_w, latency_s=latency,
                      pipelined_s=pipelined, area_mm2=area, chips=chips, baseline=base)


__all__ = ["ASSUMPTIONS", "CostReport", "GPUBaseline", "LayerCost", "estimate", "gpu_baseline",
           "laser_pj_per_detection", "mesh_holding_w", "mesh_transmission"]
