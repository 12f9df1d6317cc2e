"""Code that runs inside vLLM's worker processes: mixed into each worker by vLLM (`worker_extension_cls`)
and called by name over `collective_rpc`, so weight updates work with the engine core in a process of its
own (vLLM's default), with CUDA graphs, as verl and TRL drive vLLM. Kept apart from `vllm.py` because
vLLM imports it by qualified name in every worker."""

from __future__ import annotations


def repack_tied_head(model) -> None:
    """A tied LM head gets its weights through the embedding, so the reload skips its post-load step;
    on CPU that step packs the GEMM weights, and the head would keep computing with the old ones."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


class TwofoldWorkerExtension:
    """Methods vLLM adds to its worker class (names prefixed: they must not clash with the worker's own)."""

    def twofold_load_weights(self, weights: list) -> None:
        """Load (name, tensor) pairs in Hugging Face names, in place: vLLM's own `reload_weights` maps them
        onto fused layers and redoes the post-load processing (kernel packing, quantisation)."""
        self.reload_weights(weights_iterator=((name, tensor) for name, tensor in weights), is_checkpoint_format=True)
        repack_tied_head(self.model_runner.get_model())
