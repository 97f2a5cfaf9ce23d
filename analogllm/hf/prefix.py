"""A digital KV prefix: the attention sink kept off the chip.

Decoder LLMs park most of their attention on the first token of a sequence (the attention sink), and
that token carries the model's massive activations. On the chip its keys and values are read through
the same noisy arrays and static converters as every other token's, and their error reaches every
later token through attention. A fixed prefix of a few token ids (``AnalogConfig.kv_prefix``, e.g.
the tokenizer's BOS token) takes the sink's place instead. Its keys and values do not depend on
the input, so the host computes them once, digitally from the exact weights, and serves them from
memory as the first entries of every sequence's KV cache; the chip computes only the sequence's own
tokens (IntactKV, Liu et al. 2024; PrefixQuant, Chen et al. 2024).

Cost: P · layers · 2 · (kv heads · head dim) stored values (SmolLM2-135M, P = 1: 11,520) and P more keys
to attend to per token; no analogue work. The simulation recomputes the prefix digitally at each
forward (one P-token pass) while the model holds its digital weights, which equals the stored cache for
fixed weights and stays right while hardware-aware training moves them (no gradient flows through it, as
none would through a cache the host writes); ``deploy_`` stores it before it frees the weights.
Every score of a model with a prefix is compared with the digital model given the same prefix
(:func:`prefixed`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: attribute marking a cache that starts with a prefix: the caller's token ids it holds after it
#: (None once they are unknown)
_MARK = "_analog_kv_prefix"


class PrefixUnsupported(ValueError):
    """The model cannot take a digital KV prefix; ``reason`` says why (the message adds what to do)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"kv_prefix: {reason}; set kv_prefix to [] for this model")
        self.reason = reason


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's KV-cache argument (``cache`` in recent transformers, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise PrefixUnsupported(f"{type(model).__name__}'s forward takes no key/value cache")


class KVPrefix:
    """The digital KV prefix of one model: a forward pre-hook on its decoder body (which peft's adapters
    and HF's ``generate`` call too; :func:`attach_prefix` registers it). While the model holds its
    digital weights the prefix is computed from them at each forward; :meth:`store_` (called by
    ``deploy_`` before it frees them) keeps it as the host would, as stored keys and values. A class, not
    a closure, so the model still deep-copies and pickles."""

    def __init__(self, model: nn.Module, tokens: Sequence[int]) -> None:
        if not tokens:
            raise ValueError("kv_prefix: give at least one token id")
        body = getattr(model, "base_model", None)
        if body is None or body is model:
            raise PrefixUnsupported(f"{type(model).__name__} is not a Hugging Face causal LM with a decoder body")
        self.tokens = tuple(int(t) for t in tokens)
        self.key = _cache_kwarg(body)
        self.owner = type(model).__name__
        self.busy = False
        self.stored: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        cache = kwargs.get(self.key)
        if self.busy or (cache is not None and cache.get_seq_length() and not hasattr(cache, _MARK)):
            return None
        if cache is None or not cache.get_seq_length():
            ids = kwargs.get("input_ids", args[0] if args else None)
            cache = self._cache(module, (ids if ids is not None else kwargs["inputs_embeds"]).shape[0], cache)
            setattr(cache, _MARK, ids[:, :0] if ids is not None else None)
        _skip_cached(cache, kwargs)
        kwargs[self.key] = cache
        _shift(kwargs, len(self.tokens))
        return args, kwargs

    def _cache(self, body: nn.Module, batch: int, cache: Any) -> Any:
        """A cache holding the prefix's keys and values for ``batch`` sequences (into ``cache`` if given):
        one sequence's, computed now from the digital weights unless stored, repeated ``batch`` times, so
        that a computed prefix and a stored one are the same numbers bit for bit."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=body.config)
        w = body.get_input_embeddings().weight  # the model's device and dtype now (after any .to())
        for i, (k, v) in enumerate(self.stored if self.stored is not None else self._compute(body)):
            cache.update(*(t.to(w.device, w.dtype).expand(batch, -1, -1, -1).clone() for t in (k, v)), i)
        return cache

    def _compute(self, body: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix's keys and values per layer ((1, heads, P, dim) each), computed digitally."""
        from analogllm.chip.program import mode

        ids = torch.tensor([self.tokens], dtype=torch.long, device=body.get_input_embeddings().weight.device)
        self.busy = True
        try:
            with torch.no_grad(), mode(body, "digital"):  # analogue attention products included
                out = body(input_ids=ids, use_cache=True)
        finally:
            self.busy = False
        cache = out.get(self.key) if out.get(self.key) is not None else out.get("past_key_values")
        if not _keys_only(cache, len(self.tokens)):
            raise PrefixUnsupported(f"{self.owner} does not keep a key/value cache in every layer (a recurrent, "
                                    "state-space or hybrid model), so its prefix cannot be served as stored keys "
                                    "and values")
        return [(layer.keys, layer.values) for layer in cache.layers]

    def store_(self, body: nn.Module) -> int:
        """Compute the prefix from the current digital weights once and serve it from then on; returns how
        many key/value numbers that is (per sequence)."""
        self.stored = self._compute(body)
        return sum(k.numel() + v.numel() for k, v in self.stored)


def hold_prefix_(model: nn.Module) -> None:
    """Store ``model``'s digital KV prefix (if it has one not yet stored) from its current digital weights,
    before they are replaced or freed: by ``deploy_``, or by a map's targets when a chip is replayed or
    read back from a map. The host computes the prefix from the source model's exact weights; the
    targets (closed-loop programming moves them, and they are quantised) are what the chip holds."""
    prefix = getattr(model, "analog_kv_prefix", None)
    if prefix is not None and prefix.stored is None:
        prefix.store_(model.base_model)


def attach_prefix(model: nn.Module, tokens: Sequence[int]) -> KVPrefix:
    """Give ``model`` the digital KV prefix ``tokens`` (as ``model.analog_kv_prefix``); every sequence it
    reads then starts with their keys and values. A forward given a cache that already holds tokens the
    prefix did not put there is left alone (the caller brought its own context)."""
    prefix = KVPrefix(model, tokens)
    prefix.handle = model.base_model.register_forward_pre_hook(prefix, with_kwargs=True)
    model.analog_kv_prefix = prefix
    return prefix


def detach_prefix(model: nn.Module) -> None:
    """Remove the digital KV prefix :func:`attach_prefix` gave ``model`` (if any)."""
    prefix = model.__dict__.pop("analog_kv_prefix", None)
    if prefix is not None:
        prefix.handle.remove()


def _skip_cached(cache: Any, kwargs: dict[str, Any]) -> None:
    """Drop the caller's tokens this cache already holds: ``generate`` without ``use_cache`` passes the
    whole sequence again with the cache it was handed back, which holds the prefix too. The caller's
    tokens seen so far are kept on the cache (None once inputs came as embeddings)."""
    seen, ids = getattr(cache, _MARK), kwargs.get("input_ids")
    if seen is None or ids is None:
        setattr(cache, _MARK, None)
        return
    k = seen.shape[1]
    if 0 < k < ids.shape[1] and torch.equal(ids[:, :k], seen):
        kwargs["input_ids"] = ids[:, k:]
        for name in ("position_ids", "cache_position"):
            if kwargs.get(name) is not None and kwargs[name].shape[-1] == ids.shape[1]:
                kwargs[name] = kwargs[name][..., k:]
    setattr(cache, _MARK, torch.cat([seen, kwargs["input_ids"]], 1))


def prefix_values(model: nn.Module, tokens: Sequence[int]) -> int:
    """How many key/value numbers the host stores for the prefix ``tokens`` (one sequence); refuses a model
    that keeps no key/value cache in every layer. Needs the digital weights; attaches nothing."""
    return KVPrefix(model, tokens).store_(model.base_model)


def resolve_prefix(model: nn.Module, tokens: Sequence[int] | str, check: bool = True) -> tuple[tuple[int, ...], str | None]:
    """The token ids ``kv_prefix`` (``AnalogConfig.kv_prefix``) names for ``model``, and why ``"bos"`` named
    none. Explicit ids come back as given (they are checked where they are used, and refused there);
    ``"bos"`` is the model's BOS token where it keeps a key/value cache in every layer, and none
    otherwise, so that a profile or recipe carrying it converts every family. ``check=False`` (weights
    not loaded yet) skips the one-token digital forward that confirms the cache."""
    if not isinstance(tokens, str):
        return tuple(tokens), None
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    bos = bos[0] if isinstance(bos, (list, tuple)) and bos else bos
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(bos, int) or embed is None or not 0 <= bos < embed.weight.shape[0]:
        return (), "the model names no BOS token in its vocabulary"
    try:
        if check:
            prefix_values(model, (bos,))
        else:
            KVPrefix(model, (bos,))
    except PrefixUnsupported as exc:
        return (), exc.reason
    return (bos,), None


def _keys_only(cache: Any, p: int) -> bool:
    """Whether every layer of ``cache`` holds the ``p`` prefix tokens' keys and values (attention); a
    recurrent layer's state (Mamba, RWKV, linear attention) is not a per-token cache."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and cache.get_seq_length() == p and all(torch.is_tensor(getattr(l, "keys", None))
                                                                  for l in layers)


def _shift(kwargs: dict[str, Any], p: int) -> None:
    """A caller's attention mask and positions count its own tokens; the cache starts with ``p`` more."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError("kv_prefix: a prebuilt (4-D) attention mask cannot be extended by the prefix; pass "
                             "the 2-D padding mask (batch, tokens) and let the model build its own")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
    for name in ("position_ids", "cache_position"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name] + p


@contextmanager
def prefixed(model: nn.Module, tokens: Sequence[int]) -> Iterator[nn.Module]:
    """``model`` with the KV prefix ``tokens`` for the duration (nothing when ``tokens`` is empty): the
    digital reference of an analogue model that has one."""
    if tokens:
        attach_prefix(model, tokens)
    try:
        yield model
    finally:
        if tokens:
            detach_prefix(model)


__all__ = ["KVPrefix", "PrefixUnsupported", "attach_prefix", "detach_prefix", "hold_prefix_", "prefix_values", "prefixed", "resolve_prefix"]
