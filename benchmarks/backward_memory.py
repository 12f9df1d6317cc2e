"""How much a SmolLM2 forward and backward really needs, against what the process's resident size grows by:
one minibatch of the issue-34 probe's shape (16 rows of 104 tokens, loss on the last 48), gradient checkpointing
on, log-probs in chunks of `--chunk` positions, run twice (the first run also pages the weights in).

    python benchmarks/backward_memory.py                                   # glibc's defaults
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/backward_memory.py    # every block of 1 MiB or more mapped

Prints, per run, the resident size at the start, after the forward, and the peak (VmHWM, reset at the start),
and the bytes the autograd graph saved (non-parameter tensors, counted once per storage). What the resident size
grows by beyond the saved tensors and the gradients is memory the pass freed and malloc kept.
"""

from __future__ import annotations

import argparse
import functools

import torch

from twofold.config import ModelConfig
from twofold.logprobs import token_logprobs
from twofold.modelpath import resolve_model_source
from twofold.models import load_policy
from twofold.pipeline.os_memory import peak_resident_bytes, reset_peak, resident_bytes, trim_heap

GIB = 2**30


def _count_saved(saved: dict[int, int], parameters: set[int], t: torch.Tensor) -> torch.Tensor:
    """A pack hook that records each saved non-parameter storage's bytes and keeps the tensor as it is."""
    storage = t.untyped_storage()
    if storage.data_ptr() not in parameters:
        saved[storage.data_ptr()] = storage.nbytes()
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=512, help="trainer.logprob_chunk_size")
    args = parser.parse_args()
    folder = resolve_model_source("smollm2-135m-instruct", None)
    model = load_policy(folder, ModelConfig(path=str(folder)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (16, 104), generator=torch.Generator().manual_seed(0))
    attention, wanted = torch.ones_like(ids), torch.zeros_like(ids)
    wanted[:, 56:] = 1
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for run in (1, 2):
        model.zero_grad(set_to_none=True)
        trim_heap()
        saved: dict[int, int] = {}
        pack = functools.partial(_count_saved, saved, parameters)
        reset_peak()
        start = resident_bytes()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logprobs = token_logprobs(model, ids, attention, 1.0, args.chunk, wanted)
        after_forward = resident_bytes()
        logprobs.sum().backward()
        peak = peak_resident_bytes()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        print(
            f"run {run}: start {start / GIB:.2f} GiB, after the forward +{(after_forward - start) / GIB:.2f}, "
            f"peak +{(peak - start) / GIB:.2f} (saved tensors {sum(saved.values()) / GIB:.2f}, "
            f"gradients {grads / GIB:.2f})"
        )


if __name__ == "__main__":
    main()
