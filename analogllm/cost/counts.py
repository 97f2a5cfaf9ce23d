"""What one generated token does: per analogue layer and for the digital parts of the model.

The unit of work is **one decode step** of an autoregressive LM: one new token of one sequence, with
``context`` earlier tokens already in the KV cache (the regime in which a deployed LLM spends its
time). For every analogue layer the counts follow from its shape and its tile grid alone, the same
grid whether it is read from a map's manifest or from an analogue model in memory (so both inputs give
identical numbers), and for the digital parts from the model's architecture (its Hugging Face config).

Per analogue layer of shape (E, out, in) with T input tiles of R rows, its outputs in TO column blocks
(crossbar arrays) or, on a photonic chip, every input tile cut into BI blocks of k inputs and the
outputs into BO blocks of k (meshes), and ``a`` experts active per token (1 for an ordinary layer, the
router's top-k for MoE experts):

=====================  ==================================  ======================================
count per token        crossbar                            photonic
=====================  ==================================  ======================================
MACs                   a · out · in                        a · out · in
arrays / meshes        E · T · TO (all of them, resident)  E · T · BO · BI
array reads            a · T · TO                          a · T · BO · BI
DAC conversions        a · in · TO  (every array drives    a · in · BO  (every mesh modulates its
                       its own rows)                       own input modes)
ADC conversions        a · out · T  (one per column per    a · out · T  (the BI meshes of a tile
                       input tile)                         are summed before its ADC)
detections             -                                   a · out · T · BI
periphery FLOPs        a · (in + out·T + out·(T − 1) + out (+ out if bias)):  input scaling to the DAC
                       range, one scale per tile column, the partial sums of the T tiles, gain × range,
                       bias (photonic adds the mesh gains and the BI partial sums: + 2·out·T·(BI − 1)
                       + out·T)
=====================  ==================================  ======================================

Weight-side layers (a weight the model reads directly, e.g. Mamba's ``dt_proj``) hold their matrix on
the chip but multiply digitally: their MACs are digital FLOPs, with no reads or conversions.

Digital parts per token, at context N (FLOP = one add or multiply; a MAC is 2 FLOPs):

* embedding lookup: one row of ``hidden`` values read from DRAM (plus GPT-2's position row);
* every digital weight module (LM head, MoE routers, depthwise convolutions, ...): one MAC per weight
  (per active expert for expert tensors), its weights read from DRAM every token (an LLM's digital
  weights do not fit on chip);
* attention layers (unless ``analog_attention``): QKᵀ and AV, heads · head_dim · N MACs each, the KV
  cache read (2 · kv_heads · head_dim · N values) and the new K, V written; softmax 5 FLOPs per score
  (max, subtract, exp, sum, divide) plus the 1/√d scaling; RoPE 3 FLOPs per q and k element;
* norms: 4 FLOPs per element for RMSNorm, 7 for LayerNorm (GPT-2, RWKV); q/k norms of Qwen3;
* MLP activations: 5 FLOPs per element (SiLU and the gate product), 8 for GELU;
* residual adds: 2 · hidden per layer;
* recurrent layers, their state read and written in on-chip SRAM: the Mamba scan 8 FLOPs per state
  element (d_inner · d_state: discretise exp(ΔA), ΔB·x, update, C·h), Mamba-2 6 per element
  (heads · head_dim · d_state), RWKV-4's WKV 14 per channel, gated delta-rule layers 7 per state element
  (value heads · d_k · d_v);
* the output softmax over the vocabulary for sampling: 5 FLOPs per logit.
* the measured low-rank correction (``mapping.correction_rank`` k > 0): k · (in + out) MACs per active
  analogue matrix, its factors read from on-chip SRAM.

These are the operations a digital unit has to execute, not a cycle-accurate model of one; elementwise
counts are within a small factor of any real kernel and are dwarfed by the matmuls and the KV cache.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from analogllm.chip.correct import correction_macs
from analogllm.config import AnalogConfig

#: documented per-element FLOP counts of the digital parts (see the module docstring)
SOFTMAX_FLOPS = 5
RMSNORM_FLOPS = 4
LAYERNORM_FLOPS = 7
GATED_ACT_FLOPS = 5
GELU_FLOPS = 8
ROPE_FLOPS = 3
MAMBA_SCAN_FLOPS = 8
MAMBA2_SCAN_FLOPS = 6
RWKV_WKV_FLOPS = 14
DELTA_RULE_FLOPS = 7

DEFAULT_CONTEXT = 512

_SSM = {"mamba", "falcon_mamba", "mamba2"}
_LAYERNORM = {"gpt2", "rwkv"}


# ----- analogue layers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCounts:
    """One analogue layer's layout and what one token costs it (see the module table)."""

    name: str
    kind: str
    placement: str           #: ``analog`` or ``weight-side``
    target: str              #: ``crossbar`` or ``photonic``
    experts: int             #: E (1 for an ordinary layer)
    active: int              #: experts a token uses (a)
    out: int
    inp: int
    tiles: int               #: T input tiles
    rows: int                #: R inputs per tile
    col_blocks: int          #: TO (crossbar) or BO (photonic)
    in_blocks: int           #: BI meshes per input tile (1 on a crossbar)
    array_rows: int          #: physical rows of one array (crossbar) or modes of a mesh
    array_cols: int          #: physical columns of one array (crossbar) or modes of a mesh
    bias: bool

    @property
    def analog(self) -> bool:
        return self.placement == "analog"

    @property
    def arrays(self) -> int:
        return self.experts * self.tiles * self.col_blocks * self.in_blocks

    @property
    def macs(self) -> int:
        return self.active * self.out * self.inp

    @property
    def array_reads(self) -> int:
        return self.active * self.tiles * self.col_blocks * self.in_blocks if self.analog else 0

    @property
    def dac_conversions(self) -> int:
        return self.active * self.inp * self.col_blocks if self.analog else 0

    @property
    def adc_conversions(self) -> int:
        return self.active * self.out * self.tiles if self.analog else 0

    @property
    def detections(self) -> int:
        """Photodetector reads (photonic): every output mode of every mesh read."""
        if self.target != "photonic" or not self.analog:
            return 0
        return self.active * self.out * self.tiles * self.in_blocks

    @property
    def cells(self) -> int:
        """Physical cells of all arrays (crossbar; meshes: modes² per mesh)."""
        return self.arrays * self.array_rows * self.array_cols

    @property
    def periphery_flops(self) -> int:
        """Digital work around the arrays per token; a weight-side layer's matmul itself (2 per MAC)."""
        a, o, t = self.active, self.out, self.tiles
        if not self.analog:
            return 2 * self.macs
        flops = self.inp + o * t + o * (t - 1) + o + (o if self.bias else 0)
        if self.target == "photonic":
            flops += 2 * o * t * (self.in_blocks - 1) + o * t
        return a * flops

    @property
    def weights(self) -> int:
        return self.experts * self.out * self.inp

    def counts(self) -> dict[str, int]:
        return {
            "arrays": self.arrays, "macs": self.macs, "array_reads": self.array_reads,
            "dac_conversions": self.dac_conversions, "adc_conversions": self.adc_conversions,
            "detections": self.detections, "periphery_flops": self.periphery_flops, "cells": self.cells,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.counts()}


def _layer(name: str, kind: str, placement: str, target: str, shape: list[int], tiles: dict[str, Any],
           config: AnalogConfig, bias: bool, experts_per_token: int | None) -> LayerCounts:
    """A layer's counts from its shape and its manifest-style tile record."""
    e = shape[0] if len(shape) == 3 else 1
    out, inp = shape[-2:]
    grid = tiles["grid"]
    active = min(e, experts_per_token or e) if kind.startswith("experts") else 1
    if target == "photonic":
        k = tiles["mesh_size"]
        return LayerCounts(name, kind, placement, target, e, active, out, inp, grid[1], tiles["rows"], grid[2],
                           grid[3], k, k, bias)
    return LayerCounts(name, kind, placement, target, e, active, out, inp, grid[1], tiles["rows"], grid[2], 1,
                       config.tiling.rows or tiles["rows"], tiles["cols"], bias)


def model_tiles(layer: Any, target: str, config: AnalogConfig) -> dict[str, Any]:
    """The tile record the exporter would write for an analogue layer of a model (crossbar.encode /
    photonic.encode), computed from the layer's tiling without touching its weights."""
    m = layer.matrix
    out = layer.shape[-2]
    e = layer.experts
    if target == "photonic":
        k = config.device.mesh_size
        return {"rows": m.rows, "mesh_size": k, "grid": [e, m.tiles, -(-out // k), -(-m.rows // k)]}
    cols = config.tiling.cols or out
    return {"rows": m.rows, "cols": cols, "grid": [e, m.tiles, -(-out // cols)]}


# ----- the model's architecture (digital parts) -----------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """What the digital parts of one decode step depend on, read from a Hugging Face config."""

    model_type: str
    hidden: int
    layers: int
    vocab: int
    attention_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    layernorm: bool
    norms: int                   #: norm applications of ``hidden`` elements per token
    qk_norm_elements: int        #: extra q/k-norm elements per token (Qwen3)
    activation_elements: int     #: MLP activation elements per token
    activation_flops: int        #: FLOPs per activation element
    rope: bool
    position_embedding: bool     #: learned absolute positions (GPT-2)
    experts_per_token: int | None
    experts: int | None
    recurrent: tuple[tuple[str, int, int, int], ...] = field(default_factory=tuple)
    """(what, layers, state elements per layer, FLOPs per layer and token) of recurrent mixers."""


def architecture(config: Any) -> Architecture:
    """Read the digital-part dimensions of a transformers ``PretrainedConfig``."""
    mt = getattr(config, "model_type", "") or ""
    hidden = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    vocab = int(config.vocab_size)
    layer_types = list(getattr(config, "layer_types", None) or [])
    if mt in _SSM or mt == "rwkv":
        attention = 0
    elif layer_types:
        attention = sum(1 for t in layer_types if "attention" in t and "linear" not in t)
    else:
        attention = layers
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or (hidden // heads if heads else 0))
    top_k = getattr(config, "num_experts_per_tok", None)
    n_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    recurrent: list[tuple[str, int, int, int]] = []
    norms = 2 * layers + 1
    gelu = mt == "gpt2"
    if mt in ("mamba", "falcon_mamba"):
        d_inner = int(config.intermediate_size)
        state = d_inner * int(config.state_size)
        recurrent.append(("Mamba selective scan", layers, state, state * MAMBA_SCAN_FLOPS))
        norms, act = layers + 1, d_inner * layers
    elif mt == "mamba2":
        d_inner = int(config.expand * hidden)
        state = int(config.num_heads) * int(config.head_dim) * int(config.state_size)
        recurrent.append(("Mamba-2 SSD scan", layers, state, state * MAMBA2_SCAN_FLOPS))
        norms, act = 2 * layers + 1, d_inner * layers  # the gated RMSNorm inside the mixer counts as one
    elif mt == "rwkv":
        recurrent.append(("RWKV WKV recurrence", layers, 3 * hidden, hidden * RWKV_WKV_FLOPS))
        act = int(config.intermediate_size or 4 * hidden) * layers
    else:
        if top_k and getattr(config, "moe_intermediate_size", None):
            per_layer = int(config.moe_intermediate_size) * int(top_k)
            per_layer += int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        else:
            per_layer = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                            or 4 * hidden)
        act = per_layer * layers
        linear = sum(1 for t in layer_types if t == "linear_attention")
        if linear:
            vh = int(config.linear_num_value_heads)
            state = vh * int(config.linear_key_head_dim) * int(config.linear_value_head_dim)
            recurrent.append(("gated delta-rule recurrence", linear, state, state * DELTA_RULE_FLOPS))
    qk_norm = attention * (heads + kv) * head_dim if mt.startswith("qwen3") else 0
    return Architecture(
        model_type=mt, hidden=hidden, layers=layers, vocab=vocab, attention_layers=attention, heads=heads,
        kv_heads=kv, head_dim=head_dim, layernorm=mt in _LAYERNORM, norms=norms, qk_norm_elements=qk_norm,
        activation_elements=act, activation_flops=GELU_FLOPS if gelu else GATED_ACT_FLOPS,
        rope=mt not in ("gpt2",) and attention > 0, position_embedding=mt == "gpt2",
        experts_per_token=int(top_k) if top_k else None, experts=int(n_experts) if n_experts else None,
        recurrent=tuple(recurrent),
    )


@dataclass(frozen=True)
class DigitalOp:
    """One digital part of a decode step: FLOPs (MACs already doubled), DRAM and SRAM bytes."""

    name: str
    flops: int
    macs: int = 0
    dram_values: int = 0   #: values moved to / from DRAM (× bytes per value of the hardware)
    sram_values: int = 0   #: values moved to / from on-chip SRAM
    note: str = ""
    chip_only: bool = False  #: a repair of the analogue chip (no part of the model a GPU runs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AnalogProducts:
    """Attention products run in the analogue domain (``analog_attention``): MACs and converters."""

    macs: int
    dac_conversions: int
    adc_conversions: int
    reads: int


def _numel(shape: str | list[int]) -> list[int]:
    if isinstance(shape, str):
        return [int(x) for x in re.findall(r"\d+", shape)]
    return [int(x) for x in shape]


def digital_ops(arch: Architecture, digital_modules: list[dict[str, Any]], context: int,
                analog_attention: bool) -> tuple[list[DigitalOp], AnalogProducts | None]:
    """The digital parts of one decode step at ``context`` tokens of history."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    d, n = arch.hidden, context
    ops: list[DigitalOp] = []
    emb_rows = 2 if arch.position_embedding else 1
    ops.append(DigitalOp("embedding lookup", flops=d * (emb_rows - 1), dram_values=d * emb_rows,
                         note="one row per token" + (" (+ position row, added)" if emb_rows > 1 else "")))
    for module in digital_modules:
        dims = _numel(module["shape"])
        if not dims or module.get("type") == "Embedding" or "embedding" in str(module.get("reason", "")):
            continue
        weights = math.prod(dims)
        if str(module.get("type", "")).endswith("Experts") and arch.experts_per_token and len(dims) == 3:
            weights = weights * min(arch.experts_per_token, dims[0]) // dims[0]
        ops.append(DigitalOp(f"{module['name']} ({module.get('type', '')})", flops=2 * weights, macs=weights,
                             dram_values=weights, note=f"digital weights {module['shape']}: {module.get('reason', '')}"))
    products = None
    if arch.attention_layers:
        a, h, hd, kv = arch.attention_layers, arch.heads, arch.head_dim, arch.kv_heads
        macs = a * 2 * h * hd * n
        kv_values = a * 2 * kv * hd * (n + 1)  # read the N cached K and V rows, write the new one
        if analog_attention:
            products = AnalogProducts(macs=macs, dac_conversions=a * (h * hd + h * n),
                                      adc_conversions=a * (h * n + h * hd), reads=2 * a)
            ops.append(DigitalOp("KV cache traffic (analogue QK^T, AV)", flops=0, dram_values=kv_values,
                                 note=f"{a} attention layers x 2 x {kv} KV heads x {hd} x ({n} + 1) values"))
        else:
            ops.append(DigitalOp("attention QK^T and AV", flops=2 * macs, macs=macs, dram_values=kv_values,
                                 note=f"{a} layers x {h} heads x {hd} x {n} context, x2 products; KV cache read + write"))
        ops.append(DigitalOp("attention softmax", flops=a * h * n * (SOFTMAX_FLOPS + 1),
                             note=f"{SOFTMAX_FLOPS} FLOPs per score + 1/sqrt(d) scaling"))
        if arch.rope:
            ops.append(DigitalOp("rotary embeddings", flops=a * (h + kv) * hd * ROPE_FLOPS))
    norm_flops = LAYERNORM_FLOPS if arch.layernorm else RMSNORM_FLOPS
    ops.append(DigitalOp("norms", flops=(arch.norms * d + arch.qk_norm_elements) * norm_flops,
                         note=f"{arch.norms} x {d} elements x {norm_flops} FLOPs"
                              + (" + q/k norms" if arch.qk_norm_elements else "")))
    ops.append(DigitalOp("MLP activations", flops=arch.activation_elements * arch.activation_flops))
    if arch.experts_per_token and arch.experts:
        ops.append(DigitalOp("MoE routing softmax and top-k", flops=arch.layers * arch.experts * (SOFTMAX_FLOPS + 1)))
    ops.append(DigitalOp("residual adds", flops=2 * arch.layers * d))
    for what, layers, state, per_layer in arch.recurrent:
        ops.append(DigitalOp(what, flops=layers * per_layer, sram_values=2 * layers * state,
                             note=f"{layers} layers x {state} state elements, read and written on chip"))
    ops.append(DigitalOp("output softmax (sampling)", flops=arch.vocab * SOFTMAX_FLOPS))
    return ops, products


# ----- a workload: everything one token does ------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One decode step of a model on an analogue chip, from a map or from a model in memory."""

    source: str | None
    model_type: str
    family: str | None
    input: str                 #: ``map`` or ``model``
    target: str                #: ``crossbar`` or ``photonic``
    device: str                #: device kind: pcm, rram, photonic
    context: int
    config: AnalogConfig
    layers: tuple[LayerCounts, ...]
    digital: tuple[DigitalOp, ...]
    products: AnalogProducts | None
    architecture: Architecture

    def totals(self) -> dict[str, int]:
        """Sums of the per-layer counts and of the digital parts (the totals of every table)."""
        keys = ("arrays", "macs", "array_reads", "dac_conversions", "adc_conversions", "detections",
                "periphery_flops", "cells")
        out = {k: sum(layer.counts()[k] for layer in self.layers) for k in keys}
        out["analog_macs"] = sum(layer.macs for layer in self.layers if layer.analog)
        out["weight_side_macs"] = out["macs"] - out["analog_macs"]
        out["weights"] = sum(layer.weights for layer in self.layers)
        if self.products is not None:
            out["analog_macs"] += self.products.macs
            out["macs"] += self.products.macs
            out["dac_conversions"] += self.products.dac_conversions
            out["adc_conversions"] += self.products.adc_conversions
        out["digital_macs"] = sum(op.macs for op in self.digital)
        out["digital_flops"] = sum(op.flops for op in self.digital)
        out["dram_values"] = sum(op.dram_values for op in self.digital)
        out["sram_values"] = sum(op.sram_values for op in self.digital)
        return out


def correction_ops(config: AnalogConfig, layers: tuple[LayerCounts, ...]) -> list[DigitalOp]:
    """The measured low-rank correction's digital side path (``mapping.correction_rank``), as one op:
    k·(in + out) MACs per active matrix and token, its factors read from SRAM each token."""
    k = config.mapping.correction_rank
    if not k:
        return []
    values = sum(layer.active * correction_macs(k, layer.inp, layer.out)
                 for layer in layers if layer.analog)
    return [DigitalOp(f"measured rank-{k} correction", flops=2 * values, macs=values, sram_values=values,
                      note="B·(A·x) after the ADCs of every analogue matrix (mapping.correction_rank)",
                      chip_only=True)]


def workload_from_model(model: nn.Module, context: int = DEFAULT_CONTEXT, source: str | None = None) -> Workload:
    """The workload of an analogue model (``analogize_`` done; programming is not needed)."""
    from analogllm.export.manifest import analog_layers
    from analogllm.export.writer import default_target
    from analogllm.hf.models import model_family

    config: AnalogConfig | None = getattr(model, "analog_config", None)
    if config is None:
        raise ValueError("model is not analogue: call analogllm.analogize_(model, config) first")
    hf = getattr(model, "config", None)
    if hf is None:
        raise ValueError("the model has no Hugging Face config: its digital parts cannot be counted")
    arch = architecture(hf)
    target = default_target(config)
    layers = tuple(
        _layer(layer.name, layer.kind, layer.placement, target, list(layer.shape),
               model_tiles(layer, target, config), config, layer.bias is not None, arch.experts_per_token)
        for layer in analog_layers(model)
    )
    digital = [{"name": r[0], "type": r[1], "shape": r[2], "reason": r[4]}
               for r in model.analog_report.rows if r[3] == "digital"]
    ops, products = digital_ops(arch, digital, context, config.analog_attention)
    ops += correction_ops(config, layers)
    return Workload(
        source=source if source is not None else getattr(hf, "name_or_path", None) or None,
        model_type=arch.model_type, family=model_family(model), input="model", target=target,
        device=config.device.kind, context=context, config=config, layers=layers, digital=tuple(ops),
        products=products, architecture=arch,
    )


def workload_from_manifest(manifest: dict[str, Any], hf_config: Any, context: int = DEFAULT_CONTEXT) -> Workload:
    """The workload of a map (its manifest) with the model's Hugging Face config for the digital parts."""
    config = AnalogConfig.from_dict(manifest["profile"])
    arch = architecture(hf_config)
    recorded = manifest.get("model", {}).get("model_type")
    if recorded and recorded != arch.model_type:
        raise ValueError(f"the map is of a {recorded!r} model but the model config given is {arch.model_type!r}")
    target = manifest["target"]
    layers = tuple(
        _layer(r["name"], r["kind"], r.get("placement", "analog"), target, list(r["shape"]), r["tiles"], config,
               bool(r.get("bias")), arch.experts_per_token)
        for r in manifest["layers"]
    )
    ops, products = digital_ops(arch, list(manifest.get("digital", [])), context, config.analog_attention)
    ops += correction_ops(config, layers)
    model = manifest.get("model", {})
    return Workload(
        source=model.get("source"), model_type=arch.model_type, family=model.get("family"), input="map",
        target=target, device=manifest["device"]["kind"], context=context, config=config, layers=layers,
        digital=tuple(ops), products=products, architecture=arch,
    )


def hf_config_for(source: str) -> Any:
    """The Hugging Face config of a model source as a map records it (built-in name, folder, Hub id in
    the local cache), without loading any weights where that can be avoided."""
    from pathlib import Path

    from transformers import AutoConfig

    from analogllm.data import cache_dir
    from analogllm.hf.models import SMOLLM2, TINY_MODELS, load_model

    if source in TINY_MODELS:
        return TINY_MODELS[source]()
    if source == SMOLLM2:
        folder = cache_dir() / "models" / SMOLLM2
        if not (folder / "config.json").is_file():
            load_model(SMOLLM2)  # converts the GGUF file once into the cache
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    try:
        return AutoConfig.from_pretrained(str(Path(source).expanduser()) if Path(source).expanduser().is_dir()
                                          else source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the model config of {source!r} ({str(exc).splitlines()[0]}); "
                         "pass the model with --model") from None


__all__ = [
    "DEFAULT_CONTEXT", "AnalogProducts", "Architecture", "DigitalOp", "LayerCounts", "Workload", "architecture",
    "digital_ops", "hf_config_for", "model_tiles", "workload_from_manifest", "workload_from_model",
]
