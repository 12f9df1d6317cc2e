"""Where a run's memory goes: the resident parts it can name (trainer weights, gradients, optimizer state,
the engine's copy, the old-logit source's state) and the process's peak resident size over each step, whose
difference is the step's transient memory (activations, logits, copies in flight).

The peak is Linux's VmHWM, reset at each step's start by writing 5 to /proc/self/clear_refs, so each step
reports its own peak rather than the run's. Elsewhere (no /proc) the peak metrics are left out.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from twofold import metrics as M
from twofold.distributed import local_tensor

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def tensor_bytes(tensors) -> int:
    """Bytes this process holds for `tensors` (a sharded one counts its local shard)."""
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def parameter_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(model.parameters())


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients a step holds: one per parameter that trains, in the parameter's dtype."""
    return tensor_bytes(p for p in model.parameters() if p.requires_grad)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: two moments per trained parameter, and step counts)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())


def _status_bytes(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    return None


def reset_peak() -> bool:
    """Start a new peak resident size (VmHWM) from the current one; False where the kernel has no such reset."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def memory_metrics(
    trainer_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    engine_bytes: int,
    oldlogit_bytes: int,
) -> dict[str, float]:
    """The `memory/*` metrics of a step (see twofold/metrics.py), the peak since the last `reset_peak`."""
    parts = {
        M.MEMORY_TRAINER_PARAMETERS: parameter_bytes(trainer_model),
        M.MEMORY_TRAINER_GRADIENTS: gradient_bytes(trainer_model),
        M.MEMORY_OPTIMIZER_STATE: optimizer_bytes(optimizer),
        M.MEMORY_ENGINE_WEIGHTS: engine_bytes,
        M.OLDLOGIT_EXTRA_BYTES: oldlogit_bytes,
    }
    out = {k: float(v) for k, v in parts.items()}
    peak, resident = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    if peak is not None and resident is not None:
        out[M.MEMORY_RSS] = float(resident)
        out[M.MEMORY_STEP_PEAK_RSS] = float(peak)
        out[M.MEMORY_STEP_TRANSIENT] = float(max(peak - sum(parts.values()), 0))
    return out
