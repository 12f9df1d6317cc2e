"""How an async run in one process shares torch's CPU threads between the trainer and the rollout thread."""

from __future__ import annotations

SPLIT_BELOW = 0.05  # the trainer waited for its batch less than this fraction of its step: both compute at once
SHARE_ABOVE = 0.20  # more than this: rollouts bound the step, and the rollout thread gets every thread again


class CpuThreads:
    """torch's CPU threads for the trainer and for the rollout thread (each thread has its own OpenMP team), decided
    once a step from how long the trainer waited for its batch (`run.split_cpu_threads`).

    Why: when the trainer bounds the step (it hardly waits), the two compute at once, and two teams of every thread
    on the same cores oversubscribe them, each team's OpenMP workers spinning while the other's compute: then each
    side gets half (on 2 cores, single-turn async 134-144 -> 208-222 samples/s, docs/benchmarks.md). When the
    trainer waits for rollouts (tool latency, generation bounds the step), the engine needs every thread (native
    tool use: async 8.6 samples/s with all, 6.7 with half): then both keep all. A run starts sharing; the gap
    between the two thresholds keeps it from switching every step."""

    def __init__(self, total: int):
        self.total = total
        self.split = False

    def observe(self, idle: float, wall: float) -> None:
        """The last step: `idle` seconds of `wall` waiting for its batch."""
        fraction = idle / wall if wall > 0 else 0.0
        if fraction < SPLIT_BELOW:
            self.split = True
        elif fraction > SHARE_ABOVE:
            self.split = False

    def rollout(self) -> int:
        return max(1, self.total // 2) if self.split else self.total

    def trainer(self) -> int:
        return max(1, self.total - self.total // 2) if self.split else self.total
