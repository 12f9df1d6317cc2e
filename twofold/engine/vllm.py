"""`engine.backend=vllm`: vLLM behind the engine interface.

vLLM's `LLMEngine` is driven one scheduler step at a time, so a pause lands on a token boundary: the
unfinished requests are aborted and their tokens so far handed back as "paused"; the caller continues
them (prompt + partial output) under the new weights, as with the built-in engine.

Behaviour log-probs: `logprobs_mode="processed_logprobs"` with `logprobs=0`, i.e. the log-prob of the
sampled token under the distribution vLLM actually sampled from, after temperature and top-k/top-p
(vLLM's default, `raw_logprobs`, would report the unscaled model distribution instead).

Weights: `update_weights` loads a trainer state dict in place through vLLM's worker `reload_weights`
(it maps Hugging Face names onto fused layers and redoes the post-load kernel packing), then resets the
prefix cache, since cached KV blocks were computed with the old weights. The engine core runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that the model is reachable for that load.
"""

from __future__ import annotations

import gc
import itertools
import os
from pathlib import Path

from twofold.config import EngineConfig
from twofold.engine.base import GenerationRequest, GenerationResult, InferenceEngine

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# vLLM's CPU build sizes its KV cache from the process's memory use unless given a size (GiB): a fixed
# size keeps a second engine in the same process (tests, grids) from failing. Ignored on GPUs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import vllm  # noqa: E402  (ImportError here is turned into a config error by make_engine)
from vllm.inputs import TokensPrompt  # noqa: E402


def _repack_tied_head(model) -> None:
    """A tied LM head gets its weights through the embedding, so the reload skips its post-load step;
    on CPU that step packs the GEMM weights, and the head would keep computing with the old ones."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(
        method, "process_weights_after_loading"
    ):
        method.process_weights_after_loading(head)


class VLLMEngine(InferenceEngine):
    def __init__(self, model_path: str | Path, cfg: EngineConfig, seed: int = 0, max_model_len: int | None = None):
        super().__init__()
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype=cfg.dtype,
            seed=seed,
            enforce_eager=True,
            logprobs_mode="processed_logprobs",
            max_model_len=max_model_len,
            max_num_seqs=cfg.max_batch_size,
            enable_prefix_caching=True,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
        self.engine = self.llm.llm_engine
        self._serial = itertools.count()

    def _sampling(self, request: GenerationRequest) -> vllm.SamplingParams:
        p = request.params
        return vllm.SamplingParams(
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            max_tokens=p.max_new_tokens - len(request.output_ids),
            stop=p.stop or None,
            stop_token_ids=p.stop_token_ids or None,
            logprobs=0,
            detokenize=bool(p.stop),
            ignore_eos=True,
        )  # stop only where asked (stop_token_ids), as the built-in engine

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        by_id: dict[str, GenerationRequest] = {}
        for r in requests:
            if len(r.output_ids) >= r.params.max_new_tokens or self.pause_requested:
                continue
            rid = f"{r.request_id}-{next(self._serial)}"
            self.engine.add_request(rid, TokensPrompt(prompt_token_ids=r.prompt_ids + r.output_ids), self._sampling(r))
            by_id[rid] = r
        latest = {}
        while self.engine.has_unfinished_requests():
            if self.pause_requested:  # token boundary: drop the rest, keep what each request has so far
                self.engine.abort_request([rid for rid in by_id if not getattr(latest.get(rid), "finished", False)])
                break
            for out in self.engine.step():
                latest[out.request_id] = out
        results = {r.request_id: self._result(r, latest.get(rid)) for rid, r in by_id.items()}
        return [
            results.get(r.request_id)
            or r.unchanged("length" if len(r.output_ids) >= r.params.max_new_tokens else "paused")
            for r in requests
        ]

    def _result(self, r: GenerationRequest, out) -> GenerationResult:
        if out is None:  # paused before its first step
            return r.unchanged("paused")
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(ids, comp.logprobs, strict=True)]
        reason = "paused" if not out.finished else ("stop" if comp.finish_reason == "stop" else "length")
        return GenerationResult(
            r.request_id,
            r.output_ids + ids,
            r.output_logprobs + logprobs,
            r.output_versions + [self.version] * len(ids),
            reason,
        )

    def update_weights(self, state_dict: dict, version: int) -> None:
        weights = [(k, v.detach().cpu()) for k, v in state_dict.items()]
        # vLLM's in-place reload: takes checkpoint (Hugging Face) names and re-runs the post-load
        # processing (fused QKV, CPU weight packing) that a plain model.load_weights would skip.
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True}
        )
        self.llm.apply_model(_repack_tied_head)
        self.llm.reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        # Free the engine core and its KV cache now: a test or a grid may build the next engine in this process.
        self.llm = self.engine = None
        gc.collect()
