"""Telling the user when a run learns nothing: group-relative advantages are zero in a group whose episodes
all got the same reward, and a run where most groups do, step after step, trains on (almost) nothing.

A model that never answers in the format the reward reads (every reward the format penalty) is the usual
cause; the warning says so with the format rate. It fires once per run, in the log and the progress bar, and
`summary.json` records it.
"""

from __future__ import annotations

from collections import defaultdict

from twofold import metrics as M
from twofold.rollout.trajectory import Trajectory

# Most groups (this share or more) without reward variance, for this many steps in a row: say so.
ZERO_VARIANCE_SHARE = 0.9
STEPS_IN_A_ROW = 3


def zero_variance_group_fraction(trajectories: list[Trajectory]) -> float:
    """Share of the groups whose trajectories all have the same reward (0 when there is none)."""
    rewards: dict[int, set[float]] = defaultdict(set)
    for t in trajectories:
        rewards[t.group_id].add(t.reward)
    return sum(len(r) == 1 for r in rewards.values()) / len(rewards) if rewards else 0.0


class LearningSignalWatch:
    """Counts steps in a row where most groups have no reward variance; the first time the count reaches
    `STEPS_IN_A_ROW` it returns the warning (and keeps it in `warning` for the run's summary)."""

    def __init__(self, share: float = ZERO_VARIANCE_SHARE, steps: int = STEPS_IN_A_ROW):
        self.share, self.steps = share, steps
        self.in_a_row = 0
        self.warning: dict | None = None

    def update_from_row(self, row: dict) -> str | None:
        """`update` from a step's metrics row: the training loop's own, or one the Ray driver reads back from
        metrics.jsonl for its progress bar (the run's watch lives in the trainer actor). A row from before this
        metric existed (a run resumed from an older version) counts as a step with variance."""
        return self.update(row[M.STEP], row.get(M.ZERO_VARIANCE_GROUP_FRAC, 0.0), row.get(M.FORMAT_OK_RATE, 0.0))

    def update(self, step: int, zero_variance_fraction: float, format_ok_rate: float) -> str | None:
        self.in_a_row = self.in_a_row + 1 if zero_variance_fraction >= self.share else 0
        if self.in_a_row < self.steps or self.warning is not None:
            return None
        self.warning = {
            "from_step": step - self.steps + 1,
            "steps": self.steps,
            "zero_variance_group_frac": zero_variance_fraction,
            "format_ok_rate": format_ok_rate,
        }
        return (
            f"no learning signal: in {zero_variance_fraction:.0%} of groups every episode got the same reward, for "
            f"{self.steps} steps in a row (steps {step - self.steps + 1}-{step}), so the advantages are zero and the "
            f"weights barely move; {format_ok_rate:.0%} of replies are in the format the reward reads. Check the "
            "prompt and the reward (env.options), or give the model a format warm start"
        )
