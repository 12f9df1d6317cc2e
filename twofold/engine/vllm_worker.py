"""Code that runs inside vLLM's worker processes: mixed into each worker by vLLM (`worker_extension_cls`)
and called by name over `collective_rpc`, so weight updates work with the engine core in a process of its
own (vLLM's default), with CUDA graphs, as verl and TRL drive vLLM. Kept apart from `vllm.py` because
vLLM imports it by qualified name in every worker."""

from __future__ import annotations

import torch


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


class TwofoldWorkerExtension:
    """Methods vLLM adds to its worker class (names prefixed: they must not clash with the worker's own)."""

    def twofold_load_weights(self, weights: list) -> None:
        """Load `pack`ed weights (Hugging Face names) in place: vLLM's own `reload_weights` maps them onto
        fused layers and redoes the post-load processing (kernel packing, quantisation)."""
        self.reload_weights(weights_iterator=(unpack(*w) for w in weights), is_checkpoint_format=True)
        repack_tied_head(self.model_runner.get_model())
