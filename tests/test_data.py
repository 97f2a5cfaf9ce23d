"""Tests for analogllm.data: corpora, local files, token blocks, their cache and batching."""

from __future__ import annotations

import json
import os

import datasets
import pytest
import torch

from analogllm import data
from analogllm.data import (
    batches,
    builtin_corpus,
    builtin_documents,
    load_texts,
    token_blocks,
    tokenizer_fingerprint,
)
from analogllm.hf.models import builtin_tokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets an empty analogllm cache, so nothing depends on the user's."""
    monkeypatch.setenv("ANALOGLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tokenizer():
    return builtin_tokenizer()


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The expected token stream: each document followed by eos."""
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def test_builtin_corpus_is_sorted_pydoc_topics():
    from pydoc_data.topics import topics

    docs = builtin_documents()
    assert docs == [topics[k] for k in sorted(topics)]
    corpus = builtin_corpus()
    assert len(corpus) > 400_000
    assert corpus.startswith(docs[0]) and corpus.endswith(docs[-1])
    assert load_texts() == docs


def test_token_blocks_split_the_stream_into_train_and_held_out_tail(tokenizer):
    train = token_blocks(tokenizer, block_size=128)
    validation = token_blocks(tokenizer, block_size=128, split="validation")
    assert train.dtype == validation.dtype == torch.long
    assert train.shape[1] == validation.shape[1] == 128
    n = len(train) + len(validation)
    assert len(validation) == round(0.1 * n)
    assert n > 1000

    # Train then validation is exactly the corpus stream, cut in order: the validation blocks are
    # a tail no training block overlaps.
    expected = _stream(tokenizer, builtin_documents())
    assert len(expected) // 128 == n
    assert torch.equal(torch.cat([train, validation]).flatten(), expected[: n * 128])


def test_split_options(tokenizer):
    train = token_blocks(tokenizer, block_size=64)
    n = len(train) + len(token_blocks(tokenizer, block_size=64, split="validation"))
    quarter = token_blocks(tokenizer, block_size=64, split="validation", validation_fraction=0.25)
    assert len(quarter) == round(0.25 * n)
    assert len(token_blocks(tokenizer, block_size=64, validation_fraction=0.25)) == n - len(quarter)
    assert torch.equal(token_blocks(tokenizer, block_size=64, max_blocks=5), train[:5])


def test_second_call_is_a_cache_hit(tokenizer, cache, monkeypatch):
    first = token_blocks(tokenizer, block_size=128)
    assert len(list((cache / "blocks").glob("*.npy"))) == 1
    monkeypatch.setattr(data, "load_texts", lambda *a, **k: pytest.fail("tokenised again"))
    assert torch.equal(token_blocks(tokenizer, block_size=128), first)
    assert torch.equal(
        token_blocks(tokenizer, block_size=128, split="validation"),
        token_blocks(tokenizer, block_size=128, split="validation"),
    )


def test_cache_key_separates_block_size_and_tokenizer(tokenizer, cache, monkeypatch):
    token_blocks(tokenizer, block_size=128)
    assert token_blocks(tokenizer, block_size=32).shape[1] == 32
    other = builtin_tokenizer()
    other.add_tokens(["<|extra|>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    token_blocks(other, block_size=128)
    assert len(list((cache / "blocks").glob("*.npy"))) == 3


def test_local_txt_file_and_directory(tmp_path, tokenizer):
    texts = ["First document.\nIt has two lines.\n", "Second document, alone."]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"{i}.txt").write_text(text)
    (folder / ".hidden.txt").write_text("ignored")
    assert load_texts(str(folder / "0.txt")) == texts[:1]  # one document per file, not per line
    assert load_texts(str(folder)) == texts

    blocks = torch.cat(
        [
            token_blocks(tokenizer, str(folder), block_size=4),
            token_blocks(tokenizer, str(folder), block_size=4, split="validation"),
        ]
    )
    expected = _stream(tokenizer, texts)
    assert torch.equal(blocks.flatten(), expected[: blocks.numel()])


def test_edited_local_file_is_tokenised_again(tmp_path, tokenizer):
    path = tmp_path / "a.txt"
    path.write_text("alpha beta gamma delta " * 20)
    before = token_blocks(tokenizer, str(path), block_size=8)
    path.write_text("omega zeta sigma theta " * 20)  # same size: only the mtime tells
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    after = token_blocks(tokenizer, str(path), block_size=8)
    assert not torch.equal(before[: len(after)], after[: len(before)])


def test_local_json_jsonl_and_parquet(tmp_path):
    rows = [{"content": "hello world", "id": 1}, {"content": "second row", "id": 2}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    for name in ("a.json", "b.jsonl", "c.parquet"):
        assert load_texts(str(tmp_path / name), text_column="content") == [
            "hello world",
            "second row",
        ], name


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_texts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        token_blocks(builtin_tokenizer(), str(tmp_path / "nope.txt"))


def test_unsupported_extension_lists_supported_ones(tmp_path):
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"'\.csv'.*\.jsonl.*\.parquet.*\.txt"):
        load_texts(str(tmp_path / "table.csv"))


def test_missing_text_column_lists_available_columns(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x", "id": 1}))
    with pytest.raises(ValueError, match=r"'text'.*\['body', 'id'\]"):
        load_texts(str(tmp_path / "a.jsonl"))
    with pytest.raises(ValueError, match="'id'.*int"):
        load_texts(str(tmp_path / "a.jsonl"), text_column="id")


def test_bad_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no"):
        load_texts(str(tmp_path / "empty"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("x")
    (mixed / "b.jsonl").write_text(json.dumps({"text": "y"}))
    with pytest.raises(ValueError, match="mixes file kinds"):
        load_texts(str(mixed))


def test_unreachable_hub_dataset_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="no-such-dataset-xyz"):
        load_texts("no-such-dataset-xyz:config")


def test_bad_token_block_arguments(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="split"):
        token_blocks(tokenizer, split="test")
    with pytest.raises(ValueError, match="block_size"):
        token_blocks(tokenizer, block_size=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        token_blocks(tokenizer, validation_fraction=1.0)
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(ValueError, match="at least 2"):
        token_blocks(tokenizer, str(tmp_path / "tiny.txt"), block_size=128)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        token_blocks(tokenizer)


def test_batches():
    blocks = torch.arange(10 * 3).reshape(10, 3)
    plain = list(batches(blocks, 4))
    assert [len(b) for b in plain] == [4, 4, 2]
    assert torch.equal(torch.cat(plain), blocks)
    assert [len(b) for b in batches(blocks, 4, drop_last=True)] == [4, 4]

    before = torch.random.get_rng_state()
    shuffled = torch.cat(list(batches(blocks, 4, shuffle=True, seed=1)))
    assert torch.equal(torch.random.get_rng_state(), before), "global RNG was consumed"
    assert not torch.equal(shuffled, blocks)
    assert sorted(shuffled[:, 0].tolist()) == blocks[:, 0].tolist()
    assert torch.equal(shuffled, torch.cat(list(batches(blocks, 4, shuffle=True, seed=1))))
    assert not torch.equal(shuffled, torch.cat(list(batches(blocks, 4, shuffle=True, seed=2))))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(blocks, 0))
