"""Checkpoints: what a run saves, and the format (one folder per step, written by every rank, atomic, checked).

    checkpoints/step_000012/
        __0_0.distcp ...   tensors, through torch.distributed.checkpoint (DCP): each rank writes its shards
        .metadata          DCP's index of them
        run_state.json     everything that is not a tensor (step, version, counters, Python RNG, ...)
        manifest.json      size and SHA-256 of every file above, written last

A checkpoint holds the trainer's model and optimizer state (sharded across ranks when the trainer is),
the old-logit source's state (the EWMA average; snapshots are not saved: after a resume nothing refers to
an older version), admission counters and every RNG. In-flight trajectories are not saved: a resumed run
regenerates from the first group not yet trained.

Atomic: the folder is written as `step_N.tmp` and renamed when every rank has finished and the manifest is
written, so a half-written step is never loaded. Checked: resuming verifies the newest folder against its
manifest and falls back to the previous one (with a warning) when it is truncated or corrupt. Safe: tensors
load with `weights_only=True` and DCP's metadata file with an unpickler that admits only DCP's own
metadata classes, so a run directory from elsewhere cannot run code. DCP reshards on load: a run saved
with N ranks resumes on M. Checkpoints of earlier versions (`step_N.pt`, one file) still load.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from twofold.models import full_weights
from twofold.pipeline.rundir import atomic_write_bytes

if TYPE_CHECKING:
    from twofold.pipeline.loop import Pipeline

log = logging.getLogger(__name__)
MANIFEST, RUN_STATE = "manifest.json", "run_state.json"
# One process has no process group, and DCP says so on every save and load: expected here, not news.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# --------------------------------------------------------------------------- safe loading


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: admit DCP's own dataclasses, torch sizes, dtypes and layouts, and the
    plain containers they are built from; anything else (a function, a class of any other module) is an error."""

    ALLOWED_PREFIXES = ("torch.distributed.checkpoint.",)
    ALLOWED = {
        ("torch", "Size"),
        ("torch", "strided"),
        ("torch", "contiguous_format"),
        ("torch", "preserve_format"),
        ("torch.serialization", "_get_layout"),  # a layout by its name: how torch pickles layouts
        ("pathlib", "PosixPath"),  # the checkpoint id DCP records
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
    }

    def find_class(self, module: str, name: str):
        dtype = getattr(torch, name, None) if module == "torch" else None
        if module.startswith(self.ALLOWED_PREFIXES) or (module, name) in self.ALLOWED or isinstance(dtype, torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}: not a checkpoint class, refused")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# --------------------------------------------------------------------------- tensors apart from plain values


def split_tensors(tree, prefix: str = "") -> tuple[dict[str, torch.Tensor], object]:
    """(tensors by dotted path, the same tree with each tensor replaced by its path) for nested dicts/lists."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    return tensors, walk(tree, prefix)


def join_tensors(plain, tensors: dict[str, torch.Tensor]):
    if isinstance(plain, dict):
        if set(plain) == {"__tensor__"}:
            return tensors[plain["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in plain.items()}
    if isinstance(plain, list):
        return [join_tensors(v, tensors) for v in plain]
    return plain


# --------------------------------------------------------------------------- save


def _run_state(pipe: Pipeline) -> dict:
    return {
        "step": pipe.step,
        "version": pipe.trainer.version,
        "skipped_steps": pipe.trainer.skipped_steps,
        "admission": pipe.admission.state_dict(),
        "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "world_size": pipe.ranks.world_size,
    }


def _tensor_state(pipe: Pipeline) -> dict:
    t = pipe.trainer
    state = {
        "model": get_model_state_dict(t.model),
        "optim": get_optimizer_state_dict(t.model, t.optimizer)["state"],
        "rng": {"torch": torch.get_rng_state(), "minibatch": t.generator.get_state()},
    }
    if pipe.engine is not None and hasattr(pipe.engine, "generator"):
        state["rng"]["engine"] = pipe.engine.generator.get_state().cpu()
    return state


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(pipe: Pipeline) -> Path:
    """Write `checkpoints/step_N/` (a collective: every rank calls it) and keep the last `run.keep_checkpoints`."""
    ranks, folder = pipe.ranks, pipe.run_dir / "checkpoints"
    final = folder / f"step_{pipe.step:06d}"
    tmp = folder / f"step_{pipe.step:06d}.tmp"
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    source_tensors, source_plain = split_tensors(pipe.source.state_dict())
    dcp.save({**_tensor_state(pipe), "source": source_tensors}, checkpoint_id=str(tmp), no_dist=not ranks.sharded)
    ranks.barrier()
    if ranks.is_main:
        run_state = {**_run_state(pipe), "source": source_plain}
        atomic_write_bytes(tmp / RUN_STATE, lambda f: f.write(json.dumps(run_state).encode()))
        files = {p.name: [p.stat().st_size, _digest(p)] for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
        atomic_write_bytes(tmp / MANIFEST, lambda f: f.write(json.dumps(files, indent=1).encode()))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(pipe.run_dir)[: -pipe.cfg.run.keep_checkpoints]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    ranks.barrier()
    return final


# --------------------------------------------------------------------------- find and load


def checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first: `step_N/` folders (and `step_N.pt` files of earlier versions)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.name.startswith("step_") and not p.name.endswith(".tmp") and (p.is_dir() or p.suffix == ".pt")
    ]
    return sorted(found, key=lambda p: p.name)


def verify(path: Path) -> str | None:
    """None when the checkpoint is whole, else why not."""
    if path.suffix == ".pt":
        return None  # an earlier version's single file: torch.load checks it
    try:
        files = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {MANIFEST} ({e})"
    for name, (size, digest) in files.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} is {p.stat().st_size} bytes, the manifest says {size}"
        if _digest(p) != digest:
            return f"{name} does not match its checksum"
    try:  # the metadata must read under the restricted unpickler: refused means not ours, not loaded
        _MetadataUnpickler(io.BytesIO((path / ".metadata").read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        return f"its metadata is refused ({e})"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint; a newer one that is truncated or corrupt is skipped with a warning."""
    for path in reversed(checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s); falling back to the one before it", path, problem)
    return None


def restore_pipeline(pipe: Pipeline, path: Path) -> object:
    """Restore trainer, admission, engine weights and RNGs from `path` (a collective when sharded); returns
    the source's saved state, loaded once the source is built (`restore_source`)."""
    if path.suffix == ".pt":
        return _restore_legacy(pipe, path)
    run_state = json.loads((path / RUN_STATE).read_text())
    t = pipe.trainer
    state = {
        "model": get_model_state_dict(t.model),
        "optim": get_optimizer_state_dict(t.model, t.optimizer)["state"],
        "rng": {"torch": torch.get_rng_state(), "minibatch": t.generator.get_state()},
    }
    dcp.load(
        state, checkpoint_id=str(path), storage_reader=SafeFileSystemReader(str(path)), no_dist=not pipe.ranks.sharded
    )
    set_model_state_dict(t.model, state["model"])
    groups = get_optimizer_state_dict(t.model, t.optimizer)["param_groups"]
    set_optimizer_state_dict(t.model, t.optimizer, {"state": state["optim"], "param_groups": groups})
    torch.set_rng_state(state["rng"]["torch"])
    t.generator.set_state(state["rng"]["minibatch"])
    t.version, t.skipped_steps = run_state["version"], run_state["skipped_steps"]
    pipe.step = run_state["step"]
    pipe.admission.load_state_dict(run_state["admission"])
    pipe.admission.publish(t.version)
    version, internal, gauss = run_state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    if pipe.engine is not None and hasattr(pipe.engine, "generator"):
        engine_rng = {"engine": pipe.engine.generator.get_state().cpu()}
        dcp.load(
            {"rng": engine_rng},
            checkpoint_id=str(path),
            storage_reader=SafeFileSystemReader(str(path)),
            planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
            no_dist=True,
        )
        pipe.engine.generator.set_state(engine_rng["engine"].to(pipe.engine.generator.device))
    _publish_restored(pipe)
    return (path, run_state["source"])


def restore_source(pipe: Pipeline, saved) -> None:
    """Load the source's saved state (after `restore_pipeline`, once the source exists)."""
    if isinstance(saved, dict):  # an earlier version's single file
        pipe.source.load_state_dict(saved)
        return
    path, plain = saved
    targets, _ = split_tensors(pipe.source.state_dict())
    if targets:
        dcp.load(
            {"source": targets},
            checkpoint_id=str(path),
            storage_reader=SafeFileSystemReader(str(path)),
            planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
            no_dist=not pipe.ranks.sharded,
        )
    pipe.source.load_state_dict(join_tensors(plain, targets))


def _publish_restored(pipe: Pipeline) -> None:
    weights = full_weights(pipe.trainer.model, keep=pipe.ranks.is_main)
    if pipe.engine is not None:
        pipe.engine.update_weights(weights, pipe.trainer.version)


def _restore_legacy(pipe: Pipeline, path: Path) -> dict:
    """A `step_N.pt` file of an earlier twofold version (one process)."""
    state = torch.load(path, weights_only=True)
    pipe.step = state["step"]
    pipe.trainer.load_state_dict(state["trainer"])
    pipe.admission.load_state_dict(state.get("admission") or state)
    pipe.admission.publish(pipe.trainer.version)
    if state["engine_rng"] is not None:
        pipe.engine.generator.set_state(state["engine_rng"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    _publish_restored(pipe)
    return state["source"]
