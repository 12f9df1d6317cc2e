"""How an async run in one process shares torch's CPU threads between the trainer and the rollout thread."""

from __future__ import annotations

SPLIT_BELOW = 0.05  # the trainer waited for its batch less than this fraction of its step: both compute at once
SHARE_ABOVE = 0.20  # more than this: rollouts bound the step, and both use every thread
TRIAL_STEPS = 3  # steps timed each way before the run keeps one
MIN_GAIN = 0.05  # the split is kept only if its steps are this much shorter


class CpuThreads:
    """torch's CPU threads for the trainer and for the rollout thread (each thread has its own OpenMP team), decided
    once a step from how long the trainer waited for its batch and what the split has been measured to give
    (`run.split_cpu_threads`).

    Why: when the trainer bounds the step (it hardly waits), the two compute at once, and two teams of every thread
    on the same cores oversubscribe them. Whether giving each side half pays depends on the kernels: on the tiny
    model each op is too small for two threads to share, the teams' spinning dominates, and the split made the
    single-turn async step 1.6x faster; on SmolLM2-135M the trainer's GEMMs use both threads well, and the split
    made the step 22-45% slower (docs/benchmarks.md). So the run measures it: the first `TRIAL_STEPS` steps the trainer
    bounds run shared, the next as many split, and the faster way (the split only if `MIN_GAIN` faster) is kept for
    every later step the trainer bounds. When the trainer waits for rollouts (tool latency, generation bounds the
    step), the engine needs every thread, and both keep all; between the two thresholds a run keeps its threads,
    so it does not switch every step."""

    def __init__(self, total: int):
        self.total = total
        self.split = False
        self.keep_split: bool | None = None  # the trial's verdict, once measured
        self.walls: dict[bool, list[float]] = {False: [], True: []}  # trainer-bound steps' seconds, by split

    def observe(self, idle: float, wall: float) -> str | None:
        """The last step: `idle` seconds of `wall` waiting for its batch, run with the current split. Returns the
        trial's verdict, in words, on the step that decides it."""
        fraction = idle / wall if wall > 0 else 0.0
        if fraction > SHARE_ABOVE:
            self.split = False
            return None
        if fraction >= SPLIT_BELOW:
            return None
        if self.keep_split is not None:
            self.split = self.keep_split
            return None
        self.walls[self.split].append(wall)
        shared, split = self.walls[False], self.walls[True]
        if len(split) < TRIAL_STEPS:
            self.split = len(shared) >= TRIAL_STEPS
            return None
        shared_mean, split_mean = sum(shared) / len(shared), sum(split) / len(split)
        self.keep_split = self.split = split_mean < (1 - MIN_GAIN) * shared_mean
        return (
            f"{'half' if self.split else 'all'} of {self.total} CPU threads each for the trainer and the rollout "
            f"thread from now on: {split_mean:.3g} s a step with half, {shared_mean:.3g} s with all"
        )

    def rollout(self) -> int:
        return max(1, self.total // 2) if self.split else self.total

    def trainer(self) -> int:
        return max(1, self.total - self.total // 2) if self.split else self.total
