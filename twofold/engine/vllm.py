"""`engine.backend=vllm`: vLLM behind the engine interface.

vLLM's `LLMEngine` is driven one scheduler step at a time, so a pause lands on a token boundary: the
unfinished requests are aborted and their tokens so far handed back as "paused"; the caller continues
them (prompt + partial output) under the new weights, as with the built-in engine.

Behaviour log-probs: `logprobs_mode="processed_logprobs"` with `logprobs=0`, i.e. the log-prob of the
sampled token under the distribution vLLM actually sampled from, after temperature and top-k/top-p
(vLLM's default, `raw_logprobs`, would report the unscaled model distribution instead).

Weights: vLLM's weight-transfer protocol (`vllm.distributed.weight_transfer`: start, update, finish, driven
from the trainer's side by a trainer engine over `collective_rpc`), on one of three paths
(`placement.weight_transfer_path`): `host`, twofold's own engine (`vllm_worker.HostWeightTransferEngine`),
the weights as bytes in the update message; `ipc`, vLLM's CUDA-IPC engine, the weights packed into a reused
buffer on the trainer's GPU, which the engine on that GPU reads through an IPC handle; `nccl`, vLLM's NCCL engine,
packed broadcasts to engine GPUs of their own.
Every path loads through vLLM's layerwise reload (fused layers, post-load kernel packing). Then the prefix
cache is reset, since cached KV blocks were computed with the old weights, and later tokens are stamped with
the new version. It is built for the engine core in its own process (vLLM's default) and for CUDA graphs:
`engine.enforce_eager` (default: eager on CPU only). Run here on vLLM's CPU build only (the `host` path);
vLLM, and so the `ipc` and `nccl` paths, have not run on a GPU in this project.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from twofold.config import ConfigError, EngineConfig
from twofold.distributed import free_port
from twofold.engine.base import GenerationRequest, GenerationResult, InferenceEngine, Weights, weight_items
from twofold.engine.placement import (
    PACKED_BUFFER_BYTES,
    PACKED_BUFFERS,
    ipc_buffer_bytes,
    sleep_frees_trainer_gpu,
    visible_devices,
    weight_transfer_path,
)
from twofold.engine.vllm_worker import HOST_BACKEND, pack
from twofold.modelpath import has_model_code

# vLLM's CPU build sizes its KV cache from the process's memory use unless given a size (GiB): a fixed
# size keeps a second engine in the same process (tests, grids) from failing. Ignored on GPUs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import vllm  # noqa: E402  (ImportError here is turned into a config error by make_engine)
from vllm.config.weight_transfer import WeightTransferConfig  # noqa: E402
from vllm.distributed.weight_transfer.base import (  # noqa: E402
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
)
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine  # noqa: E402
from vllm.distributed.weight_transfer.nccl_engine import (  # noqa: E402
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
)
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


class EngineWorkersClient:
    """vLLM's weight-sync control plane (`VLLMWeightSyncClient`) for an `LLM` in this process: each call runs
    the workers' method of that name through `collective_rpc`."""

    def __init__(self, llm: vllm.LLM):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info: dict | list[dict]) -> None:
        self.llm.collective_rpc("update_weights", args=(update_info,))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.collective_rpc("finish_weight_update")


class PublishedWeights(WeightSource):
    """The weights of the publication under way (Hugging Face names, the engine's dtype), one pass each, as they
    are gathered. Their names and shapes come from the stream's own declaration (`models.WeightStream.metadata`)
    without gathering anything; only a stream that declares nothing (a dict, a plain iterator) is held to read
    them. vLLM's `ipc` and `nccl` senders pack them into reused buffers (`placement.PACKED_BUFFER_BYTES`), so
    the trainer's GPU holds those and a weight or two, never the whole model."""

    def __init__(self):
        self._weights: Weights = []

    def publish(self, weights: Weights) -> None:
        self._weights = weights

    def metadata(self) -> list[ParamMeta]:
        declared = getattr(self._weights, "metadata", None)
        if declared is None:
            self._weights = list(weight_items(self._weights))
            return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self._weights]
        return [ParamMeta(name, dtype, shape) for name, dtype, shape in declared()]

    def largest_bytes(self) -> int:
        """Bytes of the largest weight of the publication, from its declaration where it has one."""
        return max((math.prod(m.shape) * m.dtype.itemsize for m in self.metadata()), default=0)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return weight_items(self._weights)


@dataclass
class HostTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = HOST_BACKEND


class HostTrainerWeightTransferEngine(TrainerWeightTransferEngine[HostTrainerInitInfo]):
    """The trainer's side of `twofold_host`: each publication is one start-update-finish round whose update
    message carries the weights as `pack`ed bytes."""

    init_info_cls = HostTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: HostTrainerInitInfo, *, client, source: WeightSource | None = None):
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if engine.is_sender:
            client.init_weight_transfer_engine({})
        return engine

    def send_weights(self) -> None:
        packed = [pack(name, tensor) for name, tensor in self.source]
        if not self.is_sender:
            return
        self.client.start_weight_update()
        self.client.update_weights({"weights": packed})
        self.client.finish_weight_update()


class RankZeroIPCTrainerWeightTransferEngine(IPCTrainerWeightTransferEngine):
    """vLLM's CUDA-IPC sender for twofold's publication, where rank 0 alone sends: the other trainer ranks
    took part in the gathers and keep nothing, so there are no handles to exchange with them and no barrier
    for them to join (vLLM's own would wait on the default group, which they never enter here)."""

    def _all_gather_and_merge_handles(self, handles: list[dict]) -> list[dict]:
        return handles

    @staticmethod
    def _post_send_sync() -> None:
        torch.cuda.ipc_collect()


def trainer_sender(path: str, tensor_parallel_size: int, client, source: WeightSource) -> TrainerWeightTransferEngine:
    """The trainer's side of a path, handshake done; the trainer is the one sender (rank 0). `ipc` and `nccl` send
    packed, in reused buffers (`placement.PACKED_BUFFER_BYTES`; an ipc buffer is sized again at each publication
    to hold its largest weight, `VLLMEngine.update_weights`)."""
    if path == "nccl":
        info = NCCLTrainerInitInfo(
            "127.0.0.1",
            free_port(),
            1 + tensor_parallel_size,
            rank=0,
            packed=True,
            packed_buffer_size_bytes=PACKED_BUFFER_BYTES,
            packed_num_buffers=PACKED_BUFFERS["nccl"],
        )
        return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
    if path == "ipc":
        info = IPCTrainerInitInfo(rank=0, packed=True, packed_buffer_size_bytes=PACKED_BUFFER_BYTES)
        return RankZeroIPCTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
    return HostTrainerWeightTransferEngine.trainer_init(HostTrainerInitInfo(rank=0), client=client, source=source)


BACKENDS = {"host": HOST_BACKEND, "ipc": "ipc", "nccl": "nccl"}


def check_sleep(cfg: EngineConfig, trainer_device: str, platform) -> None:
    """`engine.sleep` with vLLM needs vLLM's sleep mode (CUDA and ROCm builds) and the trainer's GPU among the
    engine's, where the memory it frees goes to the trainer."""
    if not platform.is_sleep_mode_available():
        raise ConfigError(
            "engine.sleep",
            f"vLLM's sleep mode needs a CUDA or ROCm GPU; this vLLM runs on {platform.device_type or 'the CPU'}. "
            "Set engine.sleep=false (or leave it empty)",
        )
    if not sleep_frees_trainer_gpu(cfg, trainer_device):
        raise ConfigError(
            "engine.sleep",
            f"vLLM on GPUs {cfg.gpu_indices()} frees none of the trainer's memory ({trainer_device}) by sleeping; "
            "set engine.sleep=false, or engine.device to the trainer's GPU",
        )


class VLLMEngine(InferenceEngine):
    def __init__(
        self,
        model_path: str | Path,
        cfg: EngineConfig,
        seed: int = 0,
        max_model_len: int | None = None,
        trainer_device: str = "cpu",
        sleeps: bool = False,
    ):
        super().__init__()
        from vllm.platforms import current_platform

        if sleeps:
            check_sleep(cfg, trainer_device, current_platform)
        self.transfer = weight_transfer_path(cfg, trainer_device, engine_on_gpu=current_platform.is_cuda_alike())
        # ipc and nccl send from the trainer's GPU: the published weights stay there
        self.weights_device = "cpu" if self.transfer == "host" else trainer_device
        if self.transfer == "ipc":
            # IPC handles carry torch classes, which vLLM's msgpack RPC sends only with this set (pickle, between
            # this process and the engine's own)
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
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
                weight_transfer_config=WeightTransferConfig(backend=BACKENDS[self.transfer]),
                enable_sleep_mode=sleeps,
            )
        self.engine = self.llm.llm_engine
        self.published = PublishedWeights()
        self.trainer_device = trainer_device
        with self._on_trainer_gpu():
            self.sender = trainer_sender(
                self.transfer, cfg.tensor_parallel_size, EngineWorkersClient(self.llm), self.published
            )
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

    @contextlib.contextmanager
    def _on_trainer_gpu(self):
        """vLLM's senders work on the current CUDA device and stream (its NCCL communicator makes a stream of its
        own and sets it current): on the trainer's GPU, with the trainer's stream put back afterwards."""
        if self.transfer == "host":
            yield
            return
        device = torch.device(self.trainer_device)
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)):
            yield

    def sleep(self) -> None:
        """vLLM's level-2 sleep: its weights and KV cache leave the GPU, their contents forgotten (the next
        `update_weights` sends every weight)."""
        if not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def _wake(self, tags: list[str]) -> None:
        torch.cuda.empty_cache()  # the trainer's cached blocks back to the driver, where vLLM allocates from
        self.llm.wake_up(tags=tags)

    def update_weights(self, weights: Weights, version: int) -> None:
        """Send the new weights; an engine asleep takes back its weights' memory first and its KV cache after, so
        the two never coexist with the update's own buffers."""
        if self.asleep:
            self._wake(["weights"])
        self.published.publish(weights)
        try:
            with self._on_trainer_gpu():
                if self.transfer != "host":
                    if self.transfer == "ipc":  # one ipc buffer must hold any one weight
                        self.sender.packed_buffer_size_bytes = ipc_buffer_bytes(self.published.largest_bytes())
                    # the optimizer's writes to the weights finish before vLLM's senders gather them on streams of
                    # their own (nccl's packing runs the gathers on its side streams)
                    torch.cuda.current_stream().synchronize()
                self.sender.send_weights()
        finally:
            self.published.publish([])  # nothing of this version held past its transfer
            if self.asleep:  # awake whatever happened: vLLM's scheduler stays paused until every tag is back
                self._wake(["kv_cache"])
                self.asleep = False
        self.llm.reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        # Free the engine core (its process, when multiprocessing) and its KV cache now: a test or a grid may
        # build the next engine in this process.
        self.sender.shutdown()
        core = getattr(self.engine, "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = self.engine = self.sender = None
        gc.collect()
