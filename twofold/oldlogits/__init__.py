"""Every source of old log-probs (pi_old) behind one interface: this folder is where pi_old is made.

Exact sources recover pi_v, the trainer-side log-probs under the weights of the version v that
produced each token (`snapshot.py`, `dedicated.py`, `interrupt.py`):
    snapshot   keep weights per version (refcounted, byte budget); score each span with its own version
    dedicated  a worker with its own model copy follows the engine's versions, scores segments as they close
    interrupt  before each weight update, pause rollouts and score the tokens of the resident version
Approximations (`approximate.py`; no extra state except the EWMA's one average):
    behavior   mu itself                  recompute  trainer weights at the step start (what peers do)
    linear / loglinear   AReaL's interpolation by per-token version
    ewma       revised PPO-EWMA: a bias-corrected EWMA of the parameters, beta = kW/(kW+2), auto-reset

pi_old enters the loss through `OldLogitSource.old_logprobs` (`base.py`), which the trainer calls per
minibatch. Exact values have one owner, a `CapturedLogprobs` per source, filled by `capture`: the one
exact computation, which sources run at different times with different weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from twofold.config import Config, parse_bytes
from twofold.oldlogits.approximate import BehaviorSource, EWMASource, InterpolationSource, RecomputeSource
from twofold.oldlogits.base import CapturedLogprobs, OldLogitSource, SourceContext, capture
from twofold.oldlogits.dedicated import DedicatedSource, LocalLogprobWorker, LogprobWorker
from twofold.oldlogits.interrupt import InterruptSource
from twofold.oldlogits.snapshot import SnapshotSource, SnapshotStore

__all__ = [
    "BehaviorSource",
    "CapturedLogprobs",
    "DedicatedSource",
    "EWMASource",
    "InterpolationSource",
    "InterruptSource",
    "LocalLogprobWorker",
    "LogprobWorker",
    "OldLogitSource",
    "RecomputeSource",
    "SnapshotSource",
    "SnapshotStore",
    "SourceContext",
    "capture",
    "make_source",
]


def make_source(
    cfg: Config,
    ctx: SourceContext,
    model: torch.nn.Module,
    kind: str | None = None,
    version: int = 0,
    logprob_worker: Callable[[dict[str, torch.Tensor], SourceContext], LogprobWorker] | None = None,
) -> OldLogitSource:
    """The source named by `oldlogits.source` (or `kind`), built around the trainer's model.

    `version` is the trainer's (non-zero on resume); `logprob_worker` builds the dedicated worker's
    model copy elsewhere (the Ray runtime's actor) from the trainer's gathered weights."""
    o = cfg.oldlogits
    kind = kind or o.source

    def ewma() -> EWMASource:
        return EWMASource(ctx, model, o.ewma_beta, o.ewma_reset_tau, o.ewma_auto_reset, o.ewma_reset_cooldown)

    if kind == "snapshot":
        return SnapshotSource(
            ctx, model, parse_bytes(o.snapshot_budget), o.on_budget, fallback=ewma() if o.on_budget == "ewma" else None
        )
    if kind == "dedicated":
        return DedicatedSource(ctx, model, version, worker=logprob_worker)
    if kind == "interrupt":
        return InterruptSource(ctx)
    if kind == "ewma":
        return ewma()
    if kind == "recompute":
        return RecomputeSource(ctx)
    if kind in ("linear", "loglinear"):
        return InterpolationSource(ctx, kind)
    if kind == "behavior":
        return BehaviorSource(ctx)
    raise ValueError(f"unknown old-logit source {kind!r}")
