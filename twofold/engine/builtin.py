"""The built-in engine: batched sampling with a KV cache on a transformers model, in its own numerics.

Its model copy runs in `dtype` (bfloat16 by default), optionally with int8 weights, while the
trainer runs float32: the same weights give slightly different log-probs, as vLLM's do from FSDP's.
That gap is the discrepancy r_d that twofold measures and corrects.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from twofold import metrics as M
from twofold.engine.base import (
    GenerationRequest,
    GenerationResult,
    InferenceEngine,
    Joiners,
    OnResult,
    SamplingParams,
    Weights,
    sampling_key,
    weight_items,
)
from twofold.engine.prefix_cache import (
    BLOCK,
    DEFAULT_MAX_BYTES,
    PrefixCache,
    concatenated_caches,
    row_kv,
    shared_prefixes,
    stacked_cache,
)
from twofold.logprobs import DTYPES, resolve_device
from twofold.models import load_model, model_bytes
from twofold.prefix_tree import reusable_kv


def sample_from_logits(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens [B], behaviour log-probs [B]).

    The distribution is log_softmax of logits / temperature after top-k (keep the k largest) and
    top-p (keep the smallest prefix of the sorted distribution whose mass reaches p) filtering. The
    returned log-prob is that of the sampled token under exactly this distribution.
    """
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = inverse_cdf_sample(logprobs.exp(), generator)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` [B, V]: the first index i with cdf_i > u * cdf_V, cdf the running sum in float64 and
    u ~ U[0, 1) one draw per row, so P(i) = p_i / sum(p) and a token of probability 0 (cdf flat there) is never drawn.

    Why not `torch.multinomial`: on a CPU it draws one exponential per vocabulary entry (49,152 per row for SmolLM2),
    a tenth of a decode step there; this draws one number per row and adds up the row once."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    has_mass = total.isfinite() & (total > 0)
    if not bool(has_mass.all()):  # multinomial refused these too; a NaN must not train
        bad = (~has_mass).nonzero()[:, 0].tolist()
        raise ValueError(f"sampling: rows {bad[:8]} have no finite positive probability mass (NaN or -inf logits)")
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64, device=probs.device)
    tokens = torch.searchsorted(cdf, u * total, right=True).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)  # u * cdf_V < cdf_V up to rounding; the clamp covers equality


def _round_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8: scale = max|w| / 127 per row, round, back to float."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(w / scale).clamp(-127, 127) * scale


def _round_fp8(w: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 with a per-output-channel scale (max|w| maps to e4m3's 448), as FP8 rollouts quantise."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 448.0
    return (w / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale


def _round_int4(w: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    """Symmetric group-wise int4 (GPTQ/AWQ-style storage): each run of `group_size` input weights of a row
    shares a scale max|w| / 7, values rounded to -7..7. A row whose length is not a multiple keeps a
    shorter last group."""
    rows, cols = w.shape
    pad = (-cols) % group_size
    padded = torch.nn.functional.pad(w, (0, pad)).view(rows, -1, group_size)
    scale = padded.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 7.0
    return (torch.round(padded / scale).clamp(-7, 7) * scale).view(rows, -1)[:, :cols]


def _linear_in_float32(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """y = round_dtype(float32(x) @ W^T + b), W and b held in float32 and rounded to the engine's dtype."""
    return torch.nn.functional.linear(x.float(), self.weight, self.bias).to(x.dtype)


def _embedding_in(dtype: torch.dtype, module: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """The module's own lookup (a subclass may scale it) of float32-held rows, handed on in `dtype` (exactly, unless
    the subclass scales: each row holds `dtype` values)."""
    return type(module).forward(module, ids).to(dtype)


def hold_weights_in_float32_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold every Linear and Embedding weight of a `dtype` (bf16/fp16) model as float32 numbers rounded to `dtype`,
    and run each Linear as y = round_dtype(float32(x) @ W^T + b).

    Why: a CPU without native bf16 matmul (no AVX512-BF16/AMX, e.g. AVX2) emulates bf16 GEMMs about 6x slower than
    float32 ones, and the engine is nearly all GEMMs. Held in float32, the weights are ready for float32 GEMMs at
    no cost per forward (converting bf16 weights on each call would convert the whole model per decoded token),
    for twice the bytes. The numbers are those of a bf16 GEMM with float32 accumulation, what a GPU computes: the
    float32 copy of a bf16 value is exact, inputs are rounded to bf16 where the model rounds them, outputs are
    rounded back. Embedding lookups round back to `dtype` too, so a tied LM head and embedding share one tensor.
    Norms, attention and activations stay in `dtype`; `update_weights` and `quantize_` round into the float32."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(_linear_in_float32, module)
        elif isinstance(module, torch.nn.Embedding):
            module.forward = functools.partial(_embedding_in, dtype, module)
        else:
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.float()


CPU_SDPA = "twofold_cpu_sdpa"


def _cpu_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """softmax(q k^T * scaling + mask) v as the built-in engine computes it on a CPU: float32 sums of the `dtype`
    (bf16/fp16/float32) query, key and value (the softmax weights stay float32 too), output rounded to `dtype`, and
    each key/value head read in place by its group of query heads (torch's `enable_gqa`). transformers' sdpa copies
    the KV heads out to one per query head wherever a mask is given on a CPU, which in decoding copies the whole KV
    cache of every layer per token. Calls this does not cover go to transformers' own sdpa on the float32 copies:
    an additive position bias, a paged cache, and a causal prefill after cached tokens with no mask (which only a
    static cache makes)."""
    q, k, v = query.float(), key.float(), value.float()
    q_length, kv_length = q.shape[2], k.shape[2]
    special = kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
    if special or (attention_mask is None and 1 < q_length != kv_length):
        out, _ = sdpa_attention_forward(
            module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
        return out.to(query.dtype), None
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=bool(causal and q_length > 1 and attention_mask is None),
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.transpose(1, 2).contiguous().to(query.dtype), None


AttentionInterface.register(CPU_SDPA, _cpu_sdpa)
AttentionMaskInterface.register(CPU_SDPA, sdpa_mask)


def use_cpu_attention_(model: torch.nn.Module) -> None:
    """Run a model's sdpa attention as `_cpu_sdpa`: float32 sums and grouped KV heads read in place.

    Why: on a CPU torch's bf16 attention kernel is about 5x slower than its float32 one, with native bf16 matmul
    (AVX512-BF16) or without, and transformers' copy of the KV heads costs more than the attention itself when
    decoding a long context with grouped heads (3.5x on the tiny model at 700 tokens). The inputs, output and KV
    cache keep the model's dtype; only the sums run in float32, as in `hold_weights_in_float32_` (a GPU's flash
    attention sums in float32 too, but rounds the softmax weights to bf16 before multiplying by V). The model and
    each sub-model (a composite model's text or vision part) on sdpa move; one on another attention (eager, flash)
    keeps it."""
    config = model.config
    moving = {
        name: CPU_SDPA
        for name in getattr(config, "sub_configs", {})
        if getattr(config, name, None) is not None and getattr(config, name)._attn_implementation == "sdpa"
    }
    if config._attn_implementation == "sdpa":
        moving[""] = CPU_SDPA
    if moving:
        model.set_attn_implementation(moving)


def lacks_native_low_precision_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype == torch.float32:
        return False
    return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


QUANTIZERS = {"int8": _round_int8, "fp8": _round_fp8, "int4": _round_int4}


@torch.no_grad()
def quantize_(model: torch.nn.Module, mode: str, dtype: torch.dtype) -> None:
    """Round every decoder Linear weight to `mode` (int8, fp8, int4) and back, then to `dtype`, the engine's
    numerics (the weight may be held wider: `hold_weights_in_float32_`). Weight-only quantisation; the LM head
    stays unquantised, as in the usual recipes."""
    if mode == "none":
        return
    rounding = QUANTIZERS[mode]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            module.weight.copy_(rounding(module.weight.float()).to(dtype))


@dataclass
class _Row:
    """A request in a running batch: what it has generated so far (continuing a paused request's output)."""

    request: GenerationRequest
    ids: list[int] = field(init=False)
    logprobs: list[float] = field(init=False)
    versions: list[int] = field(init=False)
    finish: str | None = None

    def __post_init__(self):
        r = self.request
        self.ids, self.logprobs, self.versions = list(r.output_ids), list(r.output_logprobs), list(r.output_versions)

    def sequence(self) -> list[int]:
        """What the row has fed or will feed: the prompt and every token generated for it."""
        return self.request.prompt_ids + self.ids

    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.ids)

    def result(self) -> GenerationResult:
        return GenerationResult(
            self.request.request_id, self.ids, self.logprobs, self.versions, self.finish or "length"
        )


class BuiltinEngine(InferenceEngine):
    """Batches of requests sampled on one transformers model with a KV cache, and a prefix cache across calls.

    `prefix_cache_bytes` bounds the KV kept across calls (`prefix_cache.py`; default 1 GiB, about 46k tokens of
    SmolLM2-135M in bfloat16; 0 keeps nothing). `prefilled_tokens` counts the tokens run through the model before
    sampling, `reused_tokens` the context tokens whose KV came from the prefix cache instead, and `joined_requests`
    the requests that joined a running batch (continuous batching), since the engine was built (`prefill_metrics`).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "bfloat16",
        quantization: str = "none",
        logit_noise_std: float = 0.0,
        max_batch_size: int = 64,
        max_batch_tokens: int = 0,
        seed: int = 0,
        tokenizer=None,
        device: str = "auto",
        prefix_cache_bytes: int = DEFAULT_MAX_BYTES,
    ):
        super().__init__()
        self.device = resolve_device(device)
        self.weights_device = str(self.device)
        self.dtype = DTYPES[dtype]
        self.model = load_model(model_path, self.dtype).to(self.device)
        emulated = lacks_native_low_precision_matmul(self.device, self.dtype)
        if emulated:
            hold_weights_in_float32_(self.model, self.dtype)
        if self.device.type == "cpu":
            use_cpu_attention_(self.model)
        self.quantization = quantization
        self.logit_noise_std = logit_noise_std
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens  # continuous batching's bound on a batch's context tokens (0: none)
        self.tokenizer = tokenizer
        self.generator = torch.Generator(self.device).manual_seed(seed)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.prefix_cache = PrefixCache(prefix_cache_bytes if reusable_kv(self.model.config) else 0)
        self.prefilled_tokens = 0
        self.reused_tokens = 0
        self.joined_requests = 0
        self._shapes: dict[int, torch.Size] = {}  # each parameter's shape while the engine sleeps
        quantize_(self.model, quantization, self.dtype)

    def resident_weight_bytes(self) -> int:
        return 0 if self.asleep else model_bytes(self.model)

    def resident_cache_bytes(self) -> int:
        return self.prefix_cache.bytes

    def prefill_metrics(self) -> dict[str, int]:
        return {
            M.ENGINE_PREFILLED_TOKENS: self.prefilled_tokens,
            M.ENGINE_REUSED_TOKENS: self.reused_tokens,
            M.ENGINE_JOINED_REQUESTS: self.joined_requests,
        }

    def sleep(self) -> None:
        """Drop the weights' tensors (each parameter object stays, with its shape and dtype remembered, so a tied
        one is dropped once and stays tied) and the prefix cache; `update_weights` allocates them again and fills
        every weight. A weight memory-mapped from its file (a checkpoint already in the engine's dtype, on the
        CPU) is unmapped rather than freed."""
        if self.asleep:
            return
        self.prefix_cache.clear()
        self._shapes = {id(p): p.shape for p in self.model.parameters()}
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.asleep = True

    def _wake(self) -> None:
        for p in self.model.parameters():
            p.data = torch.empty(self._shapes[id(p)], dtype=p.dtype, device=p.device)
        self.asleep = False

    @torch.no_grad()
    def update_weights(self, weights: Weights, version: int) -> None:
        """Load new weights rounded to the engine's dtype, each as it comes (into storage allocated again when the
        engine sleeps); the prefix cache's KV is of the old ones, so it goes."""
        self.prefix_cache.clear()
        if self.asleep:
            self._wake()
        params = dict(self.model.named_parameters())
        missing = set(params)
        for name, tensor in weight_items(weights):
            if name in params:  # names the engine lacks (none for one architecture) are not its weights
                params[name].copy_(tensor.to(self.dtype), non_blocking=True)
                missing.discard(name)
        if missing:
            raise KeyError(f"update_weights: no weights for {sorted(missing)[:5]}")
        quantize_(self.model, self.quantization, self.dtype)
        self.version = version

    def _generate(
        self, requests: list[GenerationRequest], joiners: Joiners | None, on_result: OnResult | None
    ) -> list[GenerationResult]:
        results: dict[int, GenerationResult] = {}

        def finished(result: GenerationResult) -> None:
            results[result.request_id] = result
            if on_result is not None:
                on_result(result)

        # Requests with the same sampling key share a batch (one vectorised sampler per batch); joined requests of
        # another key wait in `queue` for a batch of their own, in this call.
        queue = list(requests)
        while queue:
            if self.pause_requested:
                for r in queue:
                    finished(r.untouched())
                break
            key = sampling_key(queue[0].params)
            batch = [r for r in queue if sampling_key(r.params) == key][: self.max_batch_size]
            taken = {id(r) for r in batch}
            queue = [r for r in queue if id(r) not in taken]
            self._run_batch(batch, joiners, queue, finished)
        return [results[r.request_id] for r in requests]

    def _forward(self, ids, attn, pos, cache, keep_last: bool):
        kwargs = {self._cache_kwarg: cache}
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1 if keep_last else 0,
            **kwargs,
        )
        return out.logits[:, -1].float()

    def _prefill(self, seqs: list[list[int]]):
        """One forward over `seqs` that takes each one's longest cached prefix (all but its last token at most: the
        last one's logits are needed) from the prefix cache and feeds only the rest.

        Row r of the batch cache is [padding | cached n_r tokens | padding | new tokens], both parts left-padded so
        every row's last token is the batch's last column; the mask is 0 on padding and positions count real tokens
        only, so each row computes what a prefill of its own tokens would. Returns (cache, attention mask over the
        cache [B, width], last-position logits [B, V])."""
        hits = [self.prefix_cache.longest_prefix(self.version, s[:-1]) for s in seqs]
        new = [s[n:] for s, (_, n) in zip(seqs, hits, strict=True)]
        past, width = max(n for _, n in hits), max(len(x) for x in new)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros((len(seqs), past + width), dtype=torch.long)
        for row, ((_, n), x) in enumerate(zip(hits, new, strict=True)):
            attn[row, past - n : past] = 1
            attn[row, past + width - len(x) :] = 1
            ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, past:]
        cache = stacked_cache(hits, past)
        logits = self._forward(ids, attn, pos, cache, keep_last=True)
        self.prefilled_tokens += sum(len(x) for x in new)
        self.reused_tokens += sum(n for _, n in hits)
        return cache, attn, logits

    def _prefill_shared_prefixes(self, seqs: list[list[int]]) -> None:
        """Prefill once, and cache, each prefix that two of `seqs` share (a system prompt, a group's prompt) and the
        cache lacks, so the batch's rows reuse it rather than each prefilling it. Shallower shared prefixes first, so
        the deeper ones reuse them in turn."""
        shared = shared_prefixes(seqs, BLOCK) if self.prefix_cache.max_bytes else []
        if not shared:
            return
        self._prefill_shared_prefixes(shared)
        missing = [p for p in shared if self.prefix_cache.longest_prefix(self.version, p)[1] < len(p)]
        if missing:
            cache, attn, _ = self._prefill(missing)
            self._keep(cache, attn, range(len(missing)), missing)

    def _keep(self, cache, attn: torch.Tensor, rows, seqs: list[list[int]]) -> None:
        """Put the KV of batch rows `rows` into the prefix cache; seqs[i] starts with row rows[i]'s tokens."""
        for row, seq in zip(rows, seqs, strict=True):
            columns = attn[row].nonzero().squeeze(-1)
            self.prefix_cache.insert(self.version, seq[: len(columns)], row_kv(cache, row, columns))

    def _stopped(self, req: GenerationRequest, ids: list[int], token: int) -> bool:
        if token in req.params.stop_token_ids:
            return True
        if req.params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(ids[len(req.output_ids) :], skip_special_tokens=False)
            return any(s in text for s in req.params.stop)
        return False

    def _prefill_rows(self, rows: list[_Row]):
        """(cache, attention mask, last-position logits) of `rows` prefilled, shared prefixes first."""
        self._prefill_shared_prefixes([r.sequence()[:-1] for r in rows])
        return self._prefill([r.sequence() for r in rows])

    def _take_joiners(self, joiners: Joiners, active: list[_Row], key, queue: list[GenerationRequest]) -> list[_Row]:
        """Requests handed in by `joiners` for the room left under `max_batch_size` and `max_batch_tokens`: those of
        the batch's sampling key join it (within the token budget), the rest wait in `queue` for a later batch."""
        room = self.max_batch_size - len(active)
        if room <= 0 or self.pause_requested:
            return []
        tokens = sum(r.length() for r in active) if self.max_batch_tokens else 0
        fresh = []
        for request in joiners(room):
            row = _Row(request)
            fits = not self.max_batch_tokens or tokens + row.length() <= self.max_batch_tokens
            if sampling_key(request.params) == key and fits and len(row.ids) < request.params.max_new_tokens:
                fresh.append(row)
                tokens += row.length()
                self.joined_requests += 1
            else:
                queue.append(request)
        return fresh

    @torch.no_grad()
    def _run_batch(
        self,
        requests: list[GenerationRequest],
        joiners: Joiners | None,
        queue: list[GenerationRequest],
        finished: OnResult,
    ) -> None:
        """Sample `requests` (one sampling key) in one batch until every row stops, hits its length or is paused,
        handing each result to `finished` as its row ends. With `joiners` (continuous batching), after every token
        the rows that ended make room for requests that became ready meanwhile: the newcomers are prefilled apart
        (their padding never touches the running rows' compute) and their KV joins the running rows' in one cache
        (`concatenated_caches`), so no row waits for the longest one to end."""
        params = requests[0].params
        key = sampling_key(params)
        rows = [_Row(r) for r in requests]
        for r in rows:
            if len(r.ids) >= r.request.params.max_new_tokens:
                r.finish = "length"
                finished(r.result())
        fresh = [r for r in rows if r.finish is None]
        active: list[_Row] = []
        cache = attn = tokens = next_pos = logits = None
        while fresh or active:
            if active:  # every running row feeds the token it sampled last
                attn = torch.cat([attn, torch.ones((len(active), 1), dtype=torch.long, device=self.device)], dim=1)
                logits = self._forward(tokens[:, None], attn, next_pos, cache, keep_last=True)
                next_pos = next_pos + 1
            if fresh:  # newcomers prefilled apart, then their rows join the running ones in one cache
                new_cache, new_attn, new_logits = self._prefill_rows(fresh)
                new_pos = new_attn.sum(-1, keepdim=True)
                if active:
                    cache, attn = concatenated_caches(cache, attn, new_cache, new_attn)
                    logits, next_pos = torch.cat([logits, new_logits]), torch.cat([next_pos, new_pos])
                else:
                    cache, attn, logits, next_pos = new_cache, new_attn, new_logits, new_pos
                active, fresh = active + fresh, []
            if self.pause_requested:
                for r in active:
                    r.finish = "paused"
                    finished(r.result())
                self._keep(cache, attn, range(len(active)), [r.sequence() for r in active])
                return
            if self.logit_noise_std > 0:
                logits = logits + self.logit_noise_std * torch.randn(
                    logits.shape, generator=self.generator, device=self.device
                )
            tokens, logprobs = sample_from_logits(logits, params, self.generator)
            sampled, sampled_lps = tokens.tolist(), logprobs.tolist()  # one device sync per token step
            still, done = [], []
            for row, r in enumerate(active):
                r.ids.append(sampled[row])
                r.logprobs.append(sampled_lps[row])
                r.versions.append(self.version)
                if self._stopped(r.request, r.ids, sampled[row]):
                    r.finish = "stop"
                elif len(r.ids) >= r.request.params.max_new_tokens:
                    r.finish = "length"
                (done if r.finish else still).append(row)
            self._keep(cache, attn, done, [active[row].sequence() for row in done])
            for row in done:
                finished(active[row].result())
            if done and still:
                sel = torch.tensor(still, dtype=torch.long, device=self.device)
                cache.batch_select_indices(sel)
                tokens, attn, next_pos = tokens[sel], attn[sel], next_pos[sel]
            active = [active[row] for row in still]
            if joiners is not None:
                fresh = self._take_joiners(joiners, active, key, queue)
