"""`engine.backend=vllm`: vLLM behind the engine interface.

vLLM's `LLMEngine` is driven one scheduler step at a time, so a pause lands on a token boundary: the
unfinished requests are aborted and their tokens so far handed back as "paused"; the caller continues
them (prompt + partial output) under the new weights, as with the built-in engine.

Behaviour log-probs: `logprobs_mode="processed_logprobs"` with `logprobs=0`, i.e. the log-prob of the
sampled token under the distribution vLLM actually sampled from, after temperature and top-k/top-p
(vLLM's default, `raw_logprobs`, would report the unscaled model distribution instead).

Weights: `update_weights` sends the trainer's weights (Hugging Face names, LoRA merged) to every vLLM
worker through `collective_rpc` as (name, tensor) pairs, which vLLM serialises itself; the worker-side
method (`vllm_worker.TwofoldWorkerExtension`, mixed in by vLLM) reloads them in place with vLLM's own
`reload_weights` (fused layers, post-load kernel packing). Then the prefix cache is reset, since cached
KV blocks were computed with the old weights. It is built for the engine core in its own process (vLLM's
default) and for CUDA graphs: `engine.enforce_eager` (default: eager on CPU only). Run here on vLLM's CPU
build only; vLLM has not run on a GPU in this project.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
from pathlib import Path

from twofold.config import EngineConfig
from twofold.engine.base import GenerationRequest, GenerationResult, InferenceEngine, Weights, weight_items
from twofold.engine.placement import visible_devices
from twofold.engine.vllm_worker import pack
from twofold.modelpath import has_model_code

# vLLM's CPU build sizes its KV cache from the process's memory use unless given a size (GiB): a fixed
# size keeps a second engine in the same process (tests, grids) from failing. Ignored on GPUs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import vllm  # noqa: E402  (ImportError here is turned into a config error by make_engine)
from vllm.inputs import TokensPrompt  # noqa: E402

WORKER_EXTENSION = "twofold.engine.vllm_worker.TwofoldWorkerExtension"


def default_enforce_eager() -> bool:
    """Eager where CUDA graphs do not exist (vLLM's CPU build), graphs on a GPU."""
    from vllm.platforms import current_platform

    return not current_platform.is_cuda_alike()


@contextlib.contextmanager
def placed_on(cfg: EngineConfig):
    """On a GPU machine, the engine's processes (vLLM's engine core and its workers, started inside this block)
    see only the engine's GPUs (`EngineConfig.gpu_indices`); this process's own view is left as it was."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(cfg.gpu_indices(), os.environ)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


class VLLMEngine(InferenceEngine):
    def __init__(self, model_path: str | Path, cfg: EngineConfig, seed: int = 0, max_model_len: int | None = None):
        super().__init__()
        with placed_on(cfg):
            self.llm = vllm.LLM(
                model=str(model_path),
                dtype=cfg.dtype,
                seed=seed,
                enforce_eager=default_enforce_eager() if cfg.enforce_eager is None else cfg.enforce_eager,
                worker_extension_cls=WORKER_EXTENSION,
                logprobs_mode="processed_logprobs",
                max_model_len=max_model_len,
                max_num_seqs=cfg.max_batch_size,
                enable_prefix_caching=True,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                tensor_parallel_size=cfg.tensor_parallel_size,
                trust_remote_code=has_model_code(Path(model_path)),  # allowed by `modelpath.allow_model_code`
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

    def _generate(self, requests: list[GenerationRequest], joiners=None, on_result=None) -> list[GenerationResult]:
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
        return [results.get(r.request_id) or r.untouched() for r in requests]

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

    def update_weights(self, weights: Weights, version: int) -> None:
        packed = [pack(name, tensor) for name, tensor in weight_items(weights)]
        self.llm.collective_rpc("twofold_load_weights", kwargs={"weights": packed})
        self.llm.reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        # Free the engine core (its process, when multiprocessing) and its KV cache now: a test or a grid may
        # build the next engine in this process.
        core = getattr(self.engine, "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = self.engine = None
        gc.collect()
