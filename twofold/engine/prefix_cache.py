"""The built-in engine's prefix cache: the KV of token sequences it has run, kept across `generate` calls, so an
episode's next turn prefills only its new tokens and episodes that share a system prompt share its KV.

Keyed by (weights version, token prefix). Under full causal attention the KV of a token depends only on the weights,
the token, its position and the tokens before it, so an entry serves every later sequence that starts with (a
prefix of) its tokens at the same weights. The engine empties the cache on every weight update, and an entry of
another version is never served: the KV a sampled token attends to comes from the weights that sample it, so the
behaviour log-probs mu stay those of the sampling distribution.

Finding the longest cached prefix: each entry is indexed by the chained hash of every full block of `BLOCK` tokens
it starts with. A lookup walks the query's blocks while some entry holds them, then extends token by token inside
the entries holding the deepest block (less than a block more). So a prefix shorter than one block is never
reused, and a hash collision is caught by comparing the tokens before anything is served.

Memory: at most `max_bytes` of KV; the least recently used entries go first. An entry that a newer one extends
(the previous turn of the same episode) is dropped when the newer one arrives, since the newer one serves it all.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from twofold.prefix_tree import common_length

BLOCK = 16
DEFAULT_MAX_BYTES = 1 << 30

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [kv_heads, tokens, head_dim]


def _block_keys(tokens: list[int]) -> Iterator[int]:
    """The chained hash of each full block: key k names tokens[: (k + 1) * BLOCK]."""
    key = 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        key = hash((key, tuple(tokens[start : start + BLOCK])))
        yield key


def shared_prefixes(seqs: list[list[int]], min_length: int = BLOCK) -> list[list[int]]:
    """The distinct prefixes, at least `min_length` long, at which two of `seqs` part or one ends inside another:
    the branch points of their trie, read off neighbours in sorted order. Shallower branch points are the shared
    prefixes of these, so a caller can recurse (each round drops at least the longest sequence)."""
    ordered = sorted(seqs)
    found: dict[tuple[int, ...], None] = {}
    for a, b in itertools.pairwise(ordered):
        n = common_length(a, b)
        if n >= min_length:
            found[tuple(a[:n])] = None
    return [list(p) for p in found]


@dataclass
class CachedPrefix:
    tokens: list[int]
    kv: list[LayerKV]  # one per layer, covering every token of `tokens`
    nbytes: int
    block_keys: list[int]


class PrefixCache:
    """KV of token sequences at one weights version, bounded by `max_bytes` (0: nothing is kept)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.version: int | None = None
        self.bytes = 0
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()  # least recently used first
        self._holders: dict[int, set[int]] = {}  # block key -> ids of the entries whose tokens start with it
        self._next_id = 0
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._drop_all()

    def longest_prefix(self, version: int, tokens: list[int]) -> tuple[CachedPrefix | None, int]:
        """(entry, n): an entry whose first n tokens are tokens[:n], n as large as the cache allows; (None, 0) if
        none (then no block of `tokens` is held at `version`)."""
        with self._lock:
            self._at(version)
            found, n = self._longest(tokens)
            if found is not None:
                self._entries.move_to_end(found)
            return (self._entries[found], n) if found is not None else (None, 0)

    def insert(self, version: int, tokens: list[int], kv: list[LayerKV]) -> None:
        """Keep `kv` (one (keys, values) per layer, [kv_heads, len(tokens), head_dim]) for `tokens` at `version`."""
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        if len(tokens) < BLOCK or nbytes > self.max_bytes:
            return
        with self._lock:
            self._at(version)
            extended, n = self._longest(tokens)
            if extended is not None and n == len(self._entries[extended].tokens):
                self._remove(extended)
            entry = CachedPrefix(list(tokens), kv, nbytes, list(_block_keys(tokens)))
            entry_id, self._next_id = self._next_id, self._next_id + 1
            self._entries[entry_id] = entry
            for key in entry.block_keys:
                self._holders.setdefault(key, set()).add(entry_id)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))

    def _at(self, version: int) -> None:
        if version != self.version:
            self._drop_all()
            self.version = version

    def _drop_all(self) -> None:
        self._entries.clear()
        self._holders.clear()
        self.bytes = 0

    def _longest(self, tokens: list[int]) -> tuple[int | None, int]:
        holders, depth = None, 0
        for key in _block_keys(tokens):
            if key not in self._holders:
                break
            holders, depth = self._holders[key], depth + BLOCK
        if holders is None:
            return None, 0
        reach = {i: common_length(self._entries[i].tokens, tokens, depth) for i in holders}
        best = max(reach, key=reach.__getitem__)
        if self._entries[best].tokens[:depth] != tokens[:depth]:  # a hash collision
            return None, 0
        return best, reach[best]

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.bytes -= entry.nbytes
        for key in entry.block_keys:
            held = self._holders[key]
            held.discard(entry_id)
            if not held:
                del self._holders[key]


def stacked_cache(hits: list[tuple[CachedPrefix | None, int]], width: int) -> DynamicCache:
    """A batch's DynamicCache holding, for row r, the first n_r tokens of its entry's KV, left-padded to `width`
    (the padding is masked out by the caller's attention mask)."""
    cache = DynamicCache()
    held = [(row, entry, n) for row, (entry, n) in enumerate(hits) if n > 0]
    if not held:
        return cache
    for layer, (k0, v0) in enumerate(held[0][1].kv):
        keys = k0.new_zeros((len(hits), k0.shape[0], width, k0.shape[2]))
        values = v0.new_zeros((len(hits), v0.shape[0], width, v0.shape[2]))
        for row, entry, n in held:
            keys[row, :, width - n :] = entry.kv[layer][0][:, :n]
            values[row, :, width - n :] = entry.kv[layer][1][:, :n]
        cache.update(keys, values, layer)
    return cache


def row_kv(cache: DynamicCache, row: int, columns: torch.Tensor) -> list[LayerKV]:
    """Row `row`'s KV at `columns` (its real tokens, in order), copied out of the batch cache."""
    return [(keys[row][:, columns], values[row][:, columns]) for keys, values, *_ in cache]


def concatenated_caches(
    a: DynamicCache, attn_a: torch.Tensor, b: DynamicCache, attn_b: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """The rows of batch caches `a` and `b` in one cache (a's rows first) with its attention mask: the narrower one
    left-padded to the other's width, the padding masked out, so each row attends to what it did before (positions
    are the caller's, counted over real tokens)."""
    width = max(attn_a.shape[1], attn_b.shape[1])

    def padded(x: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - x.shape[dim]
        if not missing:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    cache = DynamicCache()
    for layer, ((ka, va, *_), (kb, vb, *_)) in enumerate(zip(a, b, strict=True)):
        keys = torch.cat([padded(ka, 2), padded(kb, 2)])
        values = torch.cat([padded(va, 2), padded(vb, 2)])
        cache.update(keys, values, layer)
    return cache, torch.cat([padded(attn_a, 1), padded(attn_b, 1)])
