"""Checkpoints: what a run saves, and the file format (one file per step, atomic, the last K kept).

A checkpoint holds the trainer (model, optimizer, version, minibatch RNG), the old-logit source's state
(EWMA, snapshots), admission counters, the engine/torch/python RNG states and the step. In-flight
trajectories are not saved: a resumed run regenerates from the first group not yet trained. Loading
uses `weights_only=True`: a checkpoint holds tensors and plain containers only, so a run directory
from elsewhere cannot run code when resumed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from twofold.models import full_weights
from twofold.pipeline.rundir import atomic_write_bytes

if TYPE_CHECKING:
    from twofold.pipeline.loop import Pipeline


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.pt"
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def pipeline_state(pipe: Pipeline) -> dict:
    return {
        "step": pipe.step,
        "trainer": pipe.trainer.state_dict(),
        "source": pipe.source.state_dict(),
        "admission": pipe.admission.state_dict(),
        "engine_rng": pipe.engine.generator.get_state() if hasattr(pipe.engine, "generator") else None,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }


def restore_pipeline(pipe: Pipeline, state: dict) -> None:
    """Trainer, admission, engine weights and RNGs from `state` (the source is built from it later)."""
    pipe.step = state["step"]
    pipe.trainer.load_state_dict(state["trainer"])
    # checkpoints written before admission had its own state kept its counters at the top level
    pipe.admission.load_state_dict(state.get("admission") or state)
    pipe.admission.publish(pipe.trainer.version)
    if state["engine_rng"] is not None:
        pipe.engine.generator.set_state(state["engine_rng"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    pipe.engine.update_weights(full_weights(pipe.trainer.model), pipe.trainer.version)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)
