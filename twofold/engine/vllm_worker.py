"""Code that runs inside vLLM's worker processes, imported there by qualified name (`worker_extension_cls`):
the host-bytes weight transfer engine (`twofold_host`), registered with vLLM's weight-transfer registry on
import so that every worker can build it. Kept apart from `vllm.py` (the trainer's side) because vLLM imports
it in every worker."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

HOST_BACKEND = "twofold_host"


def repack_tied_head(model) -> None:
    """A tied LM head gets its weights through the embedding, so the reload skips its post-load step;
    on CPU that step packs the GEMM weights, and the head would keep computing with the old ones."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def pack(name: str, tensor: torch.Tensor) -> tuple[str, str, list[int], bytes]:
    """A tensor as plain msgpack-able values: vLLM's RPC rebuilds tensors only where its own messages
    declare them, so a weight list travels as (name, dtype, shape, raw bytes)."""
    t = tensor.detach().cpu().contiguous()
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()


def unpack(name: str, dtype: str, shape: list[int], data: bytes) -> tuple[str, torch.Tensor]:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return name, raw.view(getattr(torch, dtype)).reshape(shape)


@dataclass
class HostInitInfo(WeightTransferInitInfo):
    """Nothing to agree on: the weights ride the control-plane RPC itself."""


@dataclass
class HostUpdateInfo(WeightTransferUpdateInfo):
    weights: list  # `pack`ed (name, dtype, shape, bytes), Hugging Face names


class HostWeightTransferEngine(WeightTransferEngine[HostInitInfo, HostUpdateInfo]):
    """vLLM's weight-update protocol (start, update, finish) with the weights as host bytes in the update
    message: the path for vLLM's CPU build and for a trainer on the CPU. Loads the way vLLM's CUDA-IPC and
    NCCL engines do (layerwise reload: checkpoint names onto fused layers, then the post-load processing)."""

    init_info_cls = HostInitInfo
    update_info_cls = HostUpdateInfo

    def init_transfer_engine(self, init_info: HostInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        # the base class synchronises the accelerator after a receive, which fails where there is none; the
        # tensors here are already whole on the host
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: HostUpdateInfo) -> None:
        self.model.load_weights(unpack(*w) for w in update_info.weights)

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)
        repack_tied_head(self.model)

    def shutdown(self) -> None:
        pass


class TwofoldWorkerExtension:
    """Mixed into vLLM's worker class; naming it in `worker_extension_cls` is what makes every worker
    import this module, and so register `twofold_host`, before it loads its model."""


with contextlib.suppress(ValueError):  # registered already: this module imported twice in one process
    WeightTransferEngineFactory.register_engine(HOST_BACKEND, HostWeightTransferEngine)
