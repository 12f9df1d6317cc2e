"""Old-logit sources. The pipeline calls the hooks below; each source uses the ones it needs.

Timeline of one train step at trainer version v (weights W_v):
    prepare(batch)            old log-probs for the batch (weights still W_v)
    before_update(pending)    right before the first optimizer step; weights still W_v
    after_optimizer_step()    after each optimizer step (EWMA update)
    on_publish(pending)       engine paused, trainer weights now W_{v+1}, before the engine gets them
    after_step(metrics)       once the step's metrics are known (EWMA auto-reset)
    release(trajectories)     trained or dropped: nothing of theirs is needed any more
Rollout-thread hooks: on_new_version(traj, v) when a trajectory gets its first token of version v,
on_trajectory_end(traj) when its episode ends.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from twofold.config import ConfigError
from twofold.loss import ParameterEWMA, staleness_beta
from twofold.models import clone_state_dict, compute_logprobs, load_parameters, model_bytes, state_dict_bytes
from twofold.rollout.trajectory import Batch, Trajectory, pad_field


@dataclass
class SourceContext:
    pad_id: int
    temperature: float
    async_mode: bool
    max_staleness: int
    batch_size: int = 16


Scorer = Callable[[list[list[int]]], list[torch.Tensor]]  # token prefixes -> per-position log-probs


def capture(model: torch.nn.Module | Scorer, trajectories: list[Trajectory], version: int | None, ctx: SourceContext) -> int:
    """Fill old log-probs of `version`'s tokens (every missing token if None) with `model`'s log-probs.

    The one computation behind every exact source: a float32 forward over each trajectory's prefix up
    to its last such token. `model` may also be a scorer (prefixes -> log-probs) that runs the forward
    elsewhere, such as the dedicated worker's Ray actor. Returns the number of tokens filled.
    """
    todo = [(t, t.missing_old(version)) for t in trajectories]
    todo = [(t, pos) for t, pos in todo if pos]
    if not todo:
        return 0
    prefixes = [t.token_ids[: pos[-1] + 1] for t, pos in todo]
    if isinstance(model, torch.nn.Module):
        logprobs = compute_logprobs(model, prefixes, pad_id=ctx.pad_id, temperature=ctx.temperature, batch_size=ctx.batch_size)
    else:
        logprobs = model(prefixes)
    for (t, pos), lp in zip(todo, logprobs):
        t.set_old(pos, lp[pos])
    return sum(len(pos) for _, pos in todo)


def current_logprobs(model: torch.nn.Module, batch: Batch, ctx: SourceContext) -> torch.Tensor:
    """[B, T] log-probs of every agent token under `model`, leaving the trajectories' recorded old
    log-probs untouched (an audit running next to this source must still see only exact values)."""
    fresh = [dataclasses.replace(t, old_logprobs=[float("nan")] * len(t.token_ids)) for t in batch.trajectories]
    capture(model, fresh, None, ctx)
    return batch_old_logprobs(Batch.from_trajectories(fresh, ctx.pad_id))


def batch_old_logprobs(batch: Batch) -> torch.Tensor:
    """The batch's old log-probs as a [B, T] tensor; raises if an agent token has none."""
    fresh = pad_field(batch.trajectories, "old_logprobs", 0.0, torch.float32)
    missing = torch.isnan(fresh) & (batch.loss_mask > 0)
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} agent tokens have no old log-prob (a source bug)")
    return torch.nan_to_num(fresh, nan=0.0)


class OldLogitSource:
    name = "base"
    exact = False

    def __init__(self, ctx: SourceContext):
        self.ctx = ctx
        self.seconds = 0.0  # time spent computing old log-probs, for the step's breakdown

    def on_new_version(self, traj: Trajectory, version: int) -> None: ...

    def on_trajectory_end(self, traj: Trajectory) -> None: ...

    def prepare(self, batch: Batch, model: torch.nn.Module, version: int) -> torch.Tensor | None:
        raise NotImplementedError

    def needs_pause_before_update(self, version: int) -> bool:
        return False

    def before_update(self, model: torch.nn.Module, version: int, pending: list[Trajectory]) -> None: ...

    def after_optimizer_step(self, model: torch.nn.Module) -> None: ...

    def on_publish(self, model: torch.nn.Module, new_version: int, pending: list[Trajectory]) -> None: ...

    def after_step(self, model: torch.nn.Module, metrics: dict) -> None: ...

    def release(self, trajectories: list[Trajectory]) -> None: ...

    def extra_bytes(self) -> int:
        """Memory held for old log-probs beyond the trainer and engine models."""
        return 0

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0


# --------------------------------------------------------------------------- approximations


class ApproximateSource(OldLogitSource):
    """behavior (mu), recompute (current weights at the step start), linear / loglinear interpolation."""

    def __init__(self, ctx: SourceContext, kind: str):
        super().__init__(ctx)
        self.name = kind
        self.interpolation = kind if kind in ("linear", "loglinear") else None

    def prepare(self, batch, model, version):
        if self.name == "behavior":
            return batch.behavior_logprobs.clone()
        if self.interpolation is not None:
            return None  # the trainer interpolates per minibatch with the live log pi_theta

        return self._timed(current_logprobs, model, batch, self.ctx)


class EWMASource(OldLogitSource):
    """Revised PPO-EWMA: pi_prox from a bias-corrected EWMA of the parameters (Hilton et al. 2021).

    beta defaults to W/(W+2) for staleness window W; the EWMA is reset to the current weights when the
    step's active-token ratio falls below tau.
    """

    name = "ewma"

    def __init__(self, ctx: SourceContext, model: torch.nn.Module, beta: float | None, tau: float, auto_reset: bool):
        super().__init__(ctx)
        self.ewma = ParameterEWMA(model, staleness_beta(ctx.max_staleness) if beta is None else beta)
        self.ewma.update(model)
        self.proximal_model = copy.deepcopy(model).float().eval()
        self.tau, self.auto_reset = tau, auto_reset
        self.last_reset = False

    def prepare(self, batch, model, version):
        def proximal():
            self.ewma.copy_to(self.proximal_model)
            ids = [t.token_ids for t in batch.trajectories]
            lps = compute_logprobs(self.proximal_model, ids, pad_id=self.ctx.pad_id,
                                   temperature=self.ctx.temperature, batch_size=self.ctx.batch_size)
            out = torch.zeros_like(batch.behavior_logprobs)
            for i, lp in enumerate(lps):
                out[i, : len(lp)] = lp
            return out * batch.loss_mask

        return self._timed(proximal)

    def after_optimizer_step(self, model):
        self.ewma.update(model)

    def after_step(self, model, metrics):
        ratio = metrics.get("ppo/active_token_ratio", 1.0)
        self.last_reset = self.auto_reset and self.ewma.maybe_reset(model, ratio, self.tau)

    def extra_bytes(self):
        return state_dict_bytes(self.ewma.params) + model_bytes(self.proximal_model)

    def metrics(self):
        return {"ewma/resets": float(self.ewma.num_resets), "ewma/reset_this_step": float(self.last_reset),
                "ewma/center_of_mass": self.ewma.center_of_mass, "ewma/beta": self.ewma.beta}

    def state_dict(self):
        return {"ewma": self.ewma.state_dict()}

    def load_state_dict(self, state):
        self.ewma.load_state_dict(state["ewma"])


# --------------------------------------------------------------------------- exact: snapshots


class SnapshotStore:
    """Weight snapshots keyed by version, refcounted by the trajectories that still need them.

    A snapshot is freed as soon as no pending trajectory holds a token of its version and the engine
    has moved past it. `put` refuses a snapshot that would exceed the byte budget.
    """

    def __init__(self, budget_bytes: int | None):
        self.budget_bytes = budget_bytes
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.refs: dict[int, set[int]] = {}
        self.peak_bytes = 0
        self.freed = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return sum(state_dict_bytes(s) for s in self.snapshots.values())

    def add_ref(self, version: int, uid: int) -> None:
        with self._lock:
            self.refs.setdefault(version, set()).add(uid)

    def drop_refs(self, uid: int, versions: set[int]) -> None:
        with self._lock:
            for v in versions:
                self.refs.get(v, set()).discard(uid)

    def referenced(self, version: int) -> bool:
        return bool(self.refs.get(version))

    def fits(self, nbytes: int) -> bool:
        return self.budget_bytes is None or self.bytes + nbytes <= self.budget_bytes

    def put(self, version: int, state: dict[str, torch.Tensor]) -> bool:
        if version in self.snapshots:
            return True
        if not self.fits(state_dict_bytes(state)):
            return False
        self.snapshots[version] = state
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return True

    def gc(self, live_version: int) -> None:
        """Free snapshots no pending trajectory references, except the engine's live version."""
        with self._lock:
            for v in [v for v in self.snapshots if v < live_version and not self.refs.get(v)]:
                del self.snapshots[v]
                self.freed += 1
            for v in [v for v, r in self.refs.items() if not r and v < live_version]:
                del self.refs[v]


class SnapshotSource(OldLogitSource):
    """Exact old log-probs from version-keyed weight snapshots, segment by segment.

    The snapshot of version v is taken right before the trainer moves past v (the engine may keep
    sampling with v until the new weights are published). When a snapshot would exceed the budget,
    `on_budget="wait"` pauses rollouts and captures that version's tokens while W_v is still resident;
    `on_budget="ewma"` leaves them to an EWMA proximal policy (counted in `snapshot/fallback_tokens`).
    """

    name = "snapshot"
    exact = True

    def __init__(self, ctx: SourceContext, model: torch.nn.Module, budget_bytes: int | None, on_budget: str = "wait",
                 fallback: EWMASource | None = None):
        super().__init__(ctx)
        self.store = SnapshotStore(budget_bytes)
        self.on_budget = on_budget
        self.fallback = fallback
        self.scratch = copy.deepcopy(model).float().eval()
        self.snapshot_bytes = model_bytes(self.scratch)
        if budget_bytes is not None and budget_bytes < self.snapshot_bytes:
            raise ConfigError("oldlogits.snapshot_budget",
                              f"{budget_bytes} bytes cannot hold one snapshot of this model ({self.snapshot_bytes} "
                              f"bytes, float32); give at least {self.snapshot_bytes / 2**20:.1f}MiB or leave it empty "
                              "for no limit")
        self.budget_captures = 0
        self.fallback_tokens = 0

    def on_new_version(self, traj, version):
        self.store.add_ref(version, traj.uid)

    def _needed(self, version: int) -> bool:
        return self.ctx.async_mode or self.store.referenced(version)

    def needs_pause_before_update(self, version):
        return self.on_budget == "wait" and self._needed(version) and not self.store.fits(self.snapshot_bytes)

    def before_update(self, model, version, pending):
        if not self._needed(version) or self.store.put(version, clone_state_dict(model)):
            return
        if self.on_budget == "wait":  # rollouts are paused (needs_pause_before_update said so)
            self._timed(capture, model, pending, version, self.ctx)
            self.budget_captures += 1

    def on_publish(self, model, new_version, pending):
        self.store.gc(new_version)

    def prepare(self, batch, model, version):
        def exact():
            trajs = batch.trajectories
            for v in sorted({v for t in trajs for v in t.versions if v >= 0}):
                if v == version:
                    capture(model, trajs, v, self.ctx)
                elif v in self.store.snapshots:
                    load_parameters(self.scratch, self.store.snapshots[v])
                    capture(self.scratch, trajs, v, self.ctx)
            if self.fallback is not None:
                missing = sum(len(t.missing_old()) for t in trajs)
                if missing:
                    self.fallback_tokens += missing
                    proximal = self.fallback.prepare(batch, model, version)
                    for i, t in enumerate(trajs):
                        pos = t.missing_old()
                        t.set_old(pos, proximal[i, pos])
            return batch_old_logprobs(batch)

        return self._timed(exact)

    def after_optimizer_step(self, model):
        if self.fallback is not None:
            self.fallback.after_optimizer_step(model)

    def release(self, trajectories):
        for t in trajectories:
            self.store.drop_refs(t.uid, t.agent_versions())

    def extra_bytes(self):
        fb = self.fallback.extra_bytes() if self.fallback is not None else 0
        return self.store.bytes + self.snapshot_bytes + fb

    def metrics(self):
        return {"snapshot/versions_held": float(len(self.store.snapshots)), "snapshot/bytes": float(self.store.bytes),
                "snapshot/peak_bytes": float(self.store.peak_bytes), "snapshot/freed": float(self.store.freed),
                "snapshot/budget_captures": float(self.budget_captures),
                "snapshot/fallback_tokens": float(self.fallback_tokens)}

    def state_dict(self):
        return {"snapshots": dict(self.store.snapshots), "fallback": self.fallback.state_dict() if self.fallback else None}

    def load_state_dict(self, state):
        self.store.snapshots = dict(state["snapshots"])
        if self.fallback is not None and state.get("fallback"):
            self.fallback.load_state_dict(state["fallback"])


# --------------------------------------------------------------------------- exact: interruption sync


class InterruptSource(OldLogitSource):
    """Exact old log-probs by interruption: before each weight update, pause rollouts and capture every
    pending token of the resident version with the trainer's still-unchanged weights."""

    name = "interrupt"
    exact = True

    def needs_pause_before_update(self, version):
        return True

    def before_update(self, model, version, pending):
        self._timed(capture, model, pending, version, self.ctx)

    def prepare(self, batch, model, version):
        def exact():
            capture(model, batch.trajectories, version, self.ctx)  # finished at the resident version
            return batch_old_logprobs(batch)

        return self._timed(exact)


# --------------------------------------------------------------------------- exact: dedicated worker


_STOP = object()


class LogprobWorker(Protocol):
    """The dedicated worker's model copy: a scorer that can load a version's weights."""

    def __call__(self, prefixes: list[list[int]]) -> list[torch.Tensor]: ...

    def load(self, state: dict[str, torch.Tensor], version: int) -> None: ...

    def nbytes(self) -> int: ...

    def close(self) -> None: ...


class LocalLogprobWorker:
    """A `LogprobWorker` on a model in this process (the embedded dedicated source, or inside the Ray actor)."""

    def __init__(self, model: torch.nn.Module, ctx: SourceContext):
        self.model = model
        self.ctx = ctx

    def __call__(self, prefixes):
        return compute_logprobs(self.model, prefixes, pad_id=self.ctx.pad_id, temperature=self.ctx.temperature,
                                batch_size=self.ctx.batch_size)

    def load(self, state, version):
        load_parameters(self.model, state)

    def nbytes(self):
        return model_bytes(self.model)

    def close(self):
        pass


class DedicatedSource(OldLogitSource):
    """A separate model copy that follows the engine's versions, fed by a thread of its own.

    Events arrive in order: segments of version v (closed by a trajectory's end or by the update
    past v) and then the weights of v+1. The worker computes each segment with W_v before loading
    W_{v+1}, overlapped with training; `prepare` only waits for the batch's last segments. The model
    copy is a `LogprobWorker`: in this process (embedded) or in a Ray actor of its own.
    """

    name = "dedicated"
    exact = True

    def __init__(self, ctx: SourceContext, model: torch.nn.Module, version: int = 0, worker: LogprobWorker | None = None):
        super().__init__(ctx)
        self.worker = worker or LocalLogprobWorker(copy.deepcopy(model).float().eval(), ctx)
        self.version = version  # the worker thread's: the weights its model copy holds
        self.published = version  # the engine's: segments of this version are still open
        self.sent: set[tuple[int, int]] = set()  # (uid, version) segments already queued
        self._sent_lock = threading.Lock()  # rollout thread (trajectory end) vs trainer (release)
        self.events: queue.Queue = queue.Queue()
        self.done = threading.Condition()
        self.wait_seconds = 0.0
        self.segments = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="old-logit-worker", daemon=True)
        self._thread.start()

    def _send(self, traj: Trajectory, version: int) -> None:
        with self._sent_lock:
            if (traj.uid, version) in self.sent:
                return
            self.sent.add((traj.uid, version))
        self.events.put(("segment", traj, version))

    def on_trajectory_end(self, traj):
        # Only the open segment: one whose version was already replaced was closed (sent) by that publish,
        # and the worker has moved past its weights.
        if self.published in traj.agent_versions():
            self._send(traj, self.published)

    def on_publish(self, model, new_version, pending):
        # The rollout is parked here, so no trajectory ends (and sends) concurrently.
        for t in pending:
            if self.published in t.agent_versions():
                self._send(t, self.published)
        self.events.put(("weights", new_version, clone_state_dict(model)))
        self.published = new_version

    def release(self, trajectories):
        uids = {t.uid for t in trajectories}
        with self._sent_lock:
            self.sent = {(uid, v) for uid, v in self.sent if uid not in uids}

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
                    for _, _, v in segments:
                        assert v == self.version, f"segment of version {v} reached the worker at version {self.version}"
                    self._timed(capture, self.worker, [t for _, t, _ in segments], self.version, self.ctx)
                    self.segments += len(segments)
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

    def prepare(self, batch, model, version):
        t0 = time.perf_counter()
        with self.done:
            while any(t.missing_old() for t in batch.trajectories):
                if self.error is not None:
                    raise RuntimeError("the old-logit worker failed") from self.error
                self.done.wait(0.05)
        self.wait_seconds += time.perf_counter() - t0
        return batch_old_logprobs(batch)

    def extra_bytes(self):
        return self.worker.nbytes()

    def metrics(self):
        return {"dedicated/lag_versions": float(self.events.qsize()), "dedicated/wait_seconds": self.wait_seconds,
                "dedicated/segments": float(self.segments)}

    def close(self):
        self.events.put(_STOP)
        # Joined, not left to die with the interpreter: a thread inside a torch kernel at exit aborts
        # the process ("terminate called without an active exception").
        self._thread.join(timeout=60)
        self.worker.close()


def make_source(cfg, ctx: SourceContext, model: torch.nn.Module, kind: str | None = None, version: int = 0,
                logprob_worker: Callable[[torch.nn.Module, SourceContext], LogprobWorker] | None = None) -> OldLogitSource:
    """The source named by `oldlogits.source` (or `kind`), built around the trainer's model.

    `version` is the trainer's (non-zero on resume); `logprob_worker` builds the dedicated worker's
    model copy elsewhere (the Ray runtime's actor)."""
    from twofold.config import parse_bytes

    o = cfg.oldlogits
    kind = kind or o.source

    def ewma():
        return EWMASource(ctx, model, o.ewma_beta, o.ewma_reset_tau, o.ewma_auto_reset)

    if kind == "snapshot":
        return SnapshotSource(ctx, model, parse_bytes(o.snapshot_budget), o.on_budget,
                              fallback=ewma() if o.on_budget == "ewma" else None)
    if kind == "dedicated":
        return DedicatedSource(ctx, model, version, worker=logprob_worker(model, ctx) if logprob_worker else None)
    if kind == "interrupt":
        return InterruptSource(ctx)
    if kind == "ewma":
        return ewma()
    return ApproximateSource(ctx, kind)
