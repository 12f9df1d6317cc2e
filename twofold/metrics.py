"""Every metric a run logs, named once: the trainer, the old-logit sources, the pipeline and the report use
these constants, and docs/metrics.md is generated from this table (`python -m twofold.metrics`).

A metric is a rate or a mean unless marked `count`: a train step sums counts over the minibatches of one
pass over the batch, and averages everything else over its optimizer steps (`loss.combine_metrics`).
Names with a `{placeholder}` are families, one metric per value (`lag_fraction("0")` is
`version/lag0_frac`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    count: bool = False


REGISTRY: dict[str, Metric] = {}


def _metric(name: str, help: str, *, count: bool = False) -> str:
    if name in REGISTRY:
        raise ValueError(f"metric {name!r} is declared twice")
    REGISTRY[name] = Metric(name, help, count)
    return name


# --------------------------------------------------------------------------- discrepancy r_d = pi_old / mu
MASK_FRAC = _metric("discrepancy/mask_frac", "share of agent tokens the r_d band (or the veto) dropped")
TRUNC_FRAC = _metric("discrepancy/trunc_frac", "share of agent tokens whose r_d was truncated to the band")
CATASTROPHIC_SEQS = _metric(
    "discrepancy/catastrophic_seqs", "sequences dropped whole by the catastrophic veto (a token r_d < x)", count=True
)
NONFINITE_TOKENS = _metric(
    "discrepancy/nonfinite_tokens", "agent tokens whose r_d is not finite (the engine gave them -inf)", count=True
)

# --------------------------------------------------------------------------- staleness r_s = pi_theta / pi_old
CLIP_FRAC_LOW = _metric("ppo/clip_frac_low", "share of agent tokens clipped at 1 - eps_low (A < 0)")
CLIP_FRAC_HIGH = _metric("ppo/clip_frac_high", "share of agent tokens clipped at 1 + eps_high (A > 0)")
DUAL_CLIP_FRAC = _metric("ppo/dual_clip_frac", "share of agent tokens held by the dual clip c (A < 0)")
ACTIVE_TOKEN_RATIO = _metric(
    "ppo/active_token_ratio", "share of agent tokens kept by the r_d band and not clipped: those that carry gradient"
)
STALENESS_RATIO_MEAN = _metric("ppo/staleness_ratio_mean", "mean r_s over agent tokens")

# --------------------------------------------------------------------------- KL estimates (Schulman 2020)
KL_DISCREPANCY_K1 = _metric("kl/discrepancy_k1", "k1 estimate of KL(mu || pi_old): mean -log r_d")
KL_DISCREPANCY_K3 = _metric("kl/discrepancy_k3", "k3 estimate of KL(mu || pi_old): mean (r_d - 1) - log r_d")
KL_STALENESS_K1 = _metric("kl/staleness_k1", "k1 estimate of KL(pi_old || pi_theta)")
KL_STALENESS_K3 = _metric("kl/staleness_k3", "k3 estimate of KL(pi_old || pi_theta)")
KL_TOTAL_K1 = _metric("kl/total_k1", "k1 estimate of KL(mu || pi_theta)")
KL_TOTAL_K3 = _metric("kl/total_k3", "k3 estimate of KL(mu || pi_theta)")

# --------------------------------------------------------------------------- importance weights and the loss
IS_ESS = _metric("is/ess", "effective sample size of the kept r_d weights, (sum w)^2 / (n sum w^2), in (0, 1]")
IS_WEIGHT_MEAN = _metric("is/weight_mean", "mean r_d weight over agent tokens (0 where dropped)")
LOSS_TOKENS = _metric("loss/tokens", "agent tokens in the loss, per pass over the batch", count=True)
LOSS_VALUE = _metric("loss/value", "the decoupled PPO loss")
GRAD_NORM = _metric("loss/grad_norm", "gradient norm before clipping")
LEARNING_RATE = _metric("trainer/lr", "learning rate, warm-up applied")
OPTIMIZER_STEPS = _metric("trainer/optimizer_steps", "optimizer steps taken this train step")
SKIPPED_STEPS = _metric("trainer/skipped_steps", "optimizer steps skipped for a non-finite loss or gradient, so far")

# --------------------------------------------------------------------------- versions
STALENESS_MEAN = _metric("version/staleness_mean", "mean token lag (trainer version - sampling version), agent tokens")
STALENESS_MAX = _metric("version/staleness_max", "largest token lag in the batch")
LAG_FRACTION = _metric("version/lag{bucket}_frac", "share of agent tokens whose lag is in the bucket (0-3, 4plus)")


def lag_fraction(bucket: str) -> str:
    return LAG_FRACTION.format(bucket=bucket)


# --------------------------------------------------------------------------- outcomes and rollouts
STEP = _metric("step", "train steps done")
VERSION = _metric("version", "the trainer's policy version after the step")
REWARD_MEAN = _metric("reward/mean", "mean episode reward of the batch")
SUCCESS_RATE = _metric("success/rate", "share of the batch's episodes that solved their task")
FORMAT_OK_RATE = _metric("rollout/format_ok_rate", "share of turns whose reply parsed (a valid action or answer)")
TURNS_MEAN = _metric("rollout/turns_mean", "mean turns per episode")
TRAJECTORIES = _metric("rollout/trajectories", "episodes trained in the step")
AGENT_TOKENS = _metric("rollout/agent_tokens", "tokens the agent generated in the batch (they carry loss)")
TOKENS = _metric("rollout/tokens", "all tokens of the batch: prompts, observations and replies")
MULTI_VERSION_FRAC = _metric("rollout/multi_version_frac", "share of episodes whose replies span several versions")
ENV_ERRORS = _metric("rollout/env_errors", "env steps that raised, so far (the episode is dropped)")
ENV_TIMEOUTS = _metric("rollout/env_timeouts", "env steps past env.step_timeout_s, so far")
NONFINITE_DROPPED = _metric("rollout/nonfinite_dropped", "episodes dropped for a non-finite behaviour log-prob")
TRUNCATED = _metric("rollout/truncated", "episodes cut at rollout.max_total_tokens, so far")
DISCARDED_TOKENS = _metric("rollout/discarded_tokens", "tokens generated and then thrown away (regenerated turns)")
ZERO_VARIANCE_GROUP_FRAC = _metric(
    "rollout/zero_variance_group_frac", "share of the batch's groups whose episodes all got the same reward"
)
STALE_DROPPED_GROUPS = _metric("rollout/stale_dropped_groups", "groups dropped as more than W versions old, so far")

# --------------------------------------------------------------------------- time, throughput, memory
STEP_SECONDS = _metric("time/step", "wall-clock seconds of the train step")
TIME_PART = _metric(
    "time/{part}", "seconds of the step in one part: generation, old_logits, training, weight_sync, idle"
)


def time_part(part: str) -> str:
    return TIME_PART.format(part=part)


TIME_PARTS = ("generation", "old_logits", "training", "weight_sync", "idle")
SAMPLES_PER_S = _metric("throughput/samples_per_s", "episodes trained per wall-clock second")
TOKENS_PER_S = _metric("throughput/tokens_per_s", "tokens generated per wall-clock second")
CPU_THREADS_SPLIT = _metric(
    "throughput/cpu_threads_split",
    "async in one process with run.split_cpu_threads: 1 where the step ran with half of torch's CPU threads for "
    "the trainer and half for the rollout thread, 0 where both had all",
)
ENGINE_PREFILLED_TOKENS = _metric(
    "engine/prefilled_tokens", "context tokens the built-in engine ran through its model before sampling, so far"
)
ENGINE_REUSED_TOKENS = _metric(
    "engine/reused_tokens", "context tokens whose KV the built-in engine's prefix cache supplied instead, so far"
)
ENGINE_JOINED_REQUESTS = _metric(
    "engine/joined_requests", "requests that joined a running batch of the built-in engine (continuous batching)"
)
OLDLOGIT_EXTRA_BYTES = _metric("memory/oldlogit_extra_bytes", "bytes the old-logit source holds now (copies, versions)")
OLDLOGIT_PEAK_BYTES = _metric("memory/oldlogit_peak_bytes", "the most bytes the old-logit source has held")
MEMORY_TRAINER_PARAMETERS = _metric("memory/trainer_parameter_bytes", "the trainer's weights (this rank's shards)")
MEMORY_TRAINER_GRADIENTS = _metric("memory/trainer_gradient_bytes", "the gradients a step holds (trained parameters)")
MEMORY_OPTIMIZER_STATE = _metric("memory/optimizer_state_bytes", "the optimizer's state (AdamW: two moments)")
MEMORY_ENGINE_WEIGHTS = _metric("memory/engine_weight_bytes", "the built-in engine's copy of the weights (rank 0)")
MEMORY_ENGINE_PREFIX_CACHE = _metric(
    "memory/engine_prefix_cache_bytes", "KV the built-in engine keeps across calls, its prefix cache (rank 0)"
)
MEMORY_PROCESS_BASELINE = _metric(
    "memory/process_baseline_bytes", "the process's resident size before the run built anything: interpreter, libraries"
)
MEMORY_RSS = _metric("memory/rss_bytes", "the process's resident size at the step's end (Linux)")
MEMORY_STEP_PEAK_RSS = _metric("memory/step_peak_rss_bytes", "the process's peak resident size during the step")
MEMORY_STEP_TRANSIENT = _metric(
    "memory/step_transient_bytes",
    "step peak minus the named parts (weights, gradients, optimizer, engine weights and prefix cache, old-logit "
    "state, process baseline): "
    "activations, logits, copies in flight, libraries loaded since the start",
)
DEVICE_PEAK_BYTES = _metric("memory/device_peak_bytes", "peak bytes this process allocated on its GPU")

# --------------------------------------------------------------------------- audit (oldlogits.audit)
AUDIT_ABS_ERR_MEAN = _metric(
    "audit/abs_err_mean", "mean |pi_old of the source - exact pi_old| in log-prob, agent tokens"
)
AUDIT_ABS_ERR_MAX = _metric("audit/abs_err_max", "largest |pi_old of the source - exact pi_old|")
AUDIT_KL_K3 = _metric("audit/kl_k3", "k3 estimate of KL(exact pi_old || the source's)")
AUDIT_ABS_ERR_LAG = _metric("audit/abs_err_lag{bucket}", "mean audit error over tokens of one lag bucket")


def audit_error_at_lag(bucket: str) -> str:
    return AUDIT_ABS_ERR_LAG.format(bucket=bucket)


# --------------------------------------------------------------------------- the sources' own
EWMA_RESETS = _metric("ewma/resets", "resets of the EWMA average to the current weights, so far")
EWMA_RESET_THIS_STEP = _metric("ewma/reset_this_step", "1 when this step reset the average")
EWMA_CENTER_OF_MASS = _metric("ewma/center_of_mass", "mean age of the average, in optimizer steps")
EWMA_CENTER_OF_MASS_VERSIONS = _metric("ewma/center_of_mass_versions", "mean age of the average, in versions")
EWMA_BETA = _metric("ewma/beta", "the EWMA decay per optimizer step")
SNAPSHOT_VERSIONS_HELD = _metric("snapshot/versions_held", "weight versions kept now")
SNAPSHOT_BYTES = _metric("snapshot/bytes", "bytes of the versions kept now")
SNAPSHOT_PEAK_BYTES = _metric("snapshot/peak_bytes", "the most bytes of versions kept at once")
SNAPSHOT_FREED = _metric("snapshot/freed", "versions freed so far (no trajectory refers to them)")
SNAPSHOT_BUDGET_CAPTURES = _metric(
    "snapshot/budget_captures", "times the byte budget made the source capture instead of keeping a version"
)
SNAPSHOT_VERSION_BYTES = _metric("snapshot/version_bytes", "bytes of one version (this rank's shards)")
SNAPSHOT_FALLBACK_TOKENS = _metric("snapshot/fallback_tokens", "tokens scored by the fallback, not a kept version")
SNAPSHOT_IN_FLIGHT_TOKENS = _metric(
    "snapshot/in_flight_tokens",
    "tokens of versions the engine has moved past, captured while their trajectory was still in flight (so far)",
)
DEDICATED_LAG_VERSIONS = _metric("dedicated/lag_versions", "versions the dedicated worker has yet to apply")
DEDICATED_WAIT_SECONDS = _metric("dedicated/wait_seconds", "seconds the trainer waited for the dedicated worker")
DEDICATED_SEGMENTS = _metric("dedicated/segments", "trajectory segments the dedicated worker scored, so far")

# --------------------------------------------------------------------------- the Ray runtime
RAY_ENGINE_REPLICA_FAILURES = _metric("ray/engine_replica_failures", "engine replicas lost and restarted, so far")
RAY_ENGINE_RETRIED_REQUESTS = _metric("ray/engine_retried_requests", "generation requests retried on another replica")
RAY_ENGINE_REQUESTS = _metric("ray/engine{replica}_requests", "generation requests served by one engine replica")
RAY_ENV_WORKER_FAILURES = _metric("ray/env_worker_failures", "env workers lost and restarted, so far")


def engine_requests(replica: int) -> str:
    return RAY_ENGINE_REQUESTS.format(replica=replica)


COUNT_METRICS = frozenset(m.name for m in REGISTRY.values() if m.count)
_FAMILIES = [
    (re.compile("^" + re.sub(r"\\\{\w+\\\}", r"[^/]+", re.escape(name)) + "$"), name)
    for name in REGISTRY
    if "{" in name
]


def declared(name: str) -> str | None:
    """The registry entry a logged metric name belongs to (itself, or its family), or None."""
    if name in REGISTRY:
        return name
    return next((family for pattern, family in _FAMILIES if pattern.fullmatch(name)), None)


def markdown() -> str:
    """docs/metrics.md: every metric, grouped by its prefix."""
    lines = [
        "# Metrics",
        "",
        "Every metric a run writes to `metrics.jsonl`, TensorBoard and W&B. Generated from `twofold/metrics.py`",
        "by `python -m twofold.metrics > docs/metrics.md`; a test keeps the two equal. A *count* is summed over",
        "the minibatches of a pass over the batch; every other metric is averaged over the step's optimizer steps.",
        "",
        "| metric | what | kind |",
        "|---|---|---|",
    ]
    for m in REGISTRY.values():
        lines.append(f"| `{m.name}` | {m.help} | {'count' if m.count else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
