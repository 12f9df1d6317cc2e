"""Trainer-side log-probs: where, in which precision and in which pieces the trainer computes them.

Every trainer-side log-prob (the training forward, and every old-logit source's scoring: exact capture,
recompute, EWMA, audit) goes through `token_logprobs`, under one `Numerics`, so that the same weights
give the same numbers on both paths. Two things keep memory bounded for real vocabularies and long
agent trajectories:

- the LM head is applied only to positions that predict a real token, flattened across rows, in chunks of
  tokens: logits of a chunk -> logsumexp and the chosen token's logit -> discard; with gradient, each chunk
  is recomputed in backward (activation checkpointing), so [B, T, V] float32 logits never exist (8k tokens
  x 150k vocabulary would be 4.8 GB), and a chunk's logits are [chunk, V] whatever the batch's shape;
- forwards are split into micro-batches under a padded-token budget (`microbatches`);
- with `packed`, a forward's rows are packed into as few rows of the longest one's width as hold them
  (`pack_rows`), so fewer padded tokens go through the decoder; position ids restart per row and
  transformers' packed-sequence masks keep attention inside each row (`packed_decoder_states`);
- with `share_prefixes`, tokens that open several rows alike (a GRPO group's prompt, a system prompt listing
  tool schemas) run through the decoder once: the rows go into one packed row as their prefix tree
  (`prefix_tree.prefix_tree_decoder_states`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from twofold.distributed import Ranks, rank_device
from twofold.prefix_tree import MIN_SHARED_TOKENS, prefix_sharing_refusal, prefix_tree_decoder_states

# The attribute of a sharded policy that holds its FSDP root (`twofold.sharding.shard` sets it).
SHARDED_ROOT = "_sharded_root"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as torch reads it ('cpu', 'cuda:1')."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Numerics:
    """How the trainer computes log-probs."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # autocast compute dtype; float32: no autocast
    temperature: float = 1.0
    chunk_size: int = 512  # positions per LM-head chunk; 0: all at once
    max_tokens: int = 0  # padded tokens per forward; 0: no limit
    max_sequences: int = 16  # sequences per scoring forward
    packed: bool = False  # rows packed into fewer rows per forward (`pack_rows`)
    share_prefixes: bool = False  # rows' shared prefixes run once (`prefix_tree`)

    @classmethod
    def from_config(cls, cfg, rank: int = 0) -> Numerics:
        """The trainer's numerics as a `twofold.config.Config` describes them (for rank `rank`: with several
        ranks, `auto` and `cuda` mean the rank's own GPU)."""
        t = cfg.trainer
        return cls(
            device=rank_device(t.device, rank) if t.world_size > 1 else resolve_device(t.device),
            dtype=DTYPES[t.dtype],
            temperature=cfg.engine.temperature,
            chunk_size=t.logprob_chunk_size,
            max_tokens=t.max_tokens_per_microbatch,
            max_sequences=cfg.oldlogits.max_sequences_per_forward,
            packed=t.pack_sequences,
            share_prefixes=t.share_prefixes,
        )

    def autocast(self, device: torch.device | None = None):
        """The compute precision on `device` (default: the trainer's), for the forward inside it."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast((device or self.device).type, dtype=self.dtype)


def _head_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    softcap: float | None,
    scale: float | None,
) -> torch.Tensor:
    """log softmax(head(hidden) / T)[target] per position, from float32 logits: [..., H] -> [...]."""
    logits = head(hidden).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    chosen = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def sharded_root(policy: torch.nn.Module) -> torch.nn.Module | None:
    return policy.__dict__.get(SHARDED_ROOT)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    wanted: torch.Tensor | None = None,
    packed: bool = False,
    share_prefixes: bool = False,
) -> torch.Tensor:
    """`policy_logprobs`, through the policy's FSDP root when it is sharded (`twofold.sharding.shard`)."""
    root = sharded_root(model)
    if root is not None:
        return root(input_ids, attention_mask, temperature, chunk_size, wanted, packed, share_prefixes)
    return policy_logprobs(model, input_ids, attention_mask, temperature, chunk_size, wanted, packed, share_prefixes)


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Row indices in bins of at most `width` tokens, first-fit decreasing: each row, longest first, goes into
    the first bin with room for it, else opens a new one. A row longer than `width` goes alone."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(width - lengths[i])
    return bins


def packed_decoder_states(
    decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The decoder's last hidden states of right-padded rows, [B, T, H], computed with the rows packed into
    `pack_rows(lengths, T)` rows of width T.

    Each packed row holds whole rows one after another, their position ids restarting at 0, then a tail whose
    positions restart again. With no attention mask, transformers reads a restart of the position ids as the
    start of a new sequence and masks attention to stay inside it (`masking_utils.find_packed_sequence_indices`),
    so every row sees exactly its own prefix, as when padded; no real token attends to a tail. Padding
    positions of the result hold some other position's state (they carry no loss)."""
    rows, width = input_ids.shape
    lengths = attention_mask.sum(dim=1).tolist()
    bins = pack_rows(lengths, width)
    ids = torch.zeros((len(bins), width), dtype=input_ids.dtype, device=input_ids.device)
    positions = torch.zeros_like(ids)
    where = torch.zeros((rows, width), dtype=torch.long)  # flat index into the packed states, per row position
    for b, members in enumerate(bins):
        at = 0
        for r in members:
            n = lengths[r]
            ids[b, at : at + n] = input_ids[r, :n]
            positions[b, at : at + n] = torch.arange(n)
            where[r, :n] = torch.arange(b * width + at, b * width + at + n)
            at += n
        positions[b, at:] = torch.arange(width - at)
    # no cache: transformers reads packed position ids only when there is none
    states = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    return states.reshape(len(bins) * width, -1)[where.to(states.device)]


def packing_leak(model: torch.nn.Module, device: torch.device) -> float:
    """How far a row's packed log-probs move when only the row packed before it changes: 0 exactly where every
    layer keeps to its row through transformers' packed-sequence mask (the masked keys weigh exactly 0, and the
    row's own products are the same). Not 0 where a layer does not: a recurrent or convolution mixer (Mamba,
    LFM2's short convolutions, linear attention) carries state across the boundary unless it is given sequence
    indices, and a model's own code may build a plain causal mask over the packed row."""
    vocab = model.get_output_embeddings().weight.shape[0]
    lengths = [8, 4, 4]  # pack_rows(lengths, 8): [[0], [1, 2]]: row 2 follows row 1 in one packed row
    ids = torch.zeros((3, 8), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = (torch.arange(n, device=device) * 7 + 3 * r + 1) % vocab
        mask[r, :n] = 1
    neighbour_changed = ids.clone()
    neighbour_changed[1, :4] = (ids[1, :4] + 5) % vocab
    training = model.training
    model.eval()  # no dropout: the two forwards differ by the neighbour's tokens alone
    try:
        with torch.no_grad():
            before = token_logprobs(model, ids, mask, packed=True)
            after = token_logprobs(model, neighbour_changed, mask, packed=True)
    finally:
        model.train(training)
    return float((before[2] - after[2]).abs().max())


def prefix_sharing_trial(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why this model's rows may not share prefixes, read from its config (`prefix_sharing_refusal`) or found by
    one forward over a small tree, where `tree_attention` refuses what it cannot compute (a decoder that does not
    pass the tree on to its attention, a mask or bias of the model's own, soft-capping, sinks, a window); None when
    they may. The model's attention is the tree's afterwards either way (sdpa for every call without a tree)."""
    refusal = prefix_sharing_refusal(model.config)
    if refusal:
        return refusal
    vocab = model.get_output_embeddings().weight.shape[0]
    opening = [(7 * i + 1) % vocab for i in range(MIN_SHARED_TOKENS + 2)]
    ids, mask = pad_right([opening + [2, 3], opening + [4], [5, 6, 7]], 0)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            token_logprobs(model, ids.to(device), mask.to(device), share_prefixes=True)
    except (ValueError, RuntimeError) as e:
        return str(e)
    finally:
        model.train(training)
    return None


def policy_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    wanted: torch.Tensor | None = None,
    packed: bool = False,
    share_prefixes: bool = False,
) -> torch.Tensor:
    """log p(x_t | x_<t) for every position of right-padded sequences, [B, T] float32; position 0 and padding
    get 0, and so does every position outside `wanted` ([B, T], e.g. a loss mask) when it is given.

    The distribution the engine samples from before top-k/top-p: log_softmax(logits / temperature), as in
    verl and AReaL. The decoder runs once; the LM head runs only on the positions that predict a real token
    (a wanted one), flattened across rows and taken `chunk_size` tokens at a time (0: all at once), each chunk
    recomputed in backward when gradients are needed: logits never exist for padding (nor for prompt and
    observation tokens that carry no loss), and at most [chunk_size, V] float32 logits exist at once whatever
    the batch's shape. Logit scaling and final soft-capping (Cohere, Gemma 2) are applied as the model's own
    forward does. `packed`: the decoder runs on the rows packed (`packed_decoder_states`); `share_prefixes`: on
    the rows' prefix tree in one packed row, each shared prefix once (`prefix_tree_decoder_states`). Either gives
    the same values up to float rounding (the products have other shapes).
    """
    decoder = model.get_decoder()
    if share_prefixes:
        hidden = prefix_tree_decoder_states(decoder, input_ids, attention_mask)[:, :-1]
    elif packed:
        hidden = packed_decoder_states(decoder, input_ids, attention_mask)[:, :-1]
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    real = attention_mask[:, 1:].bool()
    if wanted is not None:
        real = real & wanted[:, 1:].bool()
    tokens, targets = hidden[real], input_ids[:, 1:][real]  # [N, H], [N]
    count = tokens.shape[0]
    step = count if chunk_size <= 0 else chunk_size
    pieces = []
    for start in range(0, count, max(step, 1)):
        h, t = tokens[start : start + step], targets[start : start + step]
        if torch.is_grad_enabled() and h.requires_grad and step < count:
            pieces.append(checkpoint(_head_logprobs, head, h, t, temperature, softcap, scale, use_reentrant=False))
        else:
            pieces.append(_head_logprobs(head, h, t, temperature, softcap, scale))
    if not pieces:  # no real token: the head still runs (on none), so the result has a graph and FSDP's
        pieces.append(_head_logprobs(head, tokens, targets, temperature, softcap, scale))  # collectives pair up
    flat = torch.cat(pieces)
    out = torch.zeros(real.shape, dtype=torch.float32, device=hidden.device)
    out = out.masked_scatter(real, flat)
    return torch.cat([out.new_zeros((out.shape[0], 1)), out], dim=1)  # position 0 predicts nothing


def microbatches(
    lengths: list[int],
    max_tokens: int,
    packed: bool = False,
    rows: list[int] | None = None,
    tokens: list[list[int]] | None = None,
) -> list[list[int]]:
    """Indices of `rows` (default: all) grouped so that rows x longest row <= max_tokens per group (0: one group);
    `packed`: packed rows (`pack_rows` at the longest row's width) x longest row.

    Rows are taken longest first, so that rows of similar length share a group (less padding); given their
    `tokens` (to share prefixes), in sorted token order instead, so that rows that open alike (a group's
    completions) share a forward, whose prefix tree holds no more than the budget counts. A row longer than the
    budget goes alone.
    """
    rows = list(range(len(lengths))) if rows is None else rows
    order = sorted(rows, key=lambda i: -lengths[i]) if tokens is None else sorted(rows, key=lambda i: tokens[i])
    if max_tokens <= 0:
        return [order] if order else []

    def padded_tokens(group: list[int]) -> int:
        longest = max(lengths[i] for i in group)
        forward_rows = len(pack_rows([lengths[i] for i in group], longest)) if packed else len(group)
        return forward_rows * longest

    groups: list[list[int]] = []
    for i in order:
        if groups and padded_tokens(groups[-1] + [i]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def deal_rows(
    lengths: list[int], ranks: Ranks, group: Callable[[list[int]], list[list[int]]]
) -> list[list[int] | None]:
    """This rank's share of the rows, in groups, padded with None to the group count of the rank that has most.

    Rows are dealt round-robin to ranks, longest first (every rank gets a similar number of tokens); `group`
    splits this rank's rows (indices, longest first) into groups of them. Every rank returns as many groups as the
    others, since FSDP's collectives pair up forward by forward: a None is a forward the rank runs with no rows of
    its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int] | None] = list(group(order[ranks.rank :: ranks.world_size]))
    count = int(ranks.all_reduce(len(groups), "max"))
    return groups + [None] * (count - len(groups))


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn


def _forwards(sequences: list[list[int]], rows: list[int], numerics: Numerics) -> list[list[int]]:
    """Groups of `rows`, one per forward: under the token budget, at most `max_sequences` each."""
    lengths = [len(s) for s in sequences]
    tokens = sequences if numerics.share_prefixes else None
    out = []
    for group in microbatches(lengths, numerics.max_tokens, numerics.packed, rows, tokens):
        out += [group[i : i + numerics.max_sequences] for i in range(0, len(group), numerics.max_sequences)]
    return out


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module, sequences: list[list[int]], numerics: Numerics, pad_id: int = 0, ranks: Ranks | None = None
) -> list[torch.Tensor]:
    """Per-token log-probs of each sequence under `model` (no grad), one CPU float32 tensor per sequence.

    Forwards hold at most `numerics.max_sequences` sequences and `numerics.max_tokens` padded tokens, on the
    model's own device, under the trainer's autocast. With sharded `ranks` every rank passes the same
    `sequences`: each scores its share (longest first, dealt round-robin), all make the same number of
    forwards (FSDP's collectives need it; a rank short of work runs a 2-token dummy), and the results are
    gathered, so every rank returns every sequence's log-probs.
    """
    ranks = ranks or Ranks()
    device = next(model.parameters()).device
    out: dict[int, torch.Tensor] = {}
    for rows in deal_rows([len(s) for s in sequences], ranks, lambda mine: _forwards(sequences, mine, numerics)):
        rows = rows or []
        ids, attn = pad_right([sequences[i] for i in rows] or [[pad_id, pad_id]], pad_id)
        with numerics.autocast(device):
            lp = token_logprobs(
                model,
                ids.to(device),
                attn.to(device),
                numerics.temperature,
                numerics.chunk_size,
                packed=numerics.packed,
                share_prefixes=numerics.share_prefixes,
            ).cpu()
        for r, i in enumerate(rows):
            out[i] = lp[r, : len(sequences[i])].clone()
    if ranks.sharded:
        for part in ranks.all_gather(out):
            out.update(part)
    return [out[i] for i in range(len(sequences))]
