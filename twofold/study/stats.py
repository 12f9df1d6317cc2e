"""Statistics over seeds for `twofold report`: t intervals of a seed mean, exact paired tests, Holm's
adjustment over a family of tests, Fisher's exact test of collapse counts, a ranking that ties overlapping
intervals, collapse detection (a run that stops answering, or stops learning).

Why t and not a percentile bootstrap: with n seeds the percentile bootstrap interval is the range of the
seeds up to n = 3 and still too narrow at 5 (it covers about 84% of the time for normal data, not 95%),
so two tied sources would look separated by chance. The t interval widens with the few degrees of freedom
a handful of seeds gives; it is still only nominally 95% when seeds collapse (a bimodal sample), which
the report says next to it.

Why exact tests: at 3-6 seeds no large-sample approximation holds. The sign-flip test enumerates every
one of the 2^n sign assignments of the paired differences, the sign test counts signs against
Binomial(m, 1/2); both are exact at any n, and both have a floor: with n pairs no two-sided p can be under
2 / 2^n (0.0625 at 5 pairs), which is what "no significant difference" means at that n.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

SIGN_FLIP_EXACT_MAX = 16  # 2^16 sign assignments enumerated; more pairs draw SIGN_FLIP_DRAWS of them
SIGN_FLIP_DRAWS = 2**16


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


@dataclass(frozen=True)
class PValues:
    """A test's p-values against each alternative: `greater` (the effect is above 0, or the first count is
    larger), `less`, and `two_sided`."""

    greater: float
    less: float
    two_sided: float


def _without_nans(values: list[float]) -> np.ndarray:
    return np.array([v for v in values if v == v], dtype=float)


def t_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """mean +- t_{n-1, (1 + confidence) / 2} * s / sqrt(n), s the sample standard deviation (ddof 1), NaNs
    dropped; one value, or n equal ones, give a point; none gives NaN."""
    x = _without_nans(values)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if len(x) == 1 or np.all(x == x[0]):
        return Interval(mean, mean, mean)
    from scipy.stats import t

    half = float(t.ppf((1 + confidence) / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half)


def paired_differences(values: dict[int, float], reference: dict[int, float]) -> list[float]:
    """values[s] - reference[s] over the seeds s both have, in seed order (a paired comparison: the same seed
    sees the same levels in the same order under every source)."""
    return [values[s] - reference[s] for s in sorted(set(values) & set(reference))]


def sign_flip_test(differences: list[float], seed: int = 0) -> PValues:
    """Exact permutation test of paired differences d_1..d_n (NaNs dropped). Under H0 each d_i is symmetric
    about 0, so each of the 2^n sign assignments e of S(e) = sum e_i |d_i| is equally likely; p is the share
    of them with S >= sum d (greater), S <= sum d (less), |S| >= |sum d| (two-sided). Enumerated up to
    SIGN_FLIP_EXACT_MAX pairs; beyond, SIGN_FLIP_DRAWS random assignments (seeded), p = (1 + hits) / (1 + draws).
    No pairs: p = 1 (no evidence)."""
    d = _without_nans(differences)
    if len(d) == 0:
        return PValues(1.0, 1.0, 1.0)
    if len(d) <= SIGN_FLIP_EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(SIGN_FLIP_DRAWS, len(d)))
    sums = signs @ np.abs(d)
    observed = float(d.sum())
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # sums of the same terms in another order may differ in ulps
    hits = (np.sum(sums >= observed - tol), np.sum(sums <= observed + tol), np.sum(np.abs(sums) >= abs(observed) - tol))
    if len(d) <= SIGN_FLIP_EXACT_MAX:
        return PValues(*(float(h) / len(sums) for h in hits))
    return PValues(*(float(1 + h) / (1 + len(sums)) for h in hits))


def sign_test(differences: list[float]) -> PValues:
    """Exact sign test of paired differences (NaNs and zeros dropped): k positives among the m others, against
    K ~ Binomial(m, 1/2): greater = P(K >= k), less = P(K <= k), two-sided = min(1, 2 min(greater, less)).
    No nonzero difference: p = 1."""
    d = _without_nans(differences)
    k, m = int(np.sum(d > 0)), int(np.sum(d != 0))
    if m == 0:
        return PValues(1.0, 1.0, 1.0)
    greater = sum(math.comb(m, i) for i in range(k, m + 1)) / 2**m
    less = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return PValues(greater, less, min(1.0, 2 * min(greater, less)))


def smallest_two_sided_p(pairs: int) -> float:
    """The smallest two-sided p an exact paired test (sign-flip or sign) can give with `pairs` pairs: every
    difference of one sign, 2 / 2^n."""
    return min(1.0, 2.0 / 2**pairs)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment over a family of m tests (NaNs are not tests: they stay NaN and do not
    count in m). With the p sorted p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)),
    returned in the input order. Rejecting where adj <= alpha keeps the family-wise error <= alpha."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p == p)
    out = [math.nan] * len(p_values)
    running = 0.0
    for j, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - j) * p))
        out[i] = running
    return out


def fisher_collapses(collapsed: int, runs: int, ref_collapsed: int, ref_runs: int) -> PValues:
    """Fisher's exact test on the 2x2 table [[collapsed, runs - collapsed], [ref_collapsed, ref_runs -
    ref_collapsed]]: `greater` is the alternative that the first source's runs collapse more often."""
    from scipy.stats import fisher_exact

    table = [[collapsed, runs - collapsed], [ref_collapsed, ref_runs - ref_collapsed]]
    return PValues(*(float(fisher_exact(table, alternative=a).pvalue) for a in ("greater", "less", "two-sided")))


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
