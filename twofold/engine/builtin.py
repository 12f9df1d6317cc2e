"""The built-in engine: batched sampling with a KV cache on a transformers model, in its own numerics.

Its model copy runs in `dtype` (bfloat16 by default), optionally with int8 weights, while the
trainer runs float32: the same weights give slightly different log-probs, as vLLM's do from FSDP's.
That gap is the discrepancy r_d that twofold measures and corrects.
"""

from __future__ import annotations

import inspect
import types
from itertools import groupby
from pathlib import Path

import torch
from transformers import DynamicCache

from twofold.engine.base import GenerationRequest, GenerationResult, InferenceEngine, SamplingParams
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


def _linear_accumulating_in_float32(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """y = round_dtype(float32(x) @ float32(W)^T + b): low-precision inputs, float32 products and sums,
    output rounded back, which is what a GPU bf16 GEMM (and oneDNN's own bf16 GEMM) computes. Only the
    summation order differs (about 1 output in 10^4 moves by one bf16 ulp)."""
    bias = None if self.bias is None else self.bias.float()
    return torch.nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def accumulate_linears_in_float32_(model: torch.nn.Module) -> None:
    """Run every Linear of a bf16/fp16 model on CPU as `_linear_accumulating_in_float32`.

    Why: a CPU without native bf16 matmul (no AVX512-BF16/AMX, e.g. AVX2) emulates bf16 GEMMs about 6x
    slower than float32 ones, and the engine's prefill is nearly all GEMMs. The weights stay bf16
    (the engine's numerics are unchanged but for summation order)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(_linear_accumulating_in_float32, module)


def lacks_native_low_precision_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype == torch.float32:
        return False
    return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


QUANTIZERS = {"int8": _round_int8, "fp8": _round_fp8, "int4": _round_int4}


@torch.no_grad()
def quantize_(model: torch.nn.Module, mode: str) -> None:
    """Round every decoder Linear weight to `mode` (int8, fp8, int4) and back: weight-only quantisation,
    simulated in the engine's dtype. The LM head stays unquantised, as in the usual recipes."""
    if mode == "none":
        return
    rounding = QUANTIZERS[mode]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            module.weight.copy_(rounding(module.weight.float()).to(module.weight.dtype))


class BuiltinEngine(InferenceEngine):
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
    ):
        super().__init__()
        self.device = resolve_device(device)
        self.model = load_model(model_path, DTYPES[dtype]).to(self.device)
        if lacks_native_low_precision_matmul(self.device, DTYPES[dtype]):
            accumulate_linears_in_float32_(self.model)
        self.quantization = quantization
        self.logit_noise_std = logit_noise_std
        self.max_batch_size = max_batch_size
        self.tokenizer = tokenizer
        self.generator = torch.Generator(self.device).manual_seed(seed)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        quantize_(self.model, quantization)

    def resident_weight_bytes(self) -> int:
        return model_bytes(self.model)

    @torch.no_grad()
    def update_weights(self, state_dict: dict, version: int) -> None:
        for name, p in self.model.named_parameters():
            p.copy_(state_dict[name].to(p.dtype), non_blocking=True)
        quantize_(self.model, self.quantization)
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
        contexts = [requests[i].prompt_ids + requests[i].output_ids for i in active]
        width = max(len(c) for c in contexts)
        ids = torch.zeros((len(active), width), dtype=torch.long)
        attn = torch.zeros((len(active), width), dtype=torch.long)
        for row, c in enumerate(contexts):  # left padding: every row's next token is at the end
            ids[row, width - len(c) :] = torch.tensor(c, dtype=torch.long)
            attn[row, width - len(c) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, attn, pos, cache, keep_last=True)
        next_pos = pos[:, -1:] + 1
        while active:
            if self.pause_requested:
                for i in active:
                    finish[i] = "paused"
                break
            if self.logit_noise_std > 0:
                logits = logits + self.logit_noise_std * torch.randn(
                    logits.shape, generator=self.generator, device=self.device
                )
            tokens, logprobs = sample_from_logits(logits, params, self.generator)
            sampled, sampled_lps = tokens.tolist(), logprobs.tolist()  # one device sync per token step
            still = []
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
                else:
                    still.append(row)
            if not still:
                break
            if len(still) < len(active):
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
