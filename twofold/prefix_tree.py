"""Rows that open alike, run once: a forward's rows laid out as a prefix tree in one packed row.

A GRPO group's completions share their prompt, and a tool task's episodes share a system prompt listing every tool
schema (460 of ~700 tokens). Under causal attention a token's hidden state depends only on the tokens up to it, so
a prefix shared by n rows has the same states in each: computed once, it costs the decoder (n - 1) / n less.

Layout (`prefix_tree`): the rows' trie, compressed. Each node is a span of tokens that every row below it holds at
the same positions; nodes sit one after another in one packed row, depth first, and a row's tokens are the spans on
its path from a root. Position ids are positions within the row. A node's tokens attend to all of its ancestors'
tokens and causally to its own (`tree_attention`), which is exactly what each of the node's rows sees when padded.
A row identical to another, or ending inside a shared node, takes its states from that node.

The attention runs as transformers' attention implementation `TREE_ATTENTION`, which replaces sdpa on a model that
shares prefixes (every call without a tree goes to transformers' sdpa unchanged). Since the tree travels as a
keyword argument of the forward, gradient checkpointing recomputes each layer with the same tree: unlike a KV cache,
nothing is written during the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TREE_ATTENTION = "twofold_prefix_tree"
PLACEHOLDER = "_twofold_prefix_tree_placeholder"  # marks the 4D mask a tree forward passes (so none is built)
# keyword arguments some models give their attention for terms `tree_attention` does not compute
UNSUPPORTED_ATTENTION_TERMS = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window")

# A shared span shorter than this stays in each row: each node costs one more attention call per layer, which a
# handful of shared tokens (a chat template's opening) does not repay.
MIN_SHARED_TOKENS = 8


def common_length(a: list[int], b: list[int], start: int = 0) -> int:
    """Length of the common prefix of `a` and `b`, given that their first `start` tokens agree."""
    n = min(len(a), len(b))
    return next((i for i in range(start, n) if a[i] != b[i]), n)


def reusable_kv(config) -> bool:
    """Whether every layer attends causally to the whole prefix (no sliding window), so that a prefix's KV serves
    every longer sequence that starts with it, and the padding between a prefix's KV and the tokens after it (as
    in a batch) changes nothing but physical distance, which only a sliding window would see."""
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None) or []
    return getattr(text, "sliding_window", None) is None and all(t == "full_attention" for t in layer_types)


def prefix_sharing_refusal(config) -> str | None:
    """Why this model's rows may not share a prefix's states; None when they may. A sliding window sees a shared
    prefix at other distances; a rotary embedding that rescales with the sequence's length (dynamic NTK, LongRoPE)
    gives a prefix other angles in a packed row; attention other than sdpa (eager for soft-capping or sinks, flash)
    has its own terms that `tree_attention` does not compute."""
    if not reusable_kv(config):
        return "a shared prefix needs attention to the whole prefix; this model has a sliding window"
    rope = getattr(config.get_text_config(), "rope_parameters", None) or {}
    kinds = [r for r in rope.values() if isinstance(r, dict)] or [rope]  # one per layer type, or one for all
    if any(r.get("rope_type") in ("dynamic", "longrope") for r in kinds):
        return "a shared prefix needs positions that do not depend on the sequence's length (dynamic RoPE)"
    implementation = config.get_text_config()._attn_implementation
    if implementation not in ("sdpa", TREE_ATTENTION):
        return f"a shared prefix runs in place of sdpa attention; this model uses {implementation!r}"
    return None


@dataclass
class Node:
    start: int  # its first token's index in the packed row
    end: int
    ancestors: list[int]  # node indices, the root first


@dataclass
class PrefixTree:
    tokens: list[int]  # the packed row
    positions: list[int]  # each token's position in its rows
    nodes: list[Node]  # depth first: their spans tile the packed row in order
    where: list[list[int]]  # per row, the packed index of each of its tokens


def prefix_tree(rows: list[list[int]], min_shared: int = MIN_SHARED_TOKENS) -> PrefixTree:
    """The rows' compressed trie as one packed row (module docstring). Rows are taken in sorted order, where the
    common prefix of a run of rows is that of its first and last; a run whose rows share at least `min_shared`
    tokens beyond their parent becomes a node, and its rows that go on continue below it."""
    tree = PrefixTree([], [], [], [[] for _ in rows])

    def add(members: list[int], start: int, end: int, ancestors: list[int]) -> int:
        first = len(tree.tokens)
        tree.tokens.extend(rows[members[0]][start:end])
        tree.positions.extend(range(start, end))
        tree.nodes.append(Node(first, len(tree.tokens), ancestors))
        for r in members:
            tree.where[r].extend(range(first, len(tree.tokens)))
        return len(tree.nodes) - 1

    def grow(members: list[int], depth: int, ancestors: list[int]) -> None:
        # members: sorted, alike on [0, depth), each longer than depth
        i = 0
        while i < len(members):
            head = rows[members[i]]
            j, shared = i + 1, len(head)
            while j < len(members):
                n = common_length(head, rows[members[j]], depth)
                if n - depth < min_shared:
                    break
                shared, j = min(shared, n), j + 1
            run = members[i:j]
            node = add(run, depth, shared, ancestors)
            below = [r for r in run if len(rows[r]) > shared]
            if below:
                grow(below, shared, [*ancestors, node])
            i = j

    grow(sorted((r for r in range(len(rows)) if rows[r]), key=lambda r: rows[r]), 0, [])
    return tree


# A call's padded attention (rows x longest span x longest key list) may be at most this many times the nodes'
# own; a node that would push its call past it starts a new call.
PADDING_ALLOWANCE = 1.25
# Nodes longer than this run alone: their attention is large enough that one call each costs nothing extra, and
# padding them to each other would (a tool task's episodes: 100-1,500 tokens each).
BATCHED_NODE_TOKENS = 64


@dataclass
class AttentionCall:
    """Nodes whose attention runs in one SDPA call, one row each, padded: `queries` [k, m] and `keys` [k, K] are
    packed indices (padding repeats a real index), `mask` [k, 1, m, K] allows each row its ancestors' tokens and
    its own causally (a padding query sees at least one key, so no row is empty), and `valid` lists the [k * m]
    positions that are real queries. A node alone is `span` instead: its queries a slice of the packed row, its keys
    `keys` [K] (None: its own span, causally) under `mask` [m, K]."""

    queries: torch.Tensor | None
    keys: torch.Tensor | None
    mask: torch.Tensor | None
    valid: torch.Tensor | None = None
    span: tuple[int, int] | None = None


@dataclass
class TreeAttention:
    """A tree's attention pattern as tensors, built once per forward and read by every layer: its nodes grouped
    into `calls` (longest spans first; nodes of up to `BATCHED_NODE_TOKENS` share a call until padding would exceed
    `PADDING_ALLOWANCE` of its work, since for short nodes the call, not the attention, is the cost), and `order`,
    where each call's real queries go back to in the packed row."""

    calls: list[AttentionCall]
    order: torch.Tensor

    @classmethod
    def of(cls, tree: PrefixTree, device: torch.device) -> TreeAttention:
        rows = []  # (query indices, key indices, ancestor tokens) per node
        for node in tree.nodes:
            above = [i for a in node.ancestors for i in range(tree.nodes[a].start, tree.nodes[a].end)]
            own = list(range(node.start, node.end))
            rows.append((own, above + own, len(above)))
        rows.sort(key=lambda r: (-len(r[0]), -len(r[1])))
        groups: list[list[tuple[list[int], list[int], int]]] = []
        for row in rows:
            if groups and len(groups[-1][0][0]) <= BATCHED_NODE_TOKENS:  # sorted: the opener is the longest
                group = groups[-1] + [row]
                padded = len(group) * len(group[0][0]) * max(len(r[1]) for r in group)
                if padded <= PADDING_ALLOWANCE * sum(len(r[0]) * len(r[1]) for r in group):
                    groups[-1].append(row)
                    continue
            groups.append([row])
        # Masks are filled on the host and moved once each: on a GPU every slice assignment would be a kernel.
        calls, placed = [], []
        for group in groups:
            if len(group) == 1:
                (own, keys, above) = group[0]
                if above:
                    mask = torch.ones(len(own), len(keys), dtype=torch.bool).tril(above).to(device)
                    calls.append(
                        AttentionCall(None, torch.tensor(keys, device=device), mask, span=(own[0], own[-1] + 1))
                    )
                else:
                    calls.append(AttentionCall(None, None, None, span=(own[0], own[-1] + 1)))
                placed += own
                continue
            m, width = len(group[0][0]), max(len(r[1]) for r in group)
            queries = torch.tensor([q + [q[0]] * (m - len(q)) for q, _, _ in group], device=device)
            keys = torch.tensor([k + [k[0]] * (width - len(k)) for _, k, _ in group], device=device)
            mask = torch.zeros((len(group), 1, m, width), dtype=torch.bool)
            valid = []
            for i, (q, k, above) in enumerate(group):
                mask[i, 0, :, :above] = True
                mask[i, 0, : len(q), above : len(k)] = torch.ones(len(q), len(q), dtype=torch.bool).tril()
                mask[i, 0, len(q) :, 0] = True
                valid += range(i * m, i * m + len(q))
                placed += q
            calls.append(AttentionCall(queries, keys, mask.to(device), torch.tensor(valid, device=device)))
        order = torch.empty(len(placed), dtype=torch.long, device=device)
        order[torch.tensor(placed, device=device)] = torch.arange(len(placed), device=device)
        return cls(calls, order)


def repeats_grouped_heads(device: torch.device, masked: bool) -> bool:
    """Whether attention on `device` copies grouped KV heads out to one per query head: under a mask on CUDA,
    where the kernels that take a mask (memory-efficient, cuDNN) read no grouped heads and `enable_gqa` falls back
    to the math kernel, which holds every [queries, keys] score (transformers' sdpa repeats them there too; the
    copy costs the call's keys x heads, not its scores). Elsewhere they are read in place."""
    return masked and device.type == "cuda"


def tree_sdpa(query, key, value, mask, dropout, scaling, causal=False, repeat_heads: bool | None = None):
    """torch's scaled_dot_product_attention; grouped KV heads repeated where `repeats_grouped_heads` says (or
    `repeat_heads`)."""
    grouped = key.shape[1] != query.shape[1]
    if repeat_heads is None:
        repeat_heads = repeats_grouped_heads(query.device, mask is not None)
    if grouped and repeat_heads:
        repeats = query.shape[1] // key.shape[1]
        key, value, grouped = repeat_kv(key, repeats), repeat_kv(value, repeats), False
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=grouped
    )


def tree_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, prefix_tree=None, **kwargs
):
    """softmax(q k^T * scaling + mask) v over a `TreeAttention` in one packed row ([1, heads, L, head_dim] in,
    [1, L, heads, head_dim] out, as transformers' attention functions): each node's queries against its ancestors'
    keys and its own, several nodes a call (`tree_sdpa`). Without a tree: transformers' sdpa."""
    placeholder = getattr(attention_mask, PLACEHOLDER, False)
    if prefix_tree is None:
        if placeholder:  # the tree was given to the decoder and did not reach its attention: it would see everything
            raise ValueError("a shared prefix needs a decoder that passes keyword arguments on to its attention")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if not placeholder:  # the model made its own mask or bias from the placeholder: terms the tree does not compute
        raise ValueError("a shared prefix needs attention without a mask or bias of the model's own")
    extra = [k for k in UNSUPPORTED_ATTENTION_TERMS if kwargs.get(k) is not None]
    if extra:
        raise ValueError(f"a shared prefix needs plain attention; this model's adds {', '.join(extra)}")
    heads, value_dim = query.shape[1], value.shape[3]
    pieces = []
    for call in prefix_tree.calls:
        if call.span is not None:
            start, end = call.span
            if call.keys is None:
                k, v = key[:, :, start:end], value[:, :, start:end]
            else:
                k, v = key.index_select(2, call.keys), value.index_select(2, call.keys)
            out = tree_sdpa(query[:, :, start:end], k, v, call.mask, dropout, scaling, causal=call.keys is None)
            pieces.append(out[0])
            continue
        rows, m = call.queries.shape

        def gather(x, index):  # [1, h, L, d] at [k, n] -> [k, h, n, d]
            return x[0][:, index.reshape(-1)].reshape(x.shape[1], *index.shape, x.shape[3]).transpose(0, 1)

        out = tree_sdpa(
            gather(query, call.queries), gather(key, call.keys), gather(value, call.keys), call.mask, dropout, scaling
        )
        pieces.append(out.transpose(0, 1).reshape(heads, rows * m, value_dim)[:, call.valid])
    return torch.cat(pieces, dim=1)[:, prefix_tree.order].transpose(0, 1).unsqueeze(0).contiguous(), None


AttentionInterface.register(TREE_ATTENTION, tree_attention)
AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)


def prefix_tree_decoder_states(
    decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, min_shared: int = MIN_SHARED_TOKENS
) -> torch.Tensor:
    """The decoder's last hidden states of right-padded rows, [B, T, H], computed over their `prefix_tree` in one
    packed row: equal to the padded forward's up to float rounding. Padding positions of the result hold some other
    position's state (they carry no loss).

    The decoder's attention becomes `TREE_ATTENTION` on first use (transformers' sdpa for every call without a
    tree, so other forwards are unchanged); `prefix_sharing_refusal` says which models cannot."""
    refusal = prefix_sharing_refusal(decoder.config)
    if refusal:
        raise ValueError(refusal)
    if decoder.config._attn_implementation != TREE_ATTENTION:
        decoder.set_attn_implementation(TREE_ATTENTION)
        if decoder.config._attn_implementation != TREE_ATTENTION:  # transformers only warns for some models
            raise ValueError("a shared prefix needs a model whose attention implementation can be set")
    lengths = attention_mask.sum(dim=1).tolist()
    tree = prefix_tree([row[:n] for row, n in zip(input_ids.tolist(), lengths, strict=True)], min_shared)
    device, width = input_ids.device, input_ids.shape[1]
    # one copy to the device, not one per row; padding positions point at index 0 (they carry no loss)
    where = torch.tensor([indices + [0] * (width - len(indices)) for indices in tree.where], device=device)
    placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)  # 4D: transformers builds no mask
    setattr(placeholder, PLACEHOLDER, True)
    states = decoder(
        input_ids=torch.tensor([tree.tokens], device=device),
        position_ids=torch.tensor([tree.positions], device=device),
        attention_mask=placeholder,
        use_cache=False,
        prefix_tree=TreeAttention.of(tree, device),
    ).last_hidden_state[0]
    return states[where]
