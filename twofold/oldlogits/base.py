"""The old-logit source interface, the store that owns captured old log-probs, and `capture`.

pi_old enters the loss through one method: `OldLogitSource.old_logprobs(batch, current_logprobs, version)`,
called by the trainer for every minibatch (and by the audit, on the source it audits). Everything else
a source does happens in hooks the pipeline calls at fixed points of a train step (trainer at version v):

    prepare(batch, model, v, pending) step start, weights W_v: exact sources finish capturing (snapshot: also
                                   the in-flight tokens of versions the engine has moved past), recompute scores
    before_update(model, v, pending) right before the first optimizer step; weights still W_v
    after_optimizer_step(model)    after each optimizer step (the EWMA's clock)
    on_publish(model, v+1, pending) rollouts paused, trainer weights W_{v+1}, before the engine gets them
    after_step(model, metrics)     the step's metrics are known (EWMA auto-reset)
    release(trajectories)          trained or dropped: nothing of theirs is needed any more
Rollout-thread hooks: on_new_version(traj, v) when a trajectory gets its first token of version v,
on_trajectory_end(traj) when its episode ends.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch.distributed.fsdp import FSDPModule

from twofold.distributed import Ranks, local_tensor
from twofold.logprobs import Numerics, score_sequences, sharded_root, token_logprobs
from twofold.models import load_parameters
from twofold.rollout.trajectory import Batch, Trajectory

T = TypeVar("T")

# token prefixes -> per-position log-probs of each (a model here, or a worker elsewhere)
Scorer = Callable[[list[list[int]]], list[torch.Tensor]]


def _copy_here(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A float32 copy of `model` on `device` whose frozen parameters (a LoRA base) are `model`'s own tensors where
    they already are float32 on `device`: nothing writes them, so a copy that follows other versions of the
    trained parameters needs only those."""
    frozen = {
        id(p): p for p in model.parameters() if not p.requires_grad and p.device == device and p.dtype == torch.float32
    }
    return copy.deepcopy(model, frozen).to(device).float().eval()


class _Scoring(torch.nn.Module):
    """A forward that runs `score(policy)`, so that `torch.func.functional_call` can stand other tensors in for
    the policy's parameters while it runs (`SourceContext.scorer_with`)."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, score: Callable[[torch.nn.Module], object]):
        return score(self.policy)


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module):
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def with_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor], score: Callable[[torch.nn.Module], T]) -> T:
    """`score(model)` with the tensors of `state` (a `versioned_state`: every trained parameter, or the LoRA
    adapters alone) in place of the model's own for the call, in eval mode: a held version needs no model of its
    own, and under LoRA it shares the frozen base. It swaps the model's tensors for the call: only the thread that
    trains the model may use it (the trainer's).

    One process's model: `torch.func.functional_call` stands `state` in for its parameters; nothing is copied
    into the model. A sharded model (FSDP2: DTensor parameters, which FSDP's own hooks gather, so a functional
    call cannot stand in for them) takes this rank's shards of `state` into its parameters and gets its own
    back after the call, bit for bit: it holds a second copy of its trained shards (under LoRA, its adapters)
    only while it scores. Between a forward and its backward too (the EWMA scores there): FSDP2 gathers the
    backward's weights from the shards again, restored by then, and nothing of autograd's reads them."""
    root = sharded_root(model)
    units = [m for m in root.modules() if isinstance(m, FSDPModule)] if root is not None else []
    for unit in units:  # a gathered unit shows its whole tensors as parameters: the shards are what is swapped
        unit.reshard()
    own = dict(model.named_parameters())
    unknown = state.keys() - own.keys()
    if unknown:  # functional_call would ignore them and score with the model's own weights
        raise KeyError(f"state names parameters the model does not have: {sorted(unknown)[:3]}")
    with _evaluating(model):
        if units:
            with _shards_swapped(model, units, state):
                return score(model)
        device = next(iter(own.values())).device
        params = {f"policy.{n}": t.to(device, non_blocking=True) for n, t in state.items()}
        return torch.func.functional_call(_Scoring(model), params, (score,), strict=False)


@contextlib.contextmanager
def _shards_swapped(model: torch.nn.Module, units: list[FSDPModule], state: dict[str, torch.Tensor]):
    """This rank's shards of `state` in the parameters of `model`, whose FSDP `units` are all resharded, while the
    block runs; their own values back after it, also when it or the swap itself raises. The units are resharded
    again after the block (a no-op for units that reshard after their forward, as `sharding.shard_on` makes them
    all), so none keeps the version's weights gathered for a pending backward, which gathers again. On CUDA the
    restore is waited for: FSDP2's backward gathers run on streams of their own, which wait for the current
    stream only at a root forward, so they must not read the shards before."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        kept = {n: local_tensor(own[n]).clone() for n in state}
    try:
        load_parameters(model, state)
        yield
    finally:
        for unit in units:
            unit.reshard()
        load_parameters(model, kept)
        device = local_tensor(next(iter(own.values()))).device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


@dataclass
class SourceContext:
    """What every source needs to score tokens the way the trainer does, and where its state lives."""

    pad_id: int
    async_mode: bool
    max_staleness: int
    # Optimizer steps per policy version (ppo_epochs x num_minibatches): the EWMA's clock.
    updates_per_version: int = 1
    numerics: Numerics = field(default_factory=Numerics)  # the trainer's: device, precision, chunks, budgets
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # sources' model copies, EWMA
    snapshot_device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # stored snapshots
    snapshot_directory: Path | None = None  # where snapshots are files instead (`oldlogits.snapshot_device=disk`)
    ranks: Ranks = field(default_factory=Ranks)  # the trainer's ranks (sharded: every source runs on each)
    # A whole policy loaded with given (gathered) weights on one rank (the dedicated worker's): sharded runs
    # pass a factory that loads a fresh policy from the model path (a sharded module cannot be deep-copied).
    whole_policy: Callable[[dict[str, torch.Tensor]], torch.nn.Module] | None = None

    def whole_copy_of(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """An unsharded policy holding `state` (the gathered weights of `model`)."""
        return self.whole_policy(state) if self.whole_policy is not None else _copy_here(model, self.device)

    def scorer_with(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Scorer:
        """`scorer(model)` with `state` standing in for its trained parameters (`with_parameters`)."""
        return lambda prefixes: with_parameters(model, state, lambda m: self.scorer(m)(prefixes))

    def scorer(self, model: torch.nn.Module) -> Scorer:
        """Trainer-side log-probs of token prefixes under `model` (no grad, the trainer's numerics). Sharded:
        every rank passes the same prefixes, each scores a share, every rank gets all of them."""
        return lambda prefixes: score_sequences(model, prefixes, self.numerics, self.pad_id, self.ranks)

    def score_batch(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """[B, T] log-probs of `batch`'s agent tokens under `model` (0 off the loss mask), on the batch's device.
        Sharded: every rank passes the same batch."""
        out = torch.zeros(batch.behavior_logprobs.shape)
        for i, lp in enumerate(self.scorer(model)([t.token_ids for t in batch.trajectories])):
            n = min(len(lp), out.shape[1])
            out[i, :n] = lp[:n]
        return out.to(batch.loss_mask.device) * batch.loss_mask

    @torch.no_grad()
    def score_rows(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """[B, T] log-probs of `batch`'s agent tokens in one forward over its own tensors: a trainer
        micro-batch, already under the token budget. Sharded: each rank passes its own rows (the trainer
        keeps every rank's micro-batch count equal)."""
        device = next(model.parameters()).device
        with self.numerics.autocast(device):
            lp = token_logprobs(
                model,
                batch.input_ids.to(device),
                batch.attention_mask.to(device),
                self.numerics.temperature,
                self.numerics.chunk_size,
                batch.loss_mask.to(device),
                self.numerics.packed,
                self.numerics.share_prefixes,
            )
        return lp.to(batch.loss_mask.device) * batch.loss_mask


class CapturedLogprobs:
    """Exact old log-probs captured so far, by trajectory uid: their one owner.

    Written by whichever thread captures (the trainer with rollouts paused, the dedicated worker's
    thread) and read by the trainer. One lock guards every access and tensors are copied in and out,
    so no two threads share a mutable record. Trajectories themselves are only appended to, by the
    rollout thread; a token's version never changes once stamped.
    """

    def __init__(self) -> None:
        self._values: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def missing(self, traj: Trajectory, version: int | None = None) -> torch.Tensor:
        """Agent positions of `traj` (of `version`, or of any) that have no value yet, ascending."""
        # `list` copies in one step (no thread switch), while the rollout thread may be appending to it
        versions = torch.tensor(list(traj.versions), dtype=torch.long)
        wanted = versions >= 0 if version is None else versions == version
        with self._lock:
            have = self._values.get(traj.uid)
            if have is not None:
                known = torch.zeros_like(wanted)
                n = min(len(have), len(known))
                known[:n] = ~torch.isnan(have[:n])
                wanted &= ~known
        return wanted.nonzero().flatten()

    def write(self, uid: int, positions: torch.Tensor, values: torch.Tensor) -> None:
        if len(positions) == 0:
            return
        need = int(positions.max()) + 1
        with self._lock:
            have = self._values.get(uid)
            if have is None or len(have) < need:
                grown = torch.full((need,), float("nan"))
                if have is not None:
                    grown[: len(have)] = have
                have = grown
            have[positions] = values.detach().to(torch.float32).cpu()
            self._values[uid] = have

    def gather(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T] values, 0 off the loss mask and where none; [B, T] bool: agent tokens with no value)."""
        out = torch.full(batch.behavior_logprobs.shape, float("nan"))
        with self._lock:
            for i, t in enumerate(batch.trajectories):
                have = self._values.get(t.uid)
                if have is not None:
                    n = min(len(have), out.shape[1])
                    out[i, :n] = have[:n]
        out = out.to(batch.loss_mask.device)
        agent = batch.loss_mask > 0
        missing = torch.isnan(out) & agent
        return torch.where(agent & ~missing, out, torch.zeros_like(out)), missing

    def export(self, trajectories: list[Trajectory]) -> dict[int, torch.Tensor]:
        """The values of these trajectories, to hand to another rank (`load`)."""
        with self._lock:
            return {t.uid: self._values[t.uid].clone() for t in trajectories if t.uid in self._values}

    def load(self, values: dict[int, torch.Tensor]) -> None:
        with self._lock:
            self._values.update(values)

    def forget(self, trajectories: list[Trajectory]) -> None:
        with self._lock:
            for t in trajectories:
                self._values.pop(t.uid, None)

    def retain(self, uids: set[int]) -> None:
        """Forget every trajectory but `uids` (those of the batch and those still in flight): on a rank other
        than 0, which never hears of a group dropped there, values captured in flight would otherwise stay."""
        with self._lock:
            for uid in [u for u in self._values if u not in uids]:
                del self._values[uid]


def capture(scorer: Scorer, store: CapturedLogprobs, trajectories: list[Trajectory], version: int | None) -> int:
    """Score the tokens of `version` (every still-missing agent token if None) and record them in `store`.

    The one computation behind every exact source (and recompute): a forward over each trajectory's prefix
    up to its last such token. Sources differ only in *when* this runs and *with which weights*. Returns the
    number of tokens captured.
    """
    todo = [(t, store.missing(t, version)) for t in trajectories]
    todo = [(t, pos) for t, pos in todo if len(pos)]
    if not todo:
        return 0
    logprobs = scorer([t.token_ids[: int(pos[-1]) + 1] for t, pos in todo])
    for (t, pos), lp in zip(todo, logprobs, strict=True):
        store.write(t.uid, pos, lp[pos])
    return sum(len(pos) for _, pos in todo)


class OldLogitSource:
    """A source of pi_old. Subclasses implement `old_logprobs` and the hooks they need (no-ops here)."""

    name = "base"

    def __init__(self, ctx: SourceContext):
        self.ctx = ctx
        self.seconds = 0.0  # time spent computing old log-probs, for the step's breakdown

    def old_logprobs(self, batch: Batch, current_logprobs: torch.Tensor, version: int) -> torch.Tensor:
        """pi_old of `batch`'s agent tokens, [B, T] (0 off the loss mask), for the trainer at `version`.

        `current_logprobs` are the trainer's log pi_theta of the same tokens (detached), which only the
        interpolating sources read.
        """
        raise NotImplementedError

    def on_new_version(self, traj: Trajectory, version: int) -> None: ...

    def on_trajectory_end(self, traj: Trajectory) -> None: ...

    def prepare(self, batch: Batch, model: torch.nn.Module, version: int, pending: list[Trajectory]) -> None: ...

    def needs_pause_before_update(self, version: int) -> bool:
        return False

    def before_update(self, model: torch.nn.Module, version: int, pending: list[Trajectory]) -> None: ...

    def after_optimizer_step(self, model: torch.nn.Module) -> None: ...

    def on_publish(self, model: torch.nn.Module, new_version: int, pending: list[Trajectory]) -> None: ...

    def after_step(self, model: torch.nn.Module, metrics: dict[str, float]) -> None: ...

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

    def _timed(self, fn: Callable, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0


class CapturingSource(OldLogitSource):
    """A source whose pi_old are values captured into a `CapturedLogprobs` (exact sources, recompute)."""

    def __init__(self, ctx: SourceContext):
        super().__init__(ctx)
        self.captured = CapturedLogprobs()

    def old_logprobs(self, batch, current_logprobs, version):
        values, missing = self.captured.gather(batch)
        if missing.any():
            raise RuntimeError(f"{self.name}: {int(missing.sum())} agent tokens have no captured old log-prob")
        return values

    def release(self, trajectories):
        self.captured.forget(trajectories)
