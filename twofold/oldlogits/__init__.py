"""Every source of old log-probs (pi_old) behind one interface.

Exact sources recover pi_v, the trainer-side log-probs under the weights of the version v that
produced each token:
    snapshot   keep weights per version (refcounted, byte budget); compute each span with its own version
    dedicated  a worker with its own model copy follows the engine's versions, computes segments as they close
    interrupt  before each weight update, pause rollouts and compute the tokens of the resident version
Approximations (no extra state except the EWMA's one copy):
    behavior   mu itself                  recompute  current trainer weights (what peers do)
    linear / loglinear   AReaL's interpolation by per-token version
    ewma       revised PPO-EWMA: a bias-corrected EWMA of the parameters, beta = W/(W+2), auto-reset

All exact paths share `capture`: they differ only in *when* it runs and *which weights* it runs with.
"""

from twofold.oldlogits.sources import (
    ApproximateSource,
    DedicatedSource,
    EWMASource,
    InterruptSource,
    OldLogitSource,
    SnapshotSource,
    SnapshotStore,
    capture,
    make_source,
)

__all__ = ["ApproximateSource", "DedicatedSource", "EWMASource", "InterruptSource", "OldLogitSource",
           "SnapshotSource", "SnapshotStore", "capture", "make_source"]
