"""How an async run in one process shares torch's CPU threads between the trainer and the rollout thread."""

from __future__ import annotations

WARMUP_STEPS = 1  # the first step fills the pipeline (the trainer waits for every rollout): not timed
BLOCK_STEPS = 2  # steps run one way before the trial switches; only the block's last step is timed
TRIAL_BLOCKS = 3  # blocks each way: the trial is 2 x 3 x 2 = 12 steps, 3 of them timed each way
MIN_GAIN = 0.05  # the split is kept only if its timed steps went through this much more tokens a second


class CpuThreads:
    """torch's CPU threads for the trainer and for the rollout thread (each thread has its own OpenMP team), measured
    in the run and then fixed (`run.split_cpu_threads`).

    Why: in async mode the two compute at once, and two teams of every thread on the same cores oversubscribe them.
    Whether giving each side half pays depends on the kernels and on what bounds the step: on the tiny model each op
    is too small for two threads to share, the teams' spinning dominates, and the split made the single-turn async
    step 1.6x faster; on SmolLM2-135M the trainer's GEMMs use both threads well, and the split made the step 22-45%
    slower (docs/benchmarks.md). So the run measures it on its own mix of steps, whatever bounds each one: after
    `WARMUP_STEPS`, blocks of `BLOCK_STEPS` steps alternate between every thread for both (shared, first) and half each
    (split), `TRIAL_BLOCKS` blocks each way. Each block times only its last step, because a block's first step trains
    on rollouts generated under the other setting. The way whose timed steps went through more batch tokens a second
    is kept for the rest of the run (the split only if `MIN_GAIN` better). Alternating short blocks, rather than one
    long block each way, keeps a trend (replies growing, caches warming) from deciding the verdict."""

    def __init__(self, total: int):
        self.total = total
        self.split = False
        self.keep_split: bool | None = None  # the trial's verdict, once measured
        self.steps = 0  # steps observed
        self.timed: dict[bool, list[tuple[float, float]]] = {False: [], True: []}  # (tokens, seconds) by split

    def observe(self, tokens: float, wall: float) -> str | None:
        """The last step: `tokens` in its batch, trained in `wall` seconds with the current split. Sets the split for
        the next step and returns the trial's verdict, in words, on the step that decides it."""
        self.steps += 1
        if self.keep_split is not None or self.total < 2:
            return None
        trial_step = self.steps - WARMUP_STEPS  # 1, 2, ... within the trial
        if trial_step < 1:
            return None
        if trial_step % BLOCK_STEPS == 0:
            self.timed[self.split].append((tokens, wall))
        if len(self.timed[True]) < TRIAL_BLOCKS:
            self.split = (trial_step // BLOCK_STEPS) % 2 == 1
            return None
        shared, split = rate(self.timed[False]), rate(self.timed[True])
        self.keep_split = self.split = split > (1 + MIN_GAIN) * shared
        return (
            f"{'half' if self.split else 'all'} of {self.total} CPU threads each for the trainer and the rollout "
            f"thread from now on: {split:.4g} batch tokens a second with half, {shared:.4g} with all "
            f"({TRIAL_BLOCKS} timed steps each)"
        )

    def rollout(self) -> int:
        return max(1, self.total // 2) if self.split else self.total

    def trainer(self) -> int:
        return max(1, self.total - self.total // 2) if self.split else self.total


def rate(timed: list[tuple[float, float]]) -> float:
    """Tokens a second over the timed steps: their tokens over their seconds, so a long step weighs by its length."""
    seconds = sum(wall for _, wall in timed)
    return sum(tokens for tokens, _ in timed) / seconds if seconds > 0 else 0.0
