"""The built-in engine: batched sampling with a KV cache on a transformers model, in its own numerics.

Its model copy runs in `dtype` (bfloat16 by default), optionally with int8 weights, while the
trainer runs float32: the same weights give slightly different log-probs, as vLLM's do from FSDP's.
That gap is the discrepancy r_d that twofold measures and corrects.
"""

from __future__ import annotations

import functools
import inspect
import types
from itertools import groupby
from pathlib import Path

import torch

from twofold import metrics as M
from twofold.engine.base import GenerationRequest, GenerationResult, InferenceEngine, SamplingParams
from twofold.engine.prefix_cache import (
    BLOCK,
    DEFAULT_MAX_BYTES,
    PrefixCache,
    reusable_kv,
    row_kv,
    shared_prefixes,
    stacked_cache,
)
from twofold.logprobs import DTYPES, resolve_device
from twofold.models import load_model, model_bytes


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
    tokens = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


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


class BuiltinEngine(InferenceEngine):
    """Batches of requests sampled on one transformers model with a KV cache, and a prefix cache across calls.

    `prefix_cache_bytes` bounds the KV kept across calls (`prefix_cache.py`; default 1 GiB, about 46k tokens of
    SmolLM2-135M in bfloat16; 0 keeps nothing). `prefilled_tokens` counts the tokens run through the model before
    sampling and `reused_tokens` the context tokens whose KV came from the prefix cache instead, since the engine
    was built (`prefill_metrics`)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "bfloat16",
        quantization: str = "none",
        logit_noise_std: float = 0.0,
        max_batch_size: int = 64,
        seed: int = 0,
        tokenizer=None,
        device: str = "auto",
        prefix_cache_bytes: int = DEFAULT_MAX_BYTES,
    ):
        super().__init__()
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        self.model = load_model(model_path, self.dtype).to(self.device)
        if lacks_native_low_precision_matmul(self.device, self.dtype):
            hold_weights_in_float32_(self.model, self.dtype)
        self.quantization = quantization
        self.logit_noise_std = logit_noise_std
        self.max_batch_size = max_batch_size
        self.tokenizer = tokenizer
        self.generator = torch.Generator(self.device).manual_seed(seed)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.prefix_cache = PrefixCache(prefix_cache_bytes if reusable_kv(self.model.config) else 0)
        self.prefilled_tokens = 0
        self.reused_tokens = 0
        quantize_(self.model, quantization, self.dtype)

    def resident_weight_bytes(self) -> int:
        return model_bytes(self.model)

    def prefill_metrics(self) -> dict[str, int]:
        return {M.ENGINE_PREFILLED_TOKENS: self.prefilled_tokens, M.ENGINE_REUSED_TOKENS: self.reused_tokens}

    @torch.no_grad()
    def update_weights(self, state_dict: dict, version: int) -> None:
        """Load new weights rounded to the engine's dtype; the prefix cache's KV is of the old ones, so it goes."""
        self.prefix_cache.clear()
        for name, p in self.model.named_parameters():
            p.copy_(state_dict[name].to(self.dtype), non_blocking=True)
        quantize_(self.model, self.quantization, self.dtype)
        self.version = version

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results: dict[int, GenerationResult] = {}
        # Requests with the same sampling params share a batch (one vectorised sampler per batch).
        keyed = sorted(requests, key=lambda r: repr(r.params))
        for _, same in groupby(keyed, key=lambda r: repr(r.params)):
            same = list(same)
            for start in range(0, len(same), self.max_batch_size):
                for res in self._run_batch(same[start : start + self.max_batch_size]):
                    results[res.request_id] = res
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

    @torch.no_grad()
    def _run_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        params = requests[0].params
        outs = [(list(r.output_ids), list(r.output_logprobs), list(r.output_versions)) for r in requests]
        finish: list[str | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            if len(r.output_ids) >= r.params.max_new_tokens:
                finish[i] = "length"
        active = [i for i in range(len(requests)) if finish[i] is None]
        if not active:
            return self._results(requests, outs, finish)

        def sequence(i: int) -> list[int]:  # what request i's row has fed or will feed
            return requests[i].prompt_ids + outs[i][0]

        contexts = [sequence(i) for i in active]
        self._prefill_shared_prefixes([c[:-1] for c in contexts])
        cache, attn, logits = self._prefill(contexts)
        next_pos = attn.sum(-1, keepdim=True)
        while active:
            if self.pause_requested:
                for i in active:
                    finish[i] = "paused"
                self._keep(cache, attn, range(len(active)), [sequence(i) for i in active])
                break
            if self.logit_noise_std > 0:
                logits = logits + self.logit_noise_std * torch.randn(
                    logits.shape, generator=self.generator, device=self.device
                )
            tokens, logprobs = sample_from_logits(logits, params, self.generator)
            sampled, sampled_lps = tokens.tolist(), logprobs.tolist()  # one device sync per token step
            still, done = [], []
            for row, i in enumerate(active):
                tok = sampled[row]
                out_ids, out_lps, out_vers = outs[i]
                out_ids.append(tok)
                out_lps.append(sampled_lps[row])
                out_vers.append(self.version)
                if self._stopped(requests[i], out_ids, tok):
                    finish[i] = "stop"
                elif len(out_ids) >= requests[i].params.max_new_tokens:
                    finish[i] = "length"
                (done if finish[i] else still).append(row)
            self._keep(cache, attn, done, [sequence(active[row]) for row in done])
            if not still:
                break
            if done:
                sel = torch.tensor(still, dtype=torch.long, device=self.device)
                cache.batch_select_indices(sel)
                tokens, attn, next_pos = tokens[sel], attn[sel], next_pos[sel]
            active = [active[row] for row in still]
            attn = torch.cat([attn, torch.ones((len(active), 1), dtype=torch.long, device=self.device)], dim=1)
            logits = self._forward(tokens[:, None], attn, next_pos, cache, keep_last=True)
            next_pos = next_pos + 1
        return self._results(requests, outs, finish)

    @staticmethod
    def _results(requests, outs, finish) -> list[GenerationResult]:
        return [
            GenerationResult(r.request_id, o[0], o[1], o[2], f or "length")
            for r, o, f in zip(requests, outs, finish, strict=True)
        ]
