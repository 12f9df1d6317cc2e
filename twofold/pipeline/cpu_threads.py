"""How an async run in one process shares torch's CPU threads between the trainer and the rollout thread."""

from __future__ import annotations

import math
import statistics

WARMUP_STEPS = 1  # the first step fills the pipeline (the trainer waits for every rollout): not timed
TIMED_STEPS = 2  # a block's last steps, timed together, after the steps it lets settle (the staleness window)
MIN_PAIRS = 3  # pairs of blocks (one each way) before the trial may decide
MAX_PAIRS = 8  # the trial ends here, or at MAX_TRIAL_STEPS, whichever comes first; an undecided bound: the mean
MAX_TRIAL_STEPS = 64  # with a wide staleness window the blocks are long: fewer pairs, never fewer than MIN_PAIRS
MIN_GAIN = 0.05  # the split is kept only if it is measured at least this much faster
# One-sided 95% quantiles of Student's t by degrees of freedom (pairs - 1): the bound on the mean log-ratio.
T95 = {2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895}


class CpuThreads:
    """torch's CPU threads for the trainer and for the rollout thread (each thread has its own OpenMP team), measured
    in the run and then fixed (`run.split_cpu_threads`).

    Why: in async mode the two compute at once, and two teams of every thread on the same cores oversubscribe them.
    Whether giving each side half pays depends on the kernels and on what bounds the step: on the tiny model each op
    is too small for two threads to share, the teams' spinning dominates, and the split made the single-turn async
    step 1.6x faster; on SmolLM2-135M the trainer's GEMMs use both threads well, and the split made the step 22-45%
    slower (docs/benchmarks.md). So the run measures it on its own mix of steps.

    The trial: after `WARMUP_STEPS`, blocks run one way each, in pairs (one block shared, one split), the order
    turning each pair (shared-split, split-shared, ...) so that a trend (replies growing, caches warming) cancels
    rather than favouring one way. A step in async mode trains on rollouts generated up to W = `settle_steps`
    (max_staleness, at least 1: a switch lands within a token) steps before it (with `stale_policy: drop`), and a
    full rollout queue lets a step go at the trainer's pace while generation falls behind for later ones; so a block
    first runs W steps untimed, and then times `TIMED_STEPS` steps together, whose batches were generated under the
    block's own setting. A pair gives d = log(split's batch tokens a second /
    shared's). Steps of an agent run differ several-fold in length and in what bounds them, so one pair says little:
    from `MIN_PAIRS` pairs on, the split is kept once the one-sided 95% t bound on the mean d is above
    log(1 + `MIN_GAIN`), every thread stays shared once the upper bound is below it, and at the last pair
    (`MAX_PAIRS`, fewer where `MAX_TRIAL_STEPS` ends the trial first) a trial the bound left undecided is decided by
    the mean (the split if it is above the threshold): a difference the bound cannot resolve costs little either way.

    While the trainer waits for rollouts (`trainer_waiting`) it computes nothing, so under the split the rollout
    thread takes every thread meanwhile: on agent tasks generation is what the trainer waits for, and its half would
    otherwise idle for that part of the step. The rollout thread asks where it asks for joiners (before each token
    while its batch has room, else between generate calls), so the loan follows the wait within a token or a call."""

    def __init__(self, total: int, settle_steps: int):
        self.total = total
        self.block_steps = settle_steps + TIMED_STEPS
        self.max_pairs = max(MIN_PAIRS, min(MAX_PAIRS, MAX_TRIAL_STEPS // (2 * self.block_steps)))
        self.split = False
        self.keep_split: bool | None = None  # the trial's verdict, once measured
        self.steps = 0  # steps observed
        self.timed_tokens = self.timed_seconds = 0.0  # the current block's timed steps, summed
        self.block_rate: dict[bool, float] = {}  # the current pair's timed rate by split
        self.log_ratios: list[float] = []  # d of each finished pair
        self.trainer_waiting = False  # set by the trainer's thread, read by the rollout thread (a bool: no lock)

    def observe(self, tokens: float, wall: float) -> str | None:
        """The last step: `tokens` in its batch, trained in `wall` seconds with the current split. Sets the split for
        the next step and returns the trial's verdict, in words, on the step that decides it."""
        self.steps += 1
        if self.keep_split is not None or self.total < 2:
            return None
        trial_step = self.steps - WARMUP_STEPS  # 1, 2, ... within the trial
        if trial_step < 1:
            return None
        block, in_block = divmod(trial_step - 1, self.block_steps)  # in_block 0, 1, ...
        if in_block >= self.block_steps - TIMED_STEPS:
            self.timed_tokens += tokens
            self.timed_seconds += wall
        if in_block == self.block_steps - 1:  # a block's last step
            seconds = self.timed_seconds
            self.block_rate[self.split] = self.timed_tokens / seconds if seconds > 0 else 0.0
            self.timed_tokens = self.timed_seconds = 0.0
            if len(self.block_rate) == 2:
                shared, split = self.block_rate[False], self.block_rate[True]
                self.log_ratios.append(math.log(split / shared) if shared > 0 and split > 0 else 0.0)
                self.block_rate = {}
                verdict = self._decide()
                if verdict:
                    return verdict
            block += 1
        self.split = split_in_block(block)  # the next step's block
        return None

    def _decide(self) -> str | None:
        """The verdict once the pairs so far settle it (or the trial is at its end), else None."""
        n = len(self.log_ratios)
        if n < MIN_PAIRS:
            return None
        low, high = ratio_bounds(self.log_ratios)
        threshold = math.log(1 + MIN_GAIN)
        if low <= threshold <= high and n < self.max_pairs:
            return None
        mean = statistics.fmean(self.log_ratios)
        settled = not low <= threshold <= high
        self.keep_split = self.split = low > threshold if settled else mean > threshold
        gain = f"{1 + MIN_GAIN:.2f}x"
        if settled:
            why = f"bounded {'above' if self.split else 'below'} {gain}"
        else:
            why = f"the bounds straddle {gain} after {n} pairs: the mean, {'above' if self.split else 'below'}"
            why += " it, decides"
        return (
            f"{'half' if self.split else 'all'} of {self.total} CPU threads each for the trainer and the rollout "
            f"thread from now on: half ran {math.exp(mean):.3g}x the batch tokens a "
            f"second of all (95% bounds {math.exp(low):.3g}-{math.exp(high):.3g}x over {n} pairs of blocks, "
            f"{TIMED_STEPS} steps timed in each after {self.block_steps - TIMED_STEPS} let settle; {why})"
        )

    def rollout(self) -> int:
        return max(1, self.total // 2) if self.split and not self.trainer_waiting else self.total

    def trainer(self) -> int:
        return max(1, self.total - self.total // 2) if self.split else self.total


def split_in_block(block: int) -> bool:
    """Whether trial block `block` (0, 1, ...) runs split: pairs alternate shared-split and split-shared."""
    pair, second = divmod(block, 2)
    return bool(second) != bool(pair % 2)


def ratio_bounds(log_ratios: list[float]) -> tuple[float, float]:
    """One-sided 95% bounds (low, high) on the mean of `log_ratios`: mean -/+ t(n-1) * sd / sqrt(n)."""
    n = len(log_ratios)
    mean = statistics.fmean(log_ratios)
    half = T95[n - 1] * statistics.stdev(log_ratios) / math.sqrt(n)
    return mean - half, mean + half
