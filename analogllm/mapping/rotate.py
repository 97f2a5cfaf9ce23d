"""Rotating a pre-norm transformer's residual stream (QuaRot-style), folded exactly into its weights.

With the RMSNorm scales folded into the layers that read them, an RMSNorm commutes with any orthogonal
``Q`` (``rms(hQ) = rms(h)``), so the whole residual stream can live in a rotated basis ``h' = hQ``:

    embeddings      E  ← E Q                    (rows are residual vectors)
    readers         W  ← W diag(γ) Q            q/k/v, gate/up and the LM head, γ their norm's scale
    writers         W  ← Qᵀ W,  b ← b Q          o_proj and down_proj
    norms           γ  ← 1

and each attention head's values can be rotated by a head-sized ``R`` that its output projection undoes
(``W_v ← Rᵀ W_v`` per value head, ``W_o ← W_o (I ⊗ R)``), because attention only mixes tokens. The
logits are unchanged up to float rounding, but every analogue layer that reads the residual stream now
sees inputs whose channels are all of the same size: massive channel outliers are spread over all
channels. A tied LM head is untied first (it reads ``diag(γ_final) Q``, the embedding ``Q`` only).
"""

from __future__ import annotations

import torch
from torch import nn

from analogllm.mapping.families import FUSED_LIKE, LLAMA_LIKE, _heads, model_type
from analogllm.ops.hadamard import random_orthogonal


def supports_rotation(model: nn.Module) -> bool:
    return model_type(model) in LLAMA_LIKE + FUSED_LIKE


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def rotate_(model: nn.Module, seed: int = 0) -> dict[str, object]:
    """Rotate ``model``'s residual stream and value heads in place; returns what was done."""
    if not supports_rotation(model):
        raise ValueError(f"residual rotation needs a pre-norm RMSNorm transformer ({', '.join(LLAMA_LIKE + FUSED_LIKE)}); "
                         f"{model_type(model) or type(model).__name__} is not one")
    config = model.config
    base = model.model
    hidden = config.hidden_size
    q = random_orthogonal(hidden, seed).to(base.embed_tokens.weight.device)
    heads, kv, d = _heads(config)
    r = random_orthogonal(d, seed + 1).to(q.device)
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is base.embed_tokens.weight
    if untied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None
    emb = base.embed_tokens.weight
    _set(emb, emb.double() @ q)
    fused = model_type(model) in FUSED_LIKE
    for layer in base.layers:
        att, mlp = layer.self_attn, layer.mlp
        readers = [att.qkv_proj] if fused else [att.q_proj, att.k_proj, att.v_proj]
        _fold_readers(readers, layer.input_layernorm, q)
        _fold_readers([mlp.gate_up_proj] if fused else [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm, q)
        for writer in (att.o_proj, mlp.down_proj):
            _set(writer.weight, q.T @ writer.weight.double())
            if writer.bias is not None:
                _set(writer.bias, writer.bias.double() @ q)
        # value heads: rows of v (kv heads × d) by Rᵀ, columns of o (heads × d) by R
        v_lin, v_start = (att.qkv_proj, (heads + kv) * d) if fused else (att.v_proj, 0)
        wv = v_lin.weight.double()[v_start:v_start + kv * d].view(kv, d, -1)
        _set(v_lin.weight[v_start:v_start + kv * d], torch.einsum("ji,hjk->hik", r, wv).reshape(kv * d, -1))
        if v_lin.bias is not None:
            bv = v_lin.bias.double()[v_start:v_start + kv * d].view(kv, d)
            _set(v_lin.bias[v_start:v_start + kv * d], (bv @ r).reshape(-1))
        wo = att.o_proj.weight.double().view(hidden, heads, d)
        _set(att.o_proj.weight, (wo @ r).reshape(hidden, heads * d))
    if head is not None:
        gamma = base.norm.weight.double()
        _set(head.weight, (head.weight.double() * gamma) @ q)
        base.norm.weight.fill_(1.0)
    return {"residual": hidden, "value_heads": d, "untied_lm_head": untied, "seed": seed}


def _fold_readers(readers: list[nn.Module], norm: nn.Module, q: torch.Tensor) -> None:
    gamma = norm.weight.double()
    for lin in readers:
        _set(lin.weight, (lin.weight.double() * gamma) @ q)
    norm.weight.fill_(1.0)


__all__ = ["rotate_", "supports_rotation"]
