"""Text corpora and token blocks for calibration, hardware-aware training and evaluation.

Every experiment in analogllm (noise sweeps, HWA training, LoRA recovery, perplexity) needs text,
and it must work on a machine with no internet. So the default corpus is one that ships with every
CPython: the English reference text in :mod:`pydoc_data.topics` (about 465 k characters). Local
``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet`` files and Hugging Face Hub datasets are accepted
for users who have better data.

Texts become fixed-length blocks of token ids with a deterministic held-out tail, so that a model
is never evaluated on the blocks it was trained or calibrated on. Tokenising is cached on disk
because it is repeated in every run of every recipe.

This module also holds the small storage helpers the rest of the package shares (the cache
directory, atomic writes, the Hub reachability check); it imports nothing else from analogllm so
that any module may import it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from analogllm.fileio import atomic_write_bytes, cache_dir

__all__ = [
    "BUILTIN",
    "calibration_blocks",
    "HELDOUT",
    "batches",
    "builtin_corpus",
    "builtin_documents",
    "cache_dir",
    "heldout_documents",
    "hub_reachable",
    "load_texts",
    "require_hub",
    "token_blocks",
    "tokenizer_fingerprint",
]

BUILTIN = "builtin"
"""Name of the offline default corpus (Python's ``pydoc_data.topics``): training, calibration, and its
held-out tail for validation."""

HELDOUT = "shakespeare"
"""Name of the built-in held-out text of a different kind: the opening of Shakespeare's *Coriolanus*
(about 32 k characters of verse and dialogue, public domain, shipped in ``analogllm/corpora``). Nothing
is trained or calibrated on it, so every reported number can also be taken on text unlike the
training corpus."""

# Local file suffix -> `datasets` builder that reads it.
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Bump when the on-disk block format or the tokenising rule changes, so stale caches are ignored.
_BLOCKS_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Shared storage helpers
# --------------------------------------------------------------------------------------------


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub endpoint can be opened.

    ``huggingface_hub`` retries a failed connection five times with exponential backoff, so on an
    offline machine asking it for an unknown name takes about 25-50 s before it errors. One direct
    connection attempt answers the same question at once. When a proxy is configured, a direct
    connection says nothing about reachability, so the Hub client is left to decide.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def require_hub(what: str) -> None:
    """Raise a ``ValueError`` at once when ``what`` can only come from an unreachable Hub.

    In offline mode (``HF_HUB_OFFLINE=1``) the Hub libraries answer from their local cache without
    network retries, so they are left to it.
    """
    from huggingface_hub import constants, is_offline_mode

    if not is_offline_mode() and not hub_reachable():
        raise ValueError(
            f"{what}, and the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached. "
            "Set HF_HUB_OFFLINE=1 to use something already in the Hugging Face cache."
        )


def _sha256(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------


def builtin_documents() -> list[str]:
    """The offline corpus as documents: one ``pydoc_data`` topic each, in sorted topic order.

    Sorted order makes the corpus (and so the held-out split and every cache key) deterministic.
    The text differs slightly between CPython versions; cache keys hash it, so that is safe.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def heldout_documents() -> list[str]:
    """The built-in held-out text (:data:`HELDOUT`) as one document."""
    from importlib import resources

    return [resources.files("analogllm.corpora").joinpath("shakespeare.txt").read_text(encoding="utf-8")]


def builtin_corpus() -> str:
    """The offline corpus as one string (about 465 k characters of English technical prose)."""
    return "\n\n".join(builtin_documents())


def _local_files(path: Path) -> tuple[str, list[Path]]:
    """The ``datasets`` builder and the data files for a local file or directory.

    A directory contributes every supported file below it (hidden ones excluded); they must all
    need the same builder, because one ``load_dataset`` call reads them as one table.
    """
    supported = ", ".join(sorted(_BUILDERS))
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"unsupported file type {path.suffix!r} for {str(path)!r}; supported: {supported}"
            )
        return builder, [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _BUILDERS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"directory {str(path)!r} contains no {supported} files")
    builders = {_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise ValueError(
            f"directory {str(path)!r} mixes file kinds ({', '.join(sorted(builders))}); "
            "keep one kind per directory"
        )
    return builders.pop(), files


def _is_local(source: str) -> bool:
    """Whether ``source`` names a local path (existing or not) rather than a Hub dataset.

    Hub ids (``org/name``) may contain slashes and dots, so only an existing path, an explicit
    path prefix or a data-file suffix marks a local path.
    """
    return (
        Path(source).expanduser().exists()
        or source.startswith(("/", ".", "~"))
        or Path(source).suffix.lower() in _BUILDERS
    )


def _column_texts(table, text_column: str, where: str) -> list[str]:
    """The non-empty strings of ``text_column``, with errors that name what is wrong."""
    if text_column not in table.column_names:
        raise ValueError(
            f"{where} has no text column {text_column!r}; available columns: {table.column_names}"
        )
    values = list(table[text_column])
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(
            f"column {text_column!r} of {where} holds {type(bad).__name__} values, not text"
        )
    texts = [v for v in values if v]
    if not texts:
        raise ValueError(f"column {text_column!r} of {where} contains no text")
    return texts


def load_texts(
    source: str = BUILTIN, *, text_column: str = "text", hub_split: str = "train"
) -> list[str]:
    """Load a corpus as a list of documents.

    Args:
        source: ``"builtin"`` (offline default); a local ``.txt`` / ``.json`` / ``.jsonl`` /
            ``.parquet`` file or a directory of them; or a Hub dataset ``"name[:config]"``.
            A ``.txt`` file is one document; JSON / parquet rows are one document each.
        text_column: the column holding the text (JSON and parquet sources).
        hub_split: the split of a Hub dataset, in ``datasets`` syntax (``"train[:10000]"`` keeps
            the download of a huge corpus small). Held-out evaluation data comes from
            :func:`token_blocks`, not from here.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: an unsupported file type, a missing or non-text column, no text at all, or a
            Hub dataset that cannot be loaded.
    """
    if source == BUILTIN:
        return builtin_documents()
    if source == HELDOUT:
        return heldout_documents()
    import datasets

    if _is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
        builder, files = _local_files(path)
        # `sample_by="document"` keeps a text file whole instead of one row per line, so
        # documents are not cut at every newline. Arrow caches of local files go under our cache
        # directory, so nothing is left in the user's Hugging Face cache.
        extra = {"sample_by": "document"} if builder == "text" else {}
        table = datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=str(cache_dir() / "datasets"),
            **extra,
        )
        return _column_texts(table, text_column, repr(str(path)))

    name, _, config = source.partition(":")
    require_hub(f"{source!r} is not a local file or directory, so it names a Hub dataset")
    try:
        table = datasets.load_dataset(name, config or None, split=hub_split)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load {source!r}: it is not a local file or directory, and loading it as "
            f"a Hugging Face Hub dataset failed ({err}). Use {BUILTIN!r}, a local "
            f"{'/'.join(sorted(_BUILDERS))} file or directory, or 'name[:config]'."
        ) from err
    return _column_texts(table, text_column, f"Hub dataset {source!r} (split {hub_split!r})")


# --------------------------------------------------------------------------------------------
# Token blocks
# --------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes whenever the token ids this tokenizer produces could change.

    A fast tokenizer serialises its whole pipeline (normaliser, pre-tokeniser, merges, added
    tokens); a slow one is reduced to its vocabulary. The end-of-sequence id is included because
    it separates documents in :func:`token_blocks`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = (
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    return _sha256(type(tokenizer).__name__, payload, str(tokenizer.eos_token_id))[:16]


def _source_fingerprint(source: str, text_column: str, hub_split: str) -> str:
    """A hash identifying the texts ``source`` stands for, without loading a Hub dataset.

    Local files are identified by path, size and modification time, so editing a file
    invalidates its cached tokens; the built-in corpus by its content, which varies by CPython.
    """
    if source == BUILTIN:
        return _sha256(BUILTIN, builtin_corpus())
    if source == HELDOUT:
        return _sha256(HELDOUT, *heldout_documents())
    if _is_local(source):
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
        stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _local_files(path)[1]]
        return _sha256("local", json.dumps(stats), text_column)
    return _sha256("hub", source, text_column, hub_split)


def _all_blocks(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    block_size: int,
    text_column: str,
    hub_split: str,
) -> np.ndarray:
    """Every block of ``source`` as an int32 array, from the cache or freshly tokenised."""
    key = _sha256(
        str(_BLOCKS_FORMAT),
        _source_fingerprint(source, text_column, hub_split),
        tokenizer_fingerprint(tokenizer),
        str(block_size),
    )[:24]
    path = cache_dir() / "blocks" / f"{key}.npy"
    if path.exists():
        return np.load(path)

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token, which token_blocks puts between documents; "
            "set tokenizer.eos_token first"
        )
    texts = load_texts(source, text_column=text_column, hub_split=hub_split)
    # `verbose=False`: documents are longer than the model context on purpose (they are cut into
    # blocks below), so the "sequence longer than the maximum" warning would be noise.
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    stream = np.fromiter(
        (t for doc in ids for t in (*doc, eos)), dtype=np.int32, count=sum(len(d) + 1 for d in ids)
    )
    n_blocks = len(stream) // block_size
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size)
    buffer = io.BytesIO()
    np.save(buffer, blocks)
    atomic_write_bytes(path, buffer.getvalue())
    return blocks


def token_blocks(
    tokenizer: PreTrainedTokenizerBase,
    source: str = BUILTIN,
    *,
    block_size: int = 128,
    split: str = "train",
    max_blocks: int | None = None,
    validation_fraction: float = 0.1,
    text_column: str = "text",
    hub_split: str = "train",
) -> torch.Tensor:
    """Tokenised ``source`` as a ``LongTensor[n_blocks, block_size]`` of one split.

    Documents are concatenated with ``eos`` after each and cut into consecutive blocks; the tail
    shorter than a block is dropped. The last ``validation_fraction`` of the blocks (at least one)
    is the ``"validation"`` split and the rest ``"train"``: a contiguous tail, so no validation
    block shares text with a training block. The full block array is cached under
    :func:`cache_dir` keyed by the source, the tokenizer and ``block_size``.

    Args:
        tokenizer: any Hugging Face tokenizer with an ``eos_token``.
        source: see :func:`load_texts`.
        block_size: tokens per block (the context length used for training / evaluation).
        split: ``"train"``, ``"validation"`` or ``"all"`` (every block: a held-out text such as
            :data:`HELDOUT` is used whole).
        max_blocks: keep only the first ``max_blocks`` blocks of the split (quick runs).
        validation_fraction: share of the blocks held out, in (0, 1).
        text_column, hub_split: see :func:`load_texts`.
    """
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split must be 'train', 'validation' or 'all', not {split!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), not {validation_fraction}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be positive or None, not {max_blocks}")

    blocks = _all_blocks(tokenizer, source, block_size, text_column, hub_split)
    n = len(blocks)
    if n < 2:
        raise ValueError(
            f"{source!r} yields {n} block(s) of {block_size} tokens; at least 2 are needed for a "
            "train and a validation split; use more text or a smaller block_size"
        )
    n_val = min(n - 1, max(1, round(n * validation_fraction)))
    chosen = {"validation": blocks[n - n_val :], "train": blocks[: n - n_val], "all": blocks}[split]
    return torch.from_numpy(np.ascontiguousarray(chosen[:max_blocks])).long()


def batches(
    blocks: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield ``[batch_size, block_size]`` batches of ``blocks`` (one pass).

    Shuffling uses its own generator seeded with ``seed``, so the order is reproducible and the
    global torch RNG (which also drives analogue noise) is left untouched.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    if shuffle:
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(len(blocks))
    stop = len(blocks) - len(blocks) % batch_size if drop_last else len(blocks)
    for start in range(0, stop, batch_size):
        yield blocks[order[start : start + batch_size]]


def calibration_blocks(tokenizer: PreTrainedTokenizerBase, source: str = BUILTIN, count: int = 16,
                       block_size: int = 128) -> torch.Tensor | None:
    """``count`` training blocks spread evenly over ``source`` (None for 0): the calibration text that
    maps a model onto the chip (``analogize_(model, config, calibration=...)``)."""
    if count < 0:
        raise ValueError(f"calibration blocks must be >= 0, got {count}")
    if count == 0:
        return None
    train = token_blocks(tokenizer, source, block_size=block_size, split="train")
    return train[torch.linspace(0, len(train) - 1, min(count, len(train))).long()]

