"""Where a run's memory goes: the resident parts it can name (trainer weights, gradients, optimizer state,
the engine's copy, the old-logit source's state) and the process's peak resident size over each step, whose
difference is the step's transient memory (activations, logits, copies in flight).

The peak is Linux's VmHWM, reset at each step's start by writing 5 to /proc/self/clear_refs, so each step
reports its own peak rather than the run's. Elsewhere (no /proc) the peak metrics are left out.

What glibc's malloc keeps of what a step frees, and the settings that hand it back, are in `os_memory.py`.
"""

from __future__ import annotations

import torch

from twofold import metrics as M
from twofold.models import model_bytes, state_dict_bytes
from twofold.pipeline.os_memory import resident_and_peak_bytes


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients a step holds: one per parameter that trains, in the parameter's dtype."""
    return state_dict_bytes({n: p for n, p in model.named_parameters() if p.requires_grad})


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: two moments per trained parameter, and step counts)."""
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return state_dict_bytes(dict(enumerate(tensors)))


def memory_metrics(
    trainer_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    engine_bytes: int,
    engine_cache_bytes: int,
    oldlogit_bytes: int,
    peak_was_reset: bool,
    baseline_bytes: int | None = None,
    engine_sleeps: bool = False,
) -> dict[str, float]:
    """The `memory/*` metrics of a step (see twofold/metrics.py). The step's peak needs `reset_peak` to have
    worked at its start; its transient part is only defined when the named parts live in host memory (a
    trainer on a GPU holds its parts there, not in the process's resident size). `baseline_bytes` is the
    resident size before the run built anything (the interpreter and libraries), a named part when known. An
    engine that sleeps between steps (`engine.sleep`) holds its weights only while it generates and takes new
    ones: they are reported, but not taken from the peak, since the peak may be the train step's, without them."""
    parts = {
        M.MEMORY_TRAINER_PARAMETERS: model_bytes(trainer_model),
        M.MEMORY_TRAINER_GRADIENTS: gradient_bytes(trainer_model),
        M.MEMORY_OPTIMIZER_STATE: optimizer_bytes(optimizer),
        M.MEMORY_ENGINE_WEIGHTS: engine_bytes,
        M.MEMORY_ENGINE_PREFIX_CACHE: engine_cache_bytes,
        M.OLDLOGIT_EXTRA_BYTES: oldlogit_bytes,
    }
    if baseline_bytes is not None:
        parts[M.MEMORY_PROCESS_BASELINE] = baseline_bytes
    out = {k: float(v) for k, v in parts.items()}
    resident, peak = resident_and_peak_bytes()  # one read: the peak is never below the resident size
    if resident is not None:
        out[M.MEMORY_RSS] = float(resident)
    if peak is not None and peak_was_reset:
        out[M.MEMORY_STEP_PEAK_RSS] = float(peak)
        if next(trainer_model.parameters()).device.type == "cpu":
            held = sum(v for k, v in parts.items() if not (engine_sleeps and k == M.MEMORY_ENGINE_WEIGHTS))
            out[M.MEMORY_STEP_TRANSIENT] = float(max(peak - held, 0))
    return out
