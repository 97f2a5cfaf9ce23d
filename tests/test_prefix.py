"""The digital KV prefix (analogllm.hf.prefix): exact on the ideal chip in every attention family, kept
by checkpoints, served through generate and peft, given to the digital reference and the teacher, and
refused clearly where a model has no key/value cache."""

from __future__ import annotations

import copy

import pytest
import torch

import analogllm as al
from analogllm.config.schema import ConfigError
from analogllm.hf.checkpoint import from_pretrained, save_pretrained
from analogllm.hf.models import load_model
from analogllm.hf.prefix import prefixed
from analogllm.training.hwa import Teacher

PREFIX = [1, 7]


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reference(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The digital model's logits for ``ids`` read after the prefix (the prefix's own positions dropped)."""
    full = torch.cat([torch.tensor([PREFIX] * len(ids)), ids], 1)
    with torch.no_grad():
        return model(input_ids=full).logits[:, len(PREFIX):]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen3", "tiny-phi3"])
def test_prefixed_chip_on_the_ideal_profile_is_the_digital_model_after_the_prefix(name):
    model, _ = load_model(name)
    ids = _ids()
    ref = _reference(model, ids)
    plain = model(input_ids=ids).logits.detach()
    al.analogize_(model, al.AnalogConfig.from_profile("ideal", kv_prefix=PREFIX))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        uncached = model(input_ids=ids, use_cache=False).logits
    for out in (got, masked, uncached):
        assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())
    assert (got - plain).abs().max() > 1e-2  # the prefix is really there


def test_generate_continues_after_the_prefix():
    model, _ = load_model("tiny-llama")
    prompt = _ids(1, 6, seed=1)
    ref = model.generate(torch.cat([torch.tensor([PREFIX]), prompt], 1), max_new_tokens=6, do_sample=False)
    al.analogize_(model, al.AnalogConfig.from_profile("ideal", kv_prefix=PREFIX))
    got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert got[0, prompt.shape[1]:].tolist() == ref[0, len(PREFIX) + prompt.shape[1]:].tolist()


def test_a_cache_the_caller_brings_is_left_alone():
    """A caller's own non-empty cache is its context: no prefix is slipped in front of it."""
    model, _ = load_model("tiny-llama")
    ids = _ids(1, 8)
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], use_cache=True)
        ref = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values).logits
        with prefixed(model, PREFIX):  # the prefix's own cache, handed back, holds prefix + text
            own_len = model(input_ids=ids[:, :5], use_cache=True).past_key_values.get_seq_length()
    assert own_len == len(PREFIX) + 5
    plain_cache = load_model("tiny-llama")[0](input_ids=ids[:, :5], use_cache=True).past_key_values
    with prefixed(model, PREFIX), torch.no_grad():
        got = model(input_ids=ids[:, 5:], past_key_values=plain_cache).logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_the_prefix_reaches_the_model_through_peft():
    """peft calls the causal LM's forward directly; the prefix hangs on the decoder body, so adapters train
    and score after the prefix too."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model("tiny-llama")
    ids = _ids()
    ref = _reference(model, ids)
    al.analogize_(model, al.AnalogConfig.from_profile("ideal", kv_prefix=PREFIX))
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=True))
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_the_mapping_report_counts_the_stored_prefix():
    """tiny-llama: 2 layers x (keys + values) x 2 kv heads x head dim 16 per prefix token."""
    model, _ = load_model("tiny-llama")
    cfg = model.config
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", kv_prefix=PREFIX), calibration=_ids(2, 16))
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert model.analog_report.mapping.kv_prefix == (len(PREFIX), len(PREFIX) * per_token)
    assert f"digital KV prefix of {len(PREFIX)} token(s): {len(PREFIX) * per_token:,}" in model.analog_report.mapping.summary()


def test_checkpoints_keep_the_prefix(tmp_path):
    model, tok = load_model("tiny-llama")
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", kv_prefix=PREFIX))
    al.program_(model, seed=3)
    ids = _ids()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        before = model(input_ids=ids).logits
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    loaded = from_pretrained(tmp_path / "ckpt")
    assert tuple(loaded.analog_config.kv_prefix) == tuple(PREFIX)
    al.program_(loaded, seed=3)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        after = loaded(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4), float((before - after).abs().max())


def test_the_teacher_and_the_digital_reference_read_the_same_prefix():
    model, _ = load_model("tiny-llama")
    ids = _ids()
    ref = _reference(model, ids)
    with prefixed(model, PREFIX), torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)
    with torch.no_grad():  # removed afterwards
        assert not torch.allclose(model(input_ids=ids).logits, ref, atol=1e-3)
    teacher = Teacher(model, kv_prefix=PREFIX)
    assert torch.allclose(teacher.logits(ids), ref, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-qwen3-next"])
def test_models_without_a_key_value_cache_in_every_layer_are_refused(name):
    """Refused at conversion, before any mapping or training is spent on it."""
    model, _ = load_model(name)
    with pytest.raises(ValueError, match="kv_prefix.*set kv_prefix to \\[\\]"):
        al.analogize_(model, al.AnalogConfig.from_profile("pcm", kv_prefix=PREFIX), calibration=_ids(2, 16))
    assert model.analog_report.mapping is None  # refused before the mapping ran


@pytest.mark.parametrize("bad", [["a"], [-1], "x"])
def test_bad_prefixes_name_the_field(bad):
    with pytest.raises(ConfigError, match="kv_prefix"):
        al.AnalogConfig.from_profile("pcm", kv_prefix=bad)


def test_a_deployed_chip_serves_the_stored_prefix():
    """deploy_ frees the digital weights; the prefix computed from them before is what the host keeps."""
    import copy
    import pickle

    model, _ = load_model("tiny-llama")
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", kv_prefix=PREFIX))
    al.program_(model, seed=2)
    ids = _ids()

    def read(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return m(input_ids=ids).logits

    before = read(model)
    al.deploy_(model, seed=2)
    assert model.analog_kv_prefix.stored is not None
    assert torch.equal(read(model), before)  # a computed and a stored prefix are the same numbers
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(read(twin), before)


def test_block_by_block_loading_refuses_a_prefix(tmp_path):
    from analogllm.hf.streaming import stream_deploy

    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "digital")
    with pytest.raises(ValueError, match="kv_prefix.*load the model whole"):
        stream_deploy(tmp_path / "digital", al.AnalogConfig.from_profile("pcm", kv_prefix=PREFIX))


def test_kv_prefix_bos_is_the_models_bos_token_where_it_has_a_cache(tmp_path):
    """``kv_prefix: bos`` resolves to the model's BOS id: on the ideal chip the model is the digital one read
    after its BOS token, the report says so, and the checkpoint holds the id."""
    model, tok = load_model("tiny-llama")
    bos = model.config.bos_token_id
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=torch.cat([torch.full((len(ids), 1), bos), ids], 1)).logits[:, 1:]
    al.analogize_(model, al.AnalogConfig.from_profile("ideal", kv_prefix="bos"))
    assert model.analog_config.kv_prefix == (bos,)
    assert f"token ids [{bos}]" in model.analog_report.table()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.analog_config.kv_prefix == (bos,)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-qwen3-next", "tiny-rwkv"])
def test_the_bos_prefix_is_left_out_where_a_model_has_no_key_value_cache(name):
    """``bos`` can be set for every family (in a profile too): where the BOS prefix cannot be served the
    model converts without one and the report says why (explicit ids are refused instead, above)."""
    model, _ = load_model(name)
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", kv_prefix="bos"))
    assert model.analog_config.kv_prefix == ()
    assert getattr(model, "analog_kv_prefix", None) is None
    assert "kv_prefix 'bos': no prefix" in model.analog_report.table()


def test_a_model_without_a_bos_token_gets_no_prefix():
    model, _ = load_model("tiny-llama")
    model.config.bos_token_id = None
    al.analogize_(model, al.AnalogConfig.from_profile("pcm", kv_prefix="bos"))
    assert model.analog_config.kv_prefix == ()
    assert "names no BOS token" in model.analog_report.table()


def test_block_by_block_loading_leaves_a_bos_prefix_out(tmp_path):
    from analogllm.hf.streaming import stream_deploy

    model, _ = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "digital")
    chip = stream_deploy(tmp_path / "digital", al.AnalogConfig.from_profile("pcm", kv_prefix="bos"))
    assert chip.analog_config.kv_prefix == () and getattr(chip, "analog_kv_prefix", None) is None
    assert "block-by-block loading" in chip.analog_report.table()


def test_a_map_replays_and_reads_back_the_prefix_of_its_source(tmp_path):
    """A chip replayed or read back from a map keeps the prefix its source model computed: the map's
    targets (moved by closed-loop programming) replace the replica's weights, not the host's prefix."""
    from analogllm.data import token_blocks
    from analogllm.export.readback import chip_from_measurement, simulate_measurement

    model, tok = load_model("tiny-llama")
    calib = token_blocks(tok, split="train", block_size=64, max_blocks=4)
    cfg = al.AnalogConfig.from_profile("pcm", **{"tiling.rows": 48, "kv_prefix": PREFIX})
    al.analogize_(model, cfg, calibration=calib)
    al.program_(model, seed=4, seconds=3600.0)
    amap = al.export_map(model, tmp_path / "map", progress=False)
    report = al.verify_map(amap, model, tok, max_blocks=2)
    assert report.passed and report.logit_error == 0.0, report.summary()
    assert model.analog_kv_prefix.stored is None  # verifying leaves the model as it was
    simulate_measurement(amap, tmp_path / "measured", reads=None)
    back = chip_from_measurement(copy.deepcopy(model), amap, tmp_path / "measured")
    expected = model.analog_kv_prefix._compute(model.base_model)
    assert all(torch.equal(k, k2) and torch.equal(v, v2)
               for (k, v), (k2, v2) in zip(expected, back.analog_kv_prefix.stored))
