"""Exact old log-probs from a dedicated worker: a model copy that follows the engine's versions."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch

from twofold import metrics as M
from twofold.distributed import Ranks
from twofold.models import gathered_state, load_parameters, model_bytes
from twofold.oldlogits.base import CapturingSource, SourceContext, capture
from twofold.rollout.trajectory import Trajectory

_STOP = object()


class LogprobWorker(Protocol):
    """The dedicated worker's model copy: a scorer that can load a version's weights."""

    def __call__(self, prefixes: list[list[int]]) -> list[torch.Tensor]: ...

    def load(self, state: dict[str, torch.Tensor], version: int) -> None: ...

    def nbytes(self) -> int: ...

    def close(self) -> None: ...


class LocalLogprobWorker:
    """A `LogprobWorker` on a model in this process (the embedded dedicated source, or inside the Ray actor)."""

    def __init__(self, model: torch.nn.Module, ctx: SourceContext, sharing_with: torch.nn.Module | None = None):
        self.model = model
        self.sharing_with = sharing_with  # the trainer's policy, whose frozen base the copy may share
        # a whole model in one process: it scores alone, never in the trainer ranks' collectives
        self.score = dataclasses.replace(ctx, ranks=Ranks()).scorer(model)

    def __call__(self, prefixes):
        return self.score(prefixes)

    def load(self, state, version):
        load_parameters(self.model, state)

    def nbytes(self):
        return model_bytes(self.model, self.sharing_with)

    def close(self):
        pass


class DedicatedSource(CapturingSource):
    """A separate model copy that follows the engine's versions, fed by a thread of its own.

    Events arrive in order: segments of version v, then the weights of v+1. A segment of v is closed
    either by its trajectory's end (while the engine is still at v) or by the publish of v+1, whichever
    comes first, and is sent once. The worker scores each segment with W_v before loading W_{v+1},
    overlapped with training; `prepare` only waits for the batch's last segments. The model copy is a
    `LogprobWorker`: in this process (embedded) or in a Ray actor of its own. In this process under LoRA the
    copy shares the trainer's frozen base and holds its own adapters (versions load adapters only).

    With a sharded trainer the worker is a group of its own with one rank: a whole (unsharded) model copy
    next to rank 0, where the rollout is. Every rank takes part in gathering each version's weights for it,
    and at `prepare` rank 0 hands the batch's captured values to the others.
    """

    name = "dedicated"

    def __init__(
        self,
        ctx: SourceContext,
        model: torch.nn.Module,
        version: int = 0,
        worker: Callable[[dict[str, torch.Tensor], SourceContext], LogprobWorker] | None = None,
    ):
        super().__init__(ctx)
        self.main = ctx.ranks.is_main
        state = gathered_state(model, keep=self.main)  # every rank takes part; rank 0 keeps the weights
        self.worker = None
        if self.main:
            self.worker = (
                worker(state, ctx) if worker else LocalLogprobWorker(ctx.whole_copy_of(model, state), ctx, model)
            )
        self.worker_bytes = self.worker.nbytes() if self.worker is not None else 0  # fixed: asked once
        self.version = version  # the worker thread's: the weights its model copy holds
        self.published = version  # the engine's: segments of this version are still open
        self.sent: dict[int, set[int]] = {}  # uid -> versions whose segment is queued; gone once released
        self._sent_lock = threading.Lock()  # rollout thread (trajectory end) vs trainer (release)
        self.events: queue.Queue = queue.Queue()
        self.done = threading.Condition()
        self.wait_seconds = 0.0
        self.segments = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="old-logit-worker", daemon=True)
        if self.main:
            self._thread.start()

    def _send(self, traj: Trajectory, version: int) -> None:
        with self._sent_lock:
            versions = self.sent.setdefault(traj.uid, set())
            if version in versions:
                return
            versions.add(version)
        self.events.put(("segment", traj, version))

    def on_trajectory_end(self, traj):
        # Only the open segment: one whose version was already replaced was closed (sent) by that publish,
        # and the worker has moved past its weights.
        if self.published in traj.agent_versions():
            self._send(traj, self.published)

    def on_publish(self, model, new_version, pending):
        # The rollout is parked here, so no trajectory ends (and sends) concurrently.
        for t in pending if self.main else ():
            if self.published in t.agent_versions():
                self._send(t, self.published)
        state = gathered_state(model, keep=self.main)  # whole tensors for the unsharded copy (every rank gathers)
        if self.main:
            self.events.put(("weights", new_version, state))
        self.published = new_version

    def _run(self):
        try:
            while True:
                item = self.events.get()
                segments = []
                while isinstance(item, tuple) and item[0] == "segment":  # batch consecutive segments
                    segments.append(item)
                    try:
                        item = self.events.get_nowait()
                    except queue.Empty:
                        item = None
                if segments:
                    stray = [v for _, _, v in segments if v != self.version]
                    if stray:
                        raise RuntimeError(
                            f"a segment of version {stray[0]} reached the worker at version "
                            f"{self.version} (event order broken)"
                        )
                    trajs = [t for _, t, _ in segments]
                    self._timed(capture, self.worker, self.captured, trajs, self.version)
                    self.segments += len(segments)
                    with self._sent_lock:  # released (dropped) while queued: nobody will read them
                        self.captured.forget([t for t in trajs if t.uid not in self.sent])
                if item is _STOP:
                    return
                if item is not None:  # ("weights", version, state)
                    self.worker.load(item[2], item[1])
                    self.version = item[1]
                with self.done:
                    self.done.notify_all()
        except BaseException as exc:
            self.error = exc
            with self.done:
                self.done.notify_all()

    def prepare(self, batch, model, version, pending):
        t0 = time.perf_counter()
        if self.main:
            with self.done:
                while any(len(self.captured.missing(t)) for t in batch.trajectories):
                    if self.error is not None:
                        raise RuntimeError("the old-logit worker failed") from self.error
                    self.done.wait(0.05)
        if self.ctx.ranks.sharded:  # the other ranks' stores get rank 0's values for this batch
            values = self.ctx.ranks.broadcast(self.captured.export(batch.trajectories) if self.main else None)
            if not self.main:
                self.captured.load(values)
        self.wait_seconds += time.perf_counter() - t0

    def release(self, trajectories):
        super().release(trajectories)
        with self._sent_lock:
            for t in trajectories:
                self.sent.pop(t.uid, None)

    def extra_bytes(self):
        return self.worker_bytes

    def metrics(self):
        return {
            M.DEDICATED_LAG_VERSIONS: float(self.events.qsize()),
            M.DEDICATED_WAIT_SECONDS: self.wait_seconds,
            M.DEDICATED_SEGMENTS: float(self.segments),
        }

    def close(self):
        if not self.main:
            return
        self.events.put(_STOP)
        # Joined, not left to die with the interpreter: a thread inside a torch kernel at exit aborts
        # the process ("terminate called without an active exception").
        self._thread.join(timeout=60)
        self.worker.close()
