"""Statistics over seeds for `twofold report`: confidence intervals of a seed mean (Student t for the
figures that rank sources, bootstrap for the bands on curves), paired differences, a ranking that ties
overlapping intervals, collapse detection (a run that stops answering, or stops learning).

Why t and not the bootstrap for ranking: with n seeds the percentile bootstrap interval is the range of the
seeds up to n = 3 (each extreme resample has probability n^-n > 2.5%) and still too narrow at 5, so two
tied sources would look separated by chance (for 2 seeds each, 1 time in 3). The t interval widens with the
few degrees of freedom that a handful of seeds gives.

Bootstrap of a mean over n seeds: with n <= EXACT_MAX_SEEDS the bootstrap distribution is enumerated
exactly (all n^n equally likely resamples; the multinomial counts make that cheap), so an interval is
deterministic and can be checked by hand; with more seeds `scipy.stats.bootstrap` draws resamples (fixed
seed). Intervals are percentile intervals: the lower bound is the smallest resample mean whose
cumulative probability reaches alpha/2, the upper the smallest reaching 1 - alpha/2 (numpy's
"inverted_cdf" quantile). The enumeration is written here because scipy has no exact bootstrap, and
with the 3-6 seeds of a typical comparison a random bootstrap would move its bounds between runs.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

EXACT_MAX_SEEDS = 6
SCIPY_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def within(self, low: float, high: float) -> Interval:
        """The interval cut to [low, high], the range the quantity can take (a rate, a difference of rates)."""
        return Interval(self.mean, max(self.low, low), min(self.high, high))

    def above(self, other: Interval) -> bool:
        """Wholly above `other`: its lower bound exceeds the other's upper bound."""
        return self.low > other.high


@functools.cache
def _compositions(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every way to draw n seeds from n with replacement, as counts [K, n], and each one's probability
    n! / prod(c!) / n^n (K = C(2n-1, n): 10 for 3 seeds, 462 for 6)."""
    counts, probs = [], []
    for combo in itertools.combinations_with_replacement(range(n), n):
        c = np.bincount(combo, minlength=n)
        counts.append(c)
        probs.append(math.factorial(n) / math.prod(math.factorial(int(k)) for k in c) / n**n)
    return np.array(counts, dtype=float), np.array(probs)


def _exact_bootstrap_means(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(means, probabilities) of every distinct resample (with replacement, size n) of `values`."""
    counts, probs = _compositions(len(values))
    return counts @ values / len(values), probs


def _inverted_cdf(means: np.ndarray, probs: np.ndarray, q: float) -> float:
    order = np.argsort(means, kind="stable")
    cdf = np.cumsum(probs[order])
    idx = int(np.searchsorted(cdf, q - 1e-12))  # the first whose cumulative probability reaches q
    return float(means[order][min(idx, len(order) - 1)])


def _without_spread(values: list[float]) -> tuple[np.ndarray, Interval | None]:
    """The values without NaNs, and their interval when there is no spread to estimate: NaN for none, a
    point for one value or n equal ones; None otherwise."""
    x = np.array([v for v in values if v == v], dtype=float)
    if len(x) == 0:
        return x, Interval(math.nan, math.nan, math.nan)
    if len(x) == 1 or np.all(x == x[0]):
        return x, Interval(float(x[0]), float(x[0]), float(x[0]))
    return x, None


def bootstrap_mean(values: list[float], confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of `values` (NaNs dropped)."""
    x, fixed = _without_spread(values)
    if fixed is not None:
        return fixed
    mean = float(x.mean())
    alpha = 1.0 - confidence
    if len(x) <= EXACT_MAX_SEEDS:
        means, probs = _exact_bootstrap_means(x)
        return Interval(mean, _inverted_cdf(means, probs, alpha / 2), _inverted_cdf(means, probs, 1 - alpha / 2))
    from scipy.stats import bootstrap

    res = bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=SCIPY_RESAMPLES,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return Interval(mean, float(res.confidence_interval.low), float(res.confidence_interval.high))


def t_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """mean +- t_{n-1, (1 + confidence) / 2} * s / sqrt(n), s the sample standard deviation (ddof 1), NaNs
    dropped; one value, or n equal ones, give a point."""
    x, fixed = _without_spread(values)
    if fixed is not None:
        return fixed
    mean = float(x.mean())
    from scipy.stats import t

    half = float(t.ppf((1 + confidence) / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half)


def paired_difference(values: dict[int, float], reference: dict[int, float], confidence: float = 0.95) -> Interval:
    """t interval of mean(values[s] - reference[s]) over the seeds s both have (a paired comparison: the same
    seed sees the same levels in the same order under every source)."""
    seeds = sorted(set(values) & set(reference))
    return t_interval([values[s] - reference[s] for s in seeds], confidence)


def tied_ranks(intervals: dict[str, Interval]) -> dict[str, int]:
    """Rank = 1 + the number of others whose interval lies wholly above this one: sources whose intervals
    overlap are never ordered against each other, so the best tied group is everything at rank 1."""
    return {
        name: 1 + sum(other.above(iv) for o, other in intervals.items() if o != name) for name, iv in intervals.items()
    }


def trailing_means(values: list[float], window: int) -> list[float]:
    """Each value's mean with the `window - 1` before it (fewer at the start), NaN entries left out."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def window_means(rates: list[float], window: int) -> list[tuple[int, float]]:
    """(step, mean of the `window` steps ending there) for each full window, NaN entries left out."""
    return [(i + 1, m) for i, m in enumerate(trailing_means(rates, window)) if i >= window - 1]


def collapse_step(rates: list[float], threshold: float, window: int = 3) -> int | None:
    """The first step (1-based) whose `window`-step mean of `rates` falls under `threshold`, or None."""
    return next((step for step, m in window_means(rates, window) if m < threshold), None)


def recovery_step(rates: list[float], threshold: float, window: int = 3) -> int | None:
    """The first step (1-based) from which every `window`-step mean of `rates` to the end is back at or over
    `threshold`, when an earlier one fell under it; None if the run ends under it, or never fell. A dip from a
    hard batch (tool-use tasks differ a lot step to step) then reads apart from a policy that stays broken."""
    means = window_means(rates, window)
    last_under = max((step for step, m in means if m < threshold), default=None)
    if last_under is None or last_under == means[-1][0]:
        return None
    return last_under + 1


def stuck_step(values: list[float], min_steps: int) -> int | None:
    """The first step (1-based) of the run's final stretch of at least `min_steps` steps whose `values` are all
    0, when some earlier step was above 0; else None. On success rates: a policy that succeeded before and
    now fails every episode alike gets all-zero group advantages, so zero gradients: it cannot recover."""
    n = len(values)
    start = n
    while start > 0 and values[start - 1] == 0:
        start -= 1
    if n - start < min_steps or not any(v > 0 for v in values[:start]):
        return None
    return start + 1
