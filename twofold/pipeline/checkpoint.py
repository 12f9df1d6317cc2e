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
metadata classes; metadata that lists pickled bytes (which DCP loads with `weights_only=False`, and twofold
never saves) is refused, so a run directory from elsewhere cannot run code. DCP reshards on load: a run saved
with N ranks resumes on M.

The pipeline hands over the parts a checkpoint holds (`RunParts`); this module knows nothing else of it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from twofold.distributed import Ranks
from twofold.engine.base import InferenceEngine
from twofold.models import file_sha256
from twofold.oldlogits import OldLogitSource
from twofold.pipeline.rundir import atomic_write_bytes
from twofold.rollout.versions import Admission
from twofold.trainer.trainer import Trainer

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


def _checked_metadata(data: bytes) -> Metadata:
    """DCP's `.metadata`, refused (`pickle.UnpicklingError`) when it names a class that is not DCP's, or lists an
    entry saved as pickled bytes: DCP loads those with `torch.load(weights_only=False)`, which runs whatever the
    pickle says. Everything twofold saves through DCP is a tensor (the rest is JSON in run_state.json)."""
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"checkpoint metadata is a {type(metadata).__name__}, not DCP's Metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            raise pickle.UnpicklingError(f"checkpoint metadata lists {key} as pickled bytes: not twofold's, refused")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _checked_metadata(f.read())
        if metadata.storage_meta is None:
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


# --------------------------------------------------------------------------- what is saved


@dataclass
class RunParts:
    """The parts of a run that a checkpoint saves and restores, as the pipeline hands them over."""

    run_dir: Path
    trainer: Trainer
    admission: Admission
    ranks: Ranks
    engine: InferenceEngine | None  # rank 0's; its sampling RNG is saved when it has one
    keep_checkpoints: int


def _run_state(parts: RunParts, step: int) -> dict:
    python_rng = random.getstate()
    return {
        "step": step,
        "version": parts.trainer.version,
        "skipped_steps": parts.trainer.skipped_steps,
        "admission": parts.admission.state_dict(),
        "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
        "world_size": parts.ranks.world_size,
    }


def _device_rngs(parts: RunParts) -> dict[str, torch.Tensor]:
    """The RNG states a run has only on some machines, as CPU ByteTensors (all a CUDA generator's `set_state`
    takes): the engine's sampling generator, and the default generator of the trainer's GPU (dropout, anything
    sampled on the device)."""
    rngs = {}
    generator = getattr(parts.engine, "generator", None)
    if generator is not None:
        rngs["engine"] = generator.get_state().cpu()
    device = parts.trainer.numerics.device
    if device.type == "cuda":
        rngs["cuda"] = torch.cuda.get_rng_state(device)
    return rngs


def _set_device_rngs(parts: RunParts, rngs: dict[str, torch.Tensor]) -> None:
    if "engine" in rngs:
        parts.engine.generator.set_state(rngs["engine"])
    if "cuda" in rngs:
        torch.cuda.set_rng_state(rngs["cuda"], parts.trainer.numerics.device)


def _tensor_state(trainer: Trainer) -> dict:
    """The trainer's tensors as DCP saves and loads them (this rank's shards when sharded)."""
    return {
        "model": get_model_state_dict(trainer.model),
        "optim": get_optimizer_state_dict(trainer.model, trainer.optimizer)["state"],
        "rng": {"torch": torch.get_rng_state(), "minibatch": trainer.generator.get_state()},
    }


def save_checkpoint(parts: RunParts, step: int, source: OldLogitSource) -> Path:
    """Write `checkpoints/step_N/` (a collective: every rank calls it) and keep the last `keep_checkpoints`."""
    ranks, folder = parts.ranks, parts.run_dir / "checkpoints"
    final = folder / f"step_{step:06d}"
    tmp = folder / f"step_{step:06d}.tmp"
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    tensors = _tensor_state(parts.trainer)
    tensors["rng"].update(_device_rngs(parts))
    source_tensors, source_plain = split_tensors(source.state_dict())
    dcp.save({**tensors, "source": source_tensors}, checkpoint_id=str(tmp), no_dist=not ranks.sharded)
    ranks.barrier()
    if ranks.is_main:
        run_state = {**_run_state(parts, step), "source": source_plain}
        atomic_write_bytes(tmp / RUN_STATE, lambda f: f.write(json.dumps(run_state).encode()))
        files = {p.name: [p.stat().st_size, file_sha256(p)] for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
        atomic_write_bytes(tmp / MANIFEST, lambda f: f.write(json.dumps(files, indent=1).encode()))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(parts.run_dir)[: -parts.keep_checkpoints]:
            shutil.rmtree(old)
    ranks.barrier()
    return final


# --------------------------------------------------------------------------- find and load


def checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first: `step_N/` folders."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith("step_") and not p.name.endswith(".tmp") and p.is_dir()]
    return sorted(found, key=lambda p: p.name)


def verify(path: Path) -> str | None:
    """None when the checkpoint is whole, else why not."""
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
        if file_sha256(p) != digest:
            return f"{name} does not match its checksum"
    try:  # refused metadata means not ours: not loaded
        _checked_metadata((path / ".metadata").read_bytes())
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


def _load(path: Path, state: dict, ranks: Ranks, partial: bool = False) -> None:
    """Fill `state`'s tensors in place from the checkpoint at `path` (a collective when `ranks` are sharded)."""
    dcp.load(
        state,
        checkpoint_id=str(path),
        storage_reader=SafeFileSystemReader(str(path)),
        planner=dcp.DefaultLoadPlanner(allow_partial_load=True) if partial else None,
        no_dist=not ranks.sharded,
    )


@dataclass
class Restored:
    step: int
    source_state: tuple[Path, object]  # for `restore_source`, once the source is built


def restore_run(parts: RunParts, path: Path) -> Restored:
    """Restore the trainer, admission counters and every RNG from `path` (a collective when sharded). The
    engine's weights are the caller's to publish: the trainer now holds them."""
    run_state = json.loads((path / RUN_STATE).read_text())
    t = parts.trainer
    state = _tensor_state(t)
    _load(path, state, parts.ranks)
    set_model_state_dict(t.model, state["model"])
    groups = get_optimizer_state_dict(t.model, t.optimizer)["param_groups"]
    set_optimizer_state_dict(t.model, t.optimizer, {"state": state["optim"], "param_groups": groups})
    torch.set_rng_state(state["rng"]["torch"])
    t.generator.set_state(state["rng"]["minibatch"])
    t.version, t.skipped_steps = run_state["version"], run_state["skipped_steps"]
    parts.admission.load_state_dict(run_state["admission"], steps_done=run_state["step"])
    parts.admission.publish(t.version)
    version, internal, gauss = run_state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    rngs = _device_rngs(parts)
    if rngs:  # partial: one the checkpoint lacks (saved on a CPU, say) stays as it is
        _load(path, {"rng": rngs}, Ranks(), partial=True)
        _set_device_rngs(parts, rngs)
    return Restored(step=run_state["step"], source_state=(path, run_state["source"]))


def restore_source(source: OldLogitSource, saved: tuple[Path, object], ranks: Ranks) -> None:
    """Load the source's saved state (after `restore_run`, once the source exists)."""
    path, plain = saved
    targets, _ = split_tensors(source.state_dict())
    if targets:
        _load(path, {"source": targets}, ranks, partial=True)
    source.load_state_dict(join_tensors(plain, targets))


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """The trained weights of the checkpoint at `path` into `model` (one process, whole tensors; a checkpoint
    written by several ranks is resharded on load), for export and evaluation."""
    state = {"model": get_model_state_dict(model)}
    _load(path, state, Ranks())
    set_model_state_dict(model, state["model"])


def checkpoint_at(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of `step`, or the newest whole one; a missing one is an error naming what there is."""
    if step is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"{run_dir} has no whole checkpoint (train it first, or check the path)")
        return found
    path = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    problem = verify(path) if path.is_dir() else "it does not exist"
    if problem is not None:
        kept = ", ".join(str(int(p.name.split("_")[1])) for p in checkpoints(run_dir)) or "none"
        raise FileNotFoundError(f"no usable checkpoint of step {step} in {run_dir} ({problem}); kept steps: {kept}")
    return path
