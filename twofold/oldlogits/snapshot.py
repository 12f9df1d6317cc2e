"""Exact old log-probs from weight snapshots keyed by version, refcounted by the trajectories that need them."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from twofold import metrics as M
from twofold.config import ConfigError
from twofold.models import (
    load_versioned_state,
    save_versioned_state,
    state_dict_bytes,
    trained_tensors,
    versioned_state,
)
from twofold.oldlogits.approximate import EWMASource
from twofold.oldlogits.base import CapturingSource, SourceContext, capture


@dataclass(frozen=True)
class SnapshotFile:
    """A snapshot written to disk (`save_versioned_state`), read back memory-mapped when a version is scored."""

    path: Path
    nbytes: int


# Each store's directory holds this file, locked (flock) while the store lives: a directory whose lock can be
# taken belongs to no live store (a killed run's, whatever its pid, host or rank count).
LOCK_FILE = ".lock"
# A directory without its lock file yet may be one another process has just made: left alone this long.
UNLOCKED_GRACE_S = 60.0


class DirectoryLock:
    """An exclusive flock on `directory`/LOCK_FILE, held from creation until `release`."""

    def __init__(self, directory: Path):
        self.file = open(directory / LOCK_FILE, "w")  # noqa: SIM115 (held for the store's life)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live store: the file is not ours to keep open
            self.file.close()
            raise

    def release(self) -> None:
        self.file.close()  # closing drops the flock


def _remove_abandoned_directories(root: Path) -> None:
    """Remove the store directories under `root` that no live store holds (a killed run's)."""
    for d in root.iterdir():
        with contextlib.suppress(OSError):  # held by a live store, or removed meanwhile by another process
            if (d / LOCK_FILE).exists():
                _remove_directory(d, DirectoryLock(d))
            elif d.is_dir() and time.time() - d.stat().st_mtime > UNLOCKED_GRACE_S:
                shutil.rmtree(d, ignore_errors=True)


def _remove_directory(directory: Path, lock: DirectoryLock) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    lock.release()


class SnapshotStore:
    """Weight snapshots keyed by version, refcounted by the trajectories that still need them.

    A snapshot is freed as soon as no pending trajectory holds a token of its version and the engine
    has moved past it. `put` refuses a snapshot that would exceed the byte budget.

    With `directory`, snapshots are files in a directory of their own under it (removed with the store), not
    tensors in memory: a held version then costs disk, and resident memory only while it is scored.
    """

    def __init__(self, budget_bytes: int | None, directory: Path | None = None, rank: int = 0):
        self.budget_bytes = budget_bytes
        self.snapshots: dict[int, dict[str, torch.Tensor] | SnapshotFile] = {}
        self.refs: dict[int, set[int]] = {}
        self.peak_bytes = 0
        self.freed = 0
        self._lock = threading.Lock()  # refs: added by the rollout thread, dropped by the trainer
        self.directory = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            _remove_abandoned_directories(directory)
            self.directory = Path(tempfile.mkdtemp(prefix=f"rank{rank}-", dir=directory))
            lock = DirectoryLock(self.directory)
            self._remove_directory = weakref.finalize(self, _remove_directory, self.directory, lock)

    @property
    def bytes(self) -> int:
        """Bytes of the versions held, wherever they are kept."""
        return sum(_nbytes(s) for s in self.snapshots.values())

    @property
    def resident_bytes(self) -> int:
        """Bytes of the versions held in memory (not on disk)."""
        return sum(_nbytes(s) for s in self.snapshots.values() if not isinstance(s, SnapshotFile))

    def add_ref(self, version: int, uid: int) -> None:
        with self._lock:
            self.refs.setdefault(version, set()).add(uid)

    def drop_refs(self, uid: int, versions: set[int]) -> None:
        with self._lock:
            for v in versions:
                self.refs.get(v, set()).discard(uid)

    def referenced(self, version: int) -> bool:
        with self._lock:
            return bool(self.refs.get(version))

    def fits(self, nbytes: int) -> bool:
        return self.budget_bytes is None or self.bytes + nbytes <= self.budget_bytes

    def add(self, version: int, model: torch.nn.Module, device: torch.device) -> None:
        """Keep version `version`, `model`'s trained parameters now: in a file when the store has a directory,
        else a copy on `device`."""
        if self.directory is not None:
            path = self.directory / f"v{version}.pt"
            self.snapshots[version] = SnapshotFile(path, save_versioned_state(model, path))
        else:
            self.snapshots[version] = versioned_state(model, device)
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def state(self, version: int) -> dict[str, torch.Tensor]:
        """The tensors of held version `version` (memory-mapped from its file when on disk)."""
        held = self.snapshots[version]
        return load_versioned_state(held.path) if isinstance(held, SnapshotFile) else held

    def unneeded(self, live_version: int) -> list[int]:
        """Held versions no pending trajectory references, except the engine's live one."""
        with self._lock:
            return [v for v in self.snapshots if v < live_version and not self.refs.get(v)]

    def free(self, versions: list[int], live_version: int) -> None:
        with self._lock:
            for v in versions:
                held = self.snapshots.pop(v, None)
                if held is not None:
                    self.freed += 1
                if isinstance(held, SnapshotFile):
                    held.path.unlink(missing_ok=True)
            for v in [v for v, r in self.refs.items() if not r and v < live_version]:
                del self.refs[v]

    def gc(self, live_version: int) -> None:
        """Free snapshots no pending trajectory references, except the engine's live version."""
        self.free(self.unneeded(live_version), live_version)

    def close(self) -> None:
        """Remove the store's directory and the files in it (on disk only), and the directory above it once no
        other store's is left there."""
        self.snapshots.clear()
        if self.directory is not None:
            self._remove_directory()
            with contextlib.suppress(OSError):  # another process's or store's directory is still there
                self.directory.parent.rmdir()


def _nbytes(held: dict[str, torch.Tensor] | SnapshotFile) -> int:
    return held.nbytes if isinstance(held, SnapshotFile) else state_dict_bytes(held)


class SnapshotSource(CapturingSource):
    """Exact old log-probs from version-keyed weight snapshots, segment by segment; a version the engine has
    moved past is scored in the trajectories still in flight at the next step's start and freed (`prepare`).

    The snapshot of version v is taken right before the trainer moves past v (the engine may keep
    sampling with v until the new weights are published). When a snapshot would exceed the budget,
    `on_budget="wait"` pauses rollouts and captures that version's tokens while W_v is still resident;
    `on_budget="ewma"` leaves them to an EWMA proximal policy (counted in `snapshot/fallback_tokens`),
    whose hooks this source forwards.
    """

    name = "snapshot"

    def __init__(
        self,
        ctx: SourceContext,
        model: torch.nn.Module,
        budget_bytes: int | None,
        on_budget: str = "wait",
        fallback: EWMASource | None = None,
    ):
        super().__init__(ctx)
        self.on_budget = on_budget
        self.fallback = fallback
        # Held versions score through the trainer's own model with their tensors standing in (`scorer_with`):
        # no model of their own, and under LoRA the frozen base is the trainer's, sharded or not.
        # a snapshot is what changes between versions (the whole model, or the LoRA adapters alone), in this
        # rank's shards: the budget is per rank
        self.snapshot_bytes = sum(t.numel() * 4 for _, t in trained_tensors(model))
        if budget_bytes is not None and budget_bytes < self.snapshot_bytes:
            raise ConfigError(
                "oldlogits.snapshot_budget",
                f"{budget_bytes} bytes cannot hold one snapshot of this model ({self.snapshot_bytes} "
                f"bytes of trained parameters, float32); give at least {self.snapshot_bytes / 2**20:.1f}MiB "
                "or leave it empty for no limit",
            )
        self.store = SnapshotStore(budget_bytes, ctx.snapshot_directory, ctx.ranks.rank)
        self.budget_captures = 0
        self.fallback_tokens = 0
        self.in_flight_tokens = 0  # tokens of complete versions captured while their trajectory was in flight
        self.live_version = 0  # the version the engine samples with (the last published)

    def on_new_version(self, traj, version):
        self.store.add_ref(version, traj.uid)

    def _needed(self, version: int) -> bool:
        return self.ctx.async_mode or self.store.referenced(version)

    def needs_pause_before_update(self, version):
        return self.on_budget == "wait" and self._needed(version) and not self.store.fits(self.snapshot_bytes)

    def before_update(self, model, version, pending):
        # rank 0 holds the refs (the rollout is there): its decisions hold for every rank's shards
        needed, fits = self.ctx.ranks.broadcast((self._needed(version), self.store.fits(self.snapshot_bytes)))
        if not needed or version in self.store.snapshots:
            return
        if fits:
            self.store.add(version, model, self.ctx.snapshot_device)
            return
        if self.on_budget == "wait":  # rollouts are paused (needs_pause_before_update said so)
            self._timed(capture, self.ctx.scorer(model), self.captured, pending, version)
            self.budget_captures += 1

    def on_publish(self, model, new_version, pending):
        self.live_version = new_version
        self._free_unneeded()

    def _free_unneeded(self) -> None:
        # rank 0 holds the refs: its list holds for every rank's shards
        self.store.free(self.ctx.ranks.broadcast(self.store.unneeded(self.live_version)), self.live_version)

    def prepare(self, batch, model, version, pending):
        # Versions the engine has moved past are complete: no token of theirs is sampled any more, so their
        # tokens in the trajectories still in flight are scored now, from the snapshot, and the version need
        # not be held through the update. The store then holds one version across each update (the one
        # trained), not every version the in-flight trajectories span.
        complete = [v for v in self.store.snapshots if v < self.live_version]

        def exact():
            trajs = batch.trajectories
            for v in sorted({v for t in trajs for v in t.agent_versions()}):
                if v == version:
                    capture(self.ctx.scorer(model), self.captured, trajs, v)
                elif v in self.store.snapshots:
                    capture(self._scorer_at(model, v), self.captured, trajs, v)
            if self.fallback is not None:
                self.fallback_tokens += sum(len(self.captured.missing(t)) for t in trajs)
            for v in complete:
                self.in_flight_tokens += capture(self._scorer_at(model, v), self.captured, pending, v)

        self._timed(exact)
        # The batch's old log-probs are captured, and the in-flight tokens of complete versions: those
        # trajectories no longer need those versions, and a version nothing refers to goes now, before the
        # update adds this version's snapshot.
        for t in batch.trajectories:
            self.store.drop_refs(t.uid, t.agent_versions())
        for t in pending:
            self.store.drop_refs(t.uid, set(complete))
        self._free_unneeded()
        self.captured.retain({t.uid for t in batch.trajectories} | {t.uid for t in pending})

    def _scorer_at(self, model, version):
        return self.ctx.scorer_with(model, self.store.state(version))

    def old_logprobs(self, batch, current_logprobs, version):
        if self.fallback is None:
            return super().old_logprobs(batch, current_logprobs, version)
        exact, missing = self.captured.gather(batch)
        if not missing.any():
            return exact
        proximal = self.fallback.old_logprobs(batch, current_logprobs, version)
        return torch.where(missing, proximal, exact)

    def after_optimizer_step(self, model):
        if self.fallback is not None:
            self.fallback.after_optimizer_step(model)

    def after_step(self, model, metrics):
        if self.fallback is not None:
            self.fallback.after_step(model, metrics)

    def release(self, trajectories):
        super().release(trajectories)
        for t in trajectories:
            self.store.drop_refs(t.uid, t.agent_versions())

    def close(self):
        self.store.close()

    def extra_bytes(self):
        fb = self.fallback.extra_bytes() if self.fallback is not None else 0
        return self.store.resident_bytes + fb

    def metrics(self):
        out = {
            M.SNAPSHOT_VERSIONS_HELD: float(len(self.store.snapshots)),
            M.SNAPSHOT_BYTES: float(self.store.bytes),
            M.SNAPSHOT_PEAK_BYTES: float(self.store.peak_bytes),
            M.SNAPSHOT_FREED: float(self.store.freed),
            M.SNAPSHOT_BUDGET_CAPTURES: float(self.budget_captures),
            M.SNAPSHOT_VERSION_BYTES: float(self.snapshot_bytes),  # one version, this rank's shards
            M.SNAPSHOT_FALLBACK_TOKENS: float(self.fallback_tokens),
            M.SNAPSHOT_IN_FLIGHT_TOKENS: float(self.in_flight_tokens),
        }
        if self.fallback is not None:
            out.update(self.fallback.metrics())
        return out

    def state_dict(self):
        # Snapshots are not saved: a resumed run regenerates every in-flight group, so nothing refers to an
        # older version after a resume (docs/reliability.md).
        return {"fallback": self.fallback.state_dict()} if self.fallback is not None else {}

    def load_state_dict(self, state):
        if self.fallback is not None and state.get("fallback"):
            self.fallback.load_state_dict(state["fallback"])
