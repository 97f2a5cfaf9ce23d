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
channels.

A tied LM head that stays digital (the default) keeps its tie: the embedding's output is rotated online
(``E[ids] Q``) and the head un-rotates its input before applying the final norm's scale (``((h Qᵀ) ⊙
γ) Eᵀ``), two fast Hadamard transforms per token, instead of a second vocabulary × hidden matrix (+21 %
of Llama-3.2-1B's weights). An analogue LM head needs rotated weights of its own and is untied.
"""

from __future__ import annotations

import torch
from torch import nn

from analogllm.mapping.families import FUSED_LIKE, LLAMA_LIKE, _heads, model_type
import torch.nn.functional as F

from analogllm.nn.matrix import beside
from analogllm.ops.hadamard import Rotation, random_orthogonal

#: rows of the embedding / LM head rotated at a time (float64 temporaries stay small for 128k vocabularies)
_ROWS = 8192


def supports_rotation(model: nn.Module) -> bool:
    return model_type(model) in LLAMA_LIKE + FUSED_LIKE


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _rotate_rows_(weight: torch.Tensor, q: Rotation, gamma: torch.Tensor | None = None) -> None:
    """weight ← (weight ⊙ γ) Q in place; γ is applied in float64 a block of rows at a time."""
    for start in range(0, weight.shape[0], _ROWS):
        rows = weight[start:start + _ROWS]
        q.exact(rows if gamma is None else rows.double() * gamma, out=rows)


class RotatedEmbedding(nn.Embedding):
    """An embedding whose output is in the rotated residual basis, ``E[ids] Q`` (online, digital), so a
    tied LM head keeps reading the embedding matrix itself."""

    residual: Rotation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.residual(super().forward(input))


class RotatedHead(nn.Linear):
    """A digital LM head on the rotated residual stream: ``((h Qᵀ) ⊙ γ) Wᵀ``, γ the final norm's scale
    (folded out of the norm so that the norm commutes with Q)."""

    residual: Rotation
    gamma: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.residual.inverse(input) * self.gamma.to(input.dtype)
        return F.linear(x, self.weight, self.bias)


def keep_head_tied_(model: nn.Module, seed: int) -> int:
    """Rotate the residual stream at a tied digital head's two ends online (see the module docstring);
    returns the digital operations this adds per token. Also rebuilds a saved model's modules (their
    buffers are loaded afterwards)."""
    base, head = model.model, model.get_output_embeddings()
    emb = base.embed_tokens
    hidden = emb.weight.shape[1]
    emb.__class__ = RotatedEmbedding
    emb.residual = beside(Rotation(hidden, seed), emb.weight)
    head.__class__ = RotatedHead
    head.residual = beside(Rotation(hidden, seed), head.weight)
    gamma = base.norm.weight
    head.register_buffer("gamma", gamma.detach().clone() if not gamma.is_meta else torch.ones(hidden))
    if not gamma.is_meta:
        with torch.no_grad():
            gamma.fill_(1.0)
    return 2 * emb.residual.macs_per_token()


def residual_seed(model: nn.Module) -> int | None:
    """The seed of the online residual rotation at a tied head, or None (to save beside a checkpoint)."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    return emb.residual.seed if isinstance(emb, RotatedEmbedding) else None


class ResidualRotation:
    """The residual rotation Q and value-head rotation R of one model, applied in two parts: what lies
    outside the decoder layers (embeddings, final norm, LM head) and each decoder layer, so a model loaded
    layer by layer (:mod:`analogllm.hf.streaming`) is rotated exactly as one held whole."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        if not supports_rotation(model):
            raise ValueError(f"residual rotation needs a pre-norm RMSNorm transformer ({', '.join(LLAMA_LIKE + FUSED_LIKE)}); "
                             f"{model_type(model) or type(model).__name__} is not one")
        self.model, self.seed = model, seed
        self.hidden = model.config.hidden_size
        self.heads, self.kv, self.d = _heads(model.config)
        self.q = Rotation(self.hidden, seed)  # applied by its fast transform (exact in float64)
        self.r = random_orthogonal(self.d, seed + 1)
        self.fused = model_type(model) in FUSED_LIKE

    @torch.no_grad()
    def rotate_outside_(self) -> dict[str, object]:
        """Rotate the embeddings and fold the final norm into the LM head: a tied digital head stays tied
        (rotated online at both ends), an analogue one is untied first."""
        model, base = self.model, self.model.model
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is base.embed_tokens.weight
        info = {"residual": self.hidden, "value_heads": self.d, "seed": self.seed}
        if tied and type(head) is nn.Linear:  # a digital head: keep the tie, rotate online at both ends
            return {**info, "untied_lm_head": False, "online_tied_head": True,
                    "digital_macs_per_token": keep_head_tied_(model, self.seed)}
        if tied:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
            model.config.tie_word_embeddings = False
            if hasattr(model, "_tied_weights_keys"):
                model._tied_weights_keys = None
        _rotate_rows_(base.embed_tokens.weight, self.q.to(base.embed_tokens.weight.device))
        if head is not None:
            _rotate_rows_(head.weight, self.q.to(head.weight.device), base.norm.weight.double().to(head.weight.device))
            base.norm.weight.fill_(1.0)
        return {**info, "untied_lm_head": tied}

    @torch.no_grad()
    def rotate_layer_(self, layer: nn.Module) -> None:
        """Rotate one decoder layer: fold its norms into the readers, rotate readers, writers and value heads."""
        att, mlp = layer.self_attn, layer.mlp
        heads, kv, d, hidden = self.heads, self.kv, self.d, self.hidden
        q, r = self.q.to(att.o_proj.weight.device), self.r.to(att.o_proj.weight.device)
        readers = [att.qkv_proj] if self.fused else [att.q_proj, att.k_proj, att.v_proj]
        _fold_readers(readers, layer.input_layernorm, q)
        _fold_readers([mlp.gate_up_proj] if self.fused else [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm, q)
        for writer in (att.o_proj, mlp.down_proj):
            _set(writer.weight, q.exact(writer.weight.T).T)  # Qᵀ W = (Wᵀ Q)ᵀ
            if writer.bias is not None:
                _set(writer.bias, q.exact(writer.bias))
        # value heads: rows of v (kv heads × d) by Rᵀ, columns of o (heads × d) by R
        v_lin, v_start = (att.qkv_proj, (heads + kv) * d) if self.fused else (att.v_proj, 0)
        wv = v_lin.weight.double()[v_start:v_start + kv * d].view(kv, d, -1)
        _set(v_lin.weight[v_start:v_start + kv * d], torch.einsum("ji,hjk->hik", r, wv).reshape(kv * d, -1))
        if v_lin.bias is not None:
            bv = v_lin.bias.double()[v_start:v_start + kv * d].view(kv, d)
            _set(v_lin.bias[v_start:v_start + kv * d], (bv @ r).reshape(-1))
        wo = att.o_proj.weight.double().view(hidden, heads, d)
        _set(att.o_proj.weight, (wo @ r).reshape(hidden, heads * d))


def _fold_readers(readers: list[nn.Module], norm: nn.Module, q: Rotation) -> None:
    gamma = norm.weight.double()
    for lin in readers:
        _set(lin.weight, q.exact(lin.weight.double() * gamma))
    norm.weight.fill_(1.0)


__all__ = ["RotatedEmbedding", "RotatedHead", "ResidualRotation", "keep_head_tied_", "residual_seed",
           "supports_rotation"]
