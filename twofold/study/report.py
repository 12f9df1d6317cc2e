"""`twofold report RUN_DIR...`: what each old-logit source costs and what it buys, from run directories.

Runs are grouped by label (the old-logit source, plus mode and window when those differ between runs);
seeds of one label are averaged (mean and spread). Runs made with `oldlogits.audit=true` feed only the
approximation-error section, since their snapshots distort timing.

The recommendation is by non-inferiority to the best exact source: the cheapest source whose paired
difference in final success to it has a 95% t lower bound above -margin and which has no more runs ending
collapsed (`recommendation`). Collapses are counted and tested apart (Fisher's exact test) from the success
of the runs that did not collapse, since a collapsed run's 0 would otherwise dominate a 5-seed mean.

Outputs: `report.html` (self-contained: the PNGs are embedded), the PNGs themselves, and `summary.md`
(the tables, also printed to the terminal).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from twofold import metrics as M
from twofold.config import EXACT_SOURCES, ConfigError
from twofold.pipeline.rundir import heldout_result, read_metrics
from twofold.rollout.versions import LAG_BUCKETS
from twofold.study.stats import (
    Interval,
    collapse_step,
    fisher_collapses,
    holm,
    paired_differences,
    recovery_step,
    sign_flip_test,
    sign_test,
    smallest_two_sided_p,
    stuck_step,
    t_interval,
    tied_ranks,
    trailing_means,
)

SMOOTH = 5  # moving-average window (steps) for success curves and "best success"
SECTIONS = {
    "recommendation": "Which source: recommendation, ranking, collapses and paired comparisons",
    "learning-curves": "Success and reward vs step (seed mean and its t band over seeds, nominal 95%: with few "
    "seeds, and runs that collapse, it covers less; x: a run's collapse)",
    "wall-clock": "Success and reward vs wall-clock (the same t bands)",
    "active-ratio": "Active-token ratio (tokens surviving both the r_d mask and the PPO clip)",
    "kl-split": "Discrepancy KL vs staleness KL",
    "clip-mask": "Clip and mask fractions",
    "audit": "Approximation error vs exact old log-probs (audit runs): per step, and against token lag",
    "ewma-resets": "PPO-EWMA resets",
    "overhead-table": "Cost and quality per source",
    "regime": "The regime: staleness and discrepancy each source saw",
}
# A run has collapsed once its 3-step mean valid-action rate falls under this (the policy stopped answering),
# or once it ends on at least STUCK_STEPS steps of 0 success after succeeding before (it stopped learning).
COLLAPSE_VALID_RATE = 0.5
STUCK_STEPS = 10
MIN_RANKED_SEEDS = 2  # a one-seed "interval" is a point: it would order sources on noise alone
NEGLIGIBLE_WORK = 0.01  # old-logit work per step differing by less than this share of a step is no cost
# Shares, whose t bands are cut to [0, 1]: a symmetric band around a mean near 0 would reach below it.
SHARES = frozenset(
    {M.SUCCESS_RATE, M.FORMAT_OK_RATE, M.ACTIVE_TOKEN_RATIO, M.CLIP_FRAC_LOW, M.CLIP_FRAC_HIGH, M.MASK_FRAC}
)
NONINFERIORITY_MARGIN = 0.05  # `--margin`: the final success a cheaper source may lose against the exact one


@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]
    heldout_record: dict | None = None  # its HELDOUT_FILE (`rundir.heldout_result`), read once with the metrics

    @property
    def source(self) -> str:
        return self.config["oldlogits"]["source"]

    @property
    def audit(self) -> bool:
        return bool(self.config["oldlogits"].get("audit"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def series(self, key: str) -> list[float]:
        return [_num(r.get(key)) for r in self.rows]

    def values(self, key: str, skip_first: bool = True) -> list[float]:
        """A per-step metric's values, NaN left out, and the first step (pipeline fill) too when asked."""
        return [v for v in self.series(key)[1 if skip_first and len(self.rows) > 1 else 0 :] if not math.isnan(v)]

    def mean_of(self, key: str, skip_first: bool = True) -> float:
        vals = self.values(key, skip_first)
        return sum(vals) / len(vals) if vals else math.nan

    def final_success(self) -> float:
        """Mean success over the last SMOOTH steps."""
        tail = [v for v in self.series(M.SUCCESS_RATE)[-SMOOTH:] if v == v]
        return sum(tail) / len(tail) if tail else math.nan

    def heldout(self) -> float:
        """Success of the final checkpoint on held-out tasks (`twofold compare --heldout`); NaN where not scored."""
        return math.nan if self.heldout_record is None else self.heldout_record["success_rate"]

    def heldout_setting(self) -> tuple | None:
        """(evaluation seed, episodes) of the held-out score: which tasks it played; None where not scored."""
        found = self.heldout_record
        return None if found is None else (found.get("eval_seed"), found.get("episodes_requested"))

    def best_success(self) -> float:
        """Best SMOOTH-step mean of success (full windows only, unless the run is shorter)."""
        sm = trailing_means(self.series(M.SUCCESS_RATE), SMOOTH)
        vals = [v for v in (sm[SMOOTH - 1 :] or sm) if v == v]
        return max(vals, default=math.nan)

    def _collapse_steps(self) -> tuple[int | None, int | None, int | None]:
        """(stopped answering, answering again, success stuck at 0): the step of each, None where it did not."""
        valid = self.series(M.FORMAT_OK_RATE)
        return (
            collapse_step(valid, COLLAPSE_VALID_RATE),
            recovery_step(valid, COLLAPSE_VALID_RATE),
            stuck_step(self.series(M.SUCCESS_RATE), STUCK_STEPS),
        )

    def collapse(self) -> tuple[int, str] | None:
        """(step, how) of the run's first collapse: it stopped answering, or stopped learning; None if neither."""
        stopped, recovered, stuck = self._collapse_steps()
        found = [
            (stopped, "stopped answering" + (f", answering again from step {recovered}" if recovered else "")),
            (stuck, "success stuck at 0"),
        ]
        return min(((step, how) for step, how in found if step is not None), default=None)

    def collapse_step(self) -> int | None:
        found = self.collapse()
        return found[0] if found else None

    def ended_collapsed(self) -> bool:
        """Whether the run ends collapsed: success stuck at 0, or valid answers under the threshold with no
        recovery to the end (a dip it came back from does not count)."""
        stopped, recovered, stuck = self._collapse_steps()
        return stuck is not None or (stopped is not None and recovered is None)

    def stale_dropped_groups(self) -> float:
        """Groups the run dropped as more than W versions old (the counter is cumulative: its last value)."""
        counts = self.values(M.STALE_DROPPED_GROUPS, skip_first=False)
        return counts[-1] if counts else math.nan


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.runs[0].source

    def mean_curve(self, key: str) -> list[Interval]:
        """Per step, the mean over seeds with its t interval (nominal 95%; cut to [0, 1] for SHARES), up to the
        shortest run."""
        curves = [r.series(key) for r in self.runs]
        n = min(len(c) for c in curves)
        bands = [t_interval([c[i] for c in curves]) for i in range(n)]
        return [iv.within(0.0, 1.0) for iv in bands] if key in SHARES else bands

    def kept_runs(self) -> list[Run]:
        """The runs that did not end collapsed."""
        return [r for r in self.runs if not r.ended_collapsed()]

    def interval_of(self, per_run, runs: list[Run] | None = None) -> Interval:
        """Mean over seeds of a per-run success figure (e.g. `Run.final_success`) of `runs` (default: all),
        with its 95% t interval cut to [0, 1], where a success rate lives."""
        return t_interval([per_run(r) for r in (self.runs if runs is None else runs)]).within(0.0, 1.0)

    def heldout_interval(self) -> Interval:
        """Mean held-out success over the runs that were scored (`t_interval` drops the NaN of the others), with
        its 95% t interval cut to [0, 1]."""
        return self.interval_of(Run.heldout)

    def heldout_text(self) -> str:
        """`heldout_interval` as text, with how many of the runs it is over when some were not scored."""
        scored = sum(r.heldout() == r.heldout() for r in self.runs)
        text = _interval_text(self.heldout_interval())
        return text if scored in (0, len(self.runs)) else f"{text} ({scored} of {len(self.runs)} scored)"

    def stale_dropped_text(self) -> str:
        """Stale-dropped groups per run: the mean, and the range over seeds when they differ; '-' if not logged."""
        counts = [c for c in (r.stale_dropped_groups() for r in self.runs) if c == c]
        if not counts:
            return "-"
        mean = f"{sum(counts) / len(counts):.3g}"
        return mean if min(counts) == max(counts) else f"{mean} ({min(counts):.0f}-{max(counts):.0f})"

    def mean_of(self, key: str, skip_first: bool = True) -> float:
        """Mean of a per-step metric over all steps and seeds (the first step, pipeline fill, left out)."""
        vals = [v for r in self.runs for v in r.values(key, skip_first)]
        return sum(vals) / len(vals) if vals else math.nan

    def seed_interval(self, key: str) -> Interval:
        """Mean over seeds of each run's mean of a per-step metric (e.g. seconds per step), with its 95% t
        interval: how much of a difference between two labels is seed-to-seed noise."""
        return t_interval([r.mean_of(key) for r in self.runs])


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def load_runs(paths: list[Path]) -> list[Run]:
    """Run directories among `paths` (each a run directory or a folder of them, e.g. a compare grid)."""
    runs = []
    for p in paths:
        candidates = (
            [p] if (p / "metrics.jsonl").exists() else sorted(q for q in p.iterdir() if (q / "metrics.jsonl").exists())
        )
        for q in candidates:
            rows = read_metrics(q / "metrics.jsonl")
            if rows and (q / "config.yaml").exists():
                runs.append(Run(q, yaml.safe_load((q / "config.yaml").read_text()), rows, heldout_result(q)))
    return runs


def group_runs(runs: list[Run]) -> list[Group]:
    """Group by source; add mode, window and admission (`rollout.start_ahead`, when set) to the label when runs
    differ in them."""

    def admission(r: Run) -> tuple:
        window = r.config["max_staleness"]
        ahead = r.config.get("rollout", {}).get("start_ahead", -1)  # configs from before the field: -1
        return r.config["mode"], window, -1 if ahead == window else ahead  # A = W is the default's admission

    varied = len({admission(r) for r in runs}) > 1

    def label(r: Run) -> str:
        if not varied:
            return r.source
        mode, window, ahead = admission(r)
        if mode != "async":
            return f"{mode} {r.source}"
        return f"{mode} W={window}{f' ahead={ahead}' if ahead >= 0 else ''} {r.source}"

    groups: dict[str, Group] = {}
    for r in runs:
        groups.setdefault(label(r), Group(label(r))).runs.append(r)
    return list(groups.values())


def _nan_last(v: float) -> float:
    """A sort key that puts a missing (NaN) figure after every real one."""
    return math.inf if math.isnan(v) else v


def _interval_text(iv: Interval, signed: bool = False) -> str:
    f = "+.3g" if signed else ".3g"
    return "-" if math.isnan(iv.mean) else f"{iv.mean:{f}} [{iv.low:{f}}, {iv.high:{f}}]"


def source_table(groups: list[Group], audit_groups: list[Group]) -> list[dict]:
    """One row per label: seconds per step and its split, overhead vs `behavior`, memory, regime, success.

    Success columns: `final success` is the seed mean of each run's last SMOOTH steps, with its t interval
    (nominal 95%) in `final 95% t CI`; `rank` ties sources whose intervals overlap (`stats.tied_ranks`),
    among the sources with at least MIN_RANKED_SEEDS seeds (the others' rank is NaN, shown '-');
    `collapsed` counts runs that collapsed (`Run.collapse`), with the step and how; `ended collapsed`
    counts those still collapsed at their last step (`Run.ended_collapsed`). `lag mean` and
    `stale-dropped/run` say what the training stream held: success is measured on the groups that
    finished in time, and which groups those are differs by source.
    """
    baseline = next((g.mean_of(M.STEP_SECONDS) for g in groups if g.label.endswith("behavior")), math.nan)
    audit = {g.label: g.mean_of(M.AUDIT_ABS_ERR_MEAN, skip_first=False) for g in audit_groups}
    finals = {g.label: g.interval_of(Run.final_success) for g in groups}
    heldout = {g.label: g.heldout_interval() for g in groups}
    ranks = tied_ranks({g.label: finals[g.label] for g in groups if len(g.runs) >= MIN_RANKED_SEEDS})
    table = []
    for g in groups:
        step_s = g.mean_of(M.STEP_SECONDS)
        best = g.interval_of(Run.best_success)
        collapses = [(r.seed, r.collapse()) for r in g.runs]
        steps = [f"seed {s} at step {c[0]}, {c[1]}" for s, c in collapses if c is not None]
        table.append(
            {
                "source": g.label,
                "seeds": len(g.runs),
                "steps": min(len(r.rows) for r in g.runs),
                "s/step": step_s,
                "s/step 95% t CI": g.seed_interval(M.STEP_SECONDS),
                **{f"{p} s": g.mean_of(M.time_part(p)) for p in M.TIME_PARTS},
                "extra vs behavior": (step_s / baseline - 1) if baseline == baseline else math.nan,
                "peak extra MB": max(
                    max((v for v in r.series(M.OLDLOGIT_PEAK_BYTES) if v == v), default=0) for r in g.runs
                )
                / 2**20,
                "lag mean": g.mean_of(M.STALENESS_MEAN, skip_first=False),
                "stale-dropped/run": g.stale_dropped_text(),
                "active ratio": g.mean_of(M.ACTIVE_TOKEN_RATIO, skip_first=False),
                "KL disc": g.mean_of(M.KL_DISCREPANCY_K3, skip_first=False),
                "KL stale": g.mean_of(M.KL_STALENESS_K3, skip_first=False),
                "audit err": audit.get(g.label, math.nan),
                "final success": finals[g.label].mean,
                "final 95% t CI": _interval_text(finals[g.label]),
                "held-out success": heldout[g.label].mean,
                "held-out 95% t CI": g.heldout_text(),
                "best success": best.mean,
                "best 95% t CI": _interval_text(best),
                "rank": ranks.get(g.label, math.nan),
                "collapsed": f"{len(steps)}/{len(g.runs)}" + (f" ({', '.join(steps)})" if steps else ""),
                "ended collapsed": sum(r.ended_collapsed() for r in g.runs),
            }
        )
    return table


RANKING_COLUMNS = (
    "rank",
    "source",
    "seeds",
    "final 95% t CI",
    "held-out 95% t CI",
    "s/step",
    "extra vs behavior",
    "peak extra MB",
    "lag mean",
    "stale-dropped/run",
    "collapsed",
)


def ranking_table(table: list[dict]) -> list[dict]:
    """The source table's ranking columns, best rank first (then by final success), unranked sources last."""

    def order(r: dict) -> tuple[float, float]:
        return (_nan_last(r["rank"]), _nan_last(-r["final success"]))

    rows = sorted(table, key=order)
    scored = any(r["held-out 95% t CI"] != "-" for r in rows)
    return [{k: r[k] for k in RANKING_COLUMNS if scored or k != "held-out 95% t CI"} for r in rows]


# ------------------------------------------------------------------ collapses and paired comparisons


@dataclass(frozen=True)
class Pairing:
    """One label against the reference (the best exact source): its runs ending collapsed, tested against the
    reference's by Fisher's exact test, and the paired differences of final success on the seeds where
    neither run ended collapsed, tested by the exact sign-flip and sign tests. Every p is two-sided; the
    `*_holm` ones are Holm-adjusted over the labels tested (the reference is not tested; NaN there)."""

    label: str
    is_reference: bool
    runs: int
    collapsed: int  # runs ending collapsed
    kept_success: Interval  # final success of the runs that did not end collapsed
    differences: tuple[float, ...]
    collapse_p: float = math.nan
    collapse_holm: float = math.nan
    sign_flip_p: float = math.nan
    sign_flip_holm: float = math.nan
    sign_p: float = math.nan
    sign_holm: float = math.nan

    @property
    def tested(self) -> bool:
        """Enough pairs for an interval (a one-pair "interval" is a point)."""
        return not self.is_reference and len(self.differences) >= MIN_RANKED_SEEDS

    @property
    def difference(self) -> Interval:
        """Paired t interval (nominal 95%) of the mean difference, cut to [-1, 1] (a difference of two rates)."""
        return t_interval(list(self.differences)).within(-1.0, 1.0)

    def shortfall(self, reference: Pairing, margin: float) -> str | None:
        """Why this label is not non-inferior to `reference` at `margin`; None when it is: no larger share of
        runs ending collapsed, and a paired difference whose lower 95% t bound is above -margin."""
        if self.is_reference:
            return None
        if self.collapsed * reference.runs > reference.collapsed * self.runs:
            return (
                f"more runs ending collapsed: {self.collapsed}/{self.runs} against "
                f"{reference.collapsed}/{reference.runs}"
            )
        if not self.tested:
            return f"{len(self.differences)} seed(s) where neither run ended collapsed, too few for an interval"
        if self.difference.low <= -margin:
            return f"paired lower bound {self.difference.low:+.3g}, not above {-margin:+.3g}"
        return None


def best_exact(groups: list[Group]) -> Group | None:
    """The reference of the paired comparisons: among the labels of an exact source (`EXACT_SOURCES`) with at
    least MIN_RANKED_SEEDS seeds, the one with the smallest share of runs ending collapsed, then the highest
    mean final success of the runs that did not; None without one."""

    def order(g: Group) -> tuple[float, float, str]:
        kept = g.kept_runs()
        return (1 - len(kept) / len(g.runs), _nan_last(-g.interval_of(Run.final_success, kept).mean), g.label)

    exact = [g for g in groups if g.source in EXACT_SOURCES and len(g.runs) >= MIN_RANKED_SEEDS]
    return min(exact, key=order, default=None)


def pairings(groups: list[Group], reference: Group | None) -> list[Pairing]:
    """Every label paired with `reference` (see `Pairing`); none without a reference."""
    if reference is None:
        return []

    def kept_finals(g: Group) -> dict[int, float]:
        return {r.seed: r.final_success() for r in g.kept_runs()}

    ref_collapsed = len(reference.runs) - len(reference.kept_runs())
    found = []
    for g in groups:
        mine = g is reference
        collapsed = len(g.runs) - len(g.kept_runs())
        diffs = () if mine else tuple(paired_differences(kept_finals(g), kept_finals(reference)))
        p = Pairing(g.label, mine, len(g.runs), collapsed, g.interval_of(Run.final_success, g.kept_runs()), diffs)
        tests = {}
        if not mine:
            tests["collapse_p"] = fisher_collapses(collapsed, len(g.runs), ref_collapsed, len(reference.runs)).two_sided
        if p.tested:
            tests["sign_flip_p"] = sign_flip_test(list(diffs)).two_sided
            tests["sign_p"] = sign_test(list(diffs)).two_sided
        found.append(dataclasses.replace(p, **tests))
    for name in ("collapse", "sign_flip", "sign"):
        adjusted = holm([getattr(p, f"{name}_p") for p in found])
        found = [dataclasses.replace(p, **{f"{name}_holm": a}) for p, a in zip(found, adjusted, strict=True)]
    return found


def paired_table(found: list[Pairing], margin: float = NONINFERIORITY_MARGIN) -> list[dict]:
    """One row per label: `Pairing`'s figures, the smallest two-sided p its number of pairs allows (2 / 2^n),
    and whether it is non-inferior to the reference at `margin` (with the reason when not)."""
    reference = next((p for p in found if p.is_reference), None)
    rows = []
    for p in found:
        if p.tested:
            diff = p.difference
        elif p.differences:
            diff = f"{p.differences[0]:+.3g} (1 pair, no interval)"
        else:
            diff = "-"
        why = p.shortfall(reference, margin) if reference else None
        rows.append(
            {
                "source": p.label,
                "ended collapsed": f"{p.collapsed}/{p.runs}",
                "Fisher p": p.collapse_p,
                "Fisher Holm": p.collapse_holm,
                "success if not collapsed, 95% t CI": p.kept_success,
                "pairs": "-" if p.is_reference else len(p.differences),
                "vs reference, 95% t CI": diff,
                "sign-flip p": p.sign_flip_p,
                "sign-flip Holm": p.sign_flip_holm,
                "sign p": p.sign_p,
                "sign Holm": p.sign_holm,
                "smallest p": smallest_two_sided_p(len(p.differences)) if p.tested else math.nan,
                f"non-inferior (margin {margin:g})": "reference"
                if p.is_reference
                else (f"no: {why}" if why else "yes"),
            }
        )
    return rows


def heldout_pairs(groups: list[Group], reference: Group | None) -> list[dict]:
    """Held-out success (`twofold compare --heldout`) of every label g against the reference's, paired by seed:
    d_s = h_g(s) - h_ref(s) over the seeds s both were scored on, with the same tasks (evaluation seed and
    episodes) as most of the reference's runs; runs scored otherwise are left out. Every run counts, a collapsed
    one with the score it got: on held-out tasks a collapse is an outcome, not a missing value. Per label: the
    mean of d with its 95% t interval, the exact two-sided sign-flip p, and Holm over the labels tested. Empty
    when the reference was not scored."""
    if reference is None:
        return []
    settings = [r.heldout_setting() for r in reference.runs if r.heldout_setting() is not None]
    if not settings:
        return []
    setting = max(settings, key=settings.count)

    def scored(g: Group) -> dict[int, float]:
        return {r.seed: r.heldout() for r in g.runs if r.heldout_setting() == setting}

    ref = scored(reference)
    rows, p_values = [], []
    for g in groups:
        if g is reference:
            continue
        diffs = paired_differences(scored(g), ref)
        tested = len(diffs) >= MIN_RANKED_SEEDS
        p_values.append(sign_flip_test(diffs).two_sided if tested else math.nan)
        rows.append(
            {
                "source": g.label,
                "pairs": len(diffs),
                "vs reference, held out, 95% t CI": t_interval(diffs).within(-1.0, 1.0) if tested else "-",
                "sign-flip p": p_values[-1],
                "sign-flip Holm": math.nan,
                "smallest p": smallest_two_sided_p(len(diffs)) if tested else math.nan,
            }
        )
    return [{**row, "sign-flip Holm": a} for row, a in zip(rows, holm(p_values), strict=True)]


# ------------------------------------------------------------------ the recommendation


def _cheapest(best: list[dict]) -> tuple[dict, list[dict], list[dict]]:
    """(pick, as fast, as cheap): the cheapest source of `best`, the sources as fast as the fastest, and
    those of them that also tie on memory and old-logit work."""
    # Time first, tied like success: sources whose s/step intervals overlap the fastest one's are equally fast
    # (async timing moves with each run's staleness), and extra memory, then old-logit work, decide among them.
    fastest = min(best, key=lambda r: _nan_last(r["s/step"]))
    as_fast = [r for r in best if r["s/step 95% t CI"].overlaps(fastest["s/step 95% t CI"])] or [fastest]
    lightest = [r for r in as_fast if r["peak extra MB"] == min(x["peak extra MB"] for x in as_fast)]
    least_work = min(_nan_last(r["old_logits s"]) for r in lightest)
    # Old-logit work within 1% of a step (copying mu, say) is no cost: then the higher mean success decides.
    as_cheap = [r for r in lightest if _nan_last(r["old_logits s"]) <= least_work + NEGLIGIBLE_WORK * fastest["s/step"]]
    pick = min(as_cheap, key=lambda r: (-r["final success"], r["source"]))
    return pick, as_fast, as_cheap


def _cost_text(pick: dict, as_fast: list[dict], as_cheap: list[dict]) -> str:
    """The pick's cost, and the ties on cost that `_cheapest` broke to reach it."""
    text = (
        f"Its cost: {pick['s/step']:.3g} s/step ({format_cell('extra vs behavior', pick['extra vs behavior'])} vs "
        f"behavior), {pick['peak extra MB']:.3g} MB of extra memory and {format_cell('', pick['old_logits s'])} s "
        "of old-logit work per step"
    )
    if len(as_fast) > 1:
        names = ", ".join(r["source"] for r in as_fast)
        text += f" (s/step of {names} overlap at 95%: memory, then old-logit work decide"
        if len(as_cheap) > 1:
            names = ", ".join(r["source"] for r in as_cheap)
            text += (
                f"; {names} also tie on those, old-logit work within {NEGLIGIBLE_WORK:.0%} of a step, "
                "so the higher mean final success decides"
            )
        text += ")"
    return text + "."


def _tied_group_rule(rows: list[dict]) -> str:
    """Without an exact source to pair against: the cheapest of the best tied group by final success."""
    best = sorted((r for r in rows if r["rank"] == 1), key=lambda r: (-r["final success"], r["source"]))
    pick, as_fast, as_cheap = _cheapest(best)
    exact = ", ".join(EXACT_SOURCES)
    text = (
        f"Recommended: {pick['source']}, by the tied-group rule: no exact source ({exact}) has "
        f"{MIN_RANKED_SEEDS} seeds here to test non-inferiority against, so the cheapest of the best tied group "
        f"(95% t intervals of final success overlap): {', '.join(r['source'] for r in best)}. "
        f"Final success {pick['final 95% t CI']}."
    )
    return text + (" " + _cost_text(pick, as_fast, as_cheap) if len(best) > 1 else "")


def _noninferiority_rule(rows: list[dict], found: list[Pairing], margin: float) -> str:
    """The cheapest source non-inferior to the reference at `margin`; the reference itself when none is."""
    by_label = {p.label: p for p in found}
    reference = next(p for p in found if p.is_reference)
    candidates, passed_over = list(rows), []
    while True:
        pick, as_fast, as_cheap = _cheapest(candidates)
        why = by_label[pick["source"]].shortfall(reference, margin)
        if why is None:
            break
        passed_over.append(f"{pick['source']} ({why})")
        candidates.remove(pick)
    ref, chosen = reference.label, by_label[pick["source"]]
    rule = (
        f"non-inferiority (margin {margin:g}) to {ref}, the best exact source: the cheapest source whose paired "
        f"difference in final success to {ref} has a 95% t lower bound above {-margin:+.3g} (on the seeds where "
        "neither run ended collapsed) and with no more runs ending collapsed"
    )
    cost = _cost_text(pick, as_fast, as_cheap)
    if chosen.is_reference and passed_over:
        return (
            f"Recommended: {ref}, by the exact-source rule: no cheaper source passes {rule}: "
            f"{'; '.join(passed_over)}. {cost}"
        )
    if chosen.is_reference:
        return (
            f"Recommended: {ref}, by non-inferiority (margin {margin:g}): {ref}, the best exact source, is itself "
            f"the cheapest ranked source. {cost}"
        )
    text = (
        f"Recommended: {chosen.label}, by {rule}. {chosen.label}: {format_cell('vs', chosen.difference)} on "
        f"{len(chosen.differences)} seeds, {chosen.collapsed}/{chosen.runs} runs ending collapsed against "
        f"{reference.collapsed}/{reference.runs}. {cost}"
    )
    return text + (f" Cheaper, not non-inferior: {'; '.join(passed_over)}." if passed_over else "")


def _collapse_text(finished: list[dict], found: list[Pairing]) -> str:
    """The sentences naming the sources with runs that ended collapsed (with Fisher's test against the
    reference), and those whose collapses all recovered."""
    collapsed = [r["source"] for r in finished if not r["collapsed"].startswith("0/")]
    ended = [r["source"] for r in finished if r["ended collapsed"]]
    came_back = [s for s in collapsed if s not in ended]
    text = ""
    if ended:
        text += (
            f" Collapsed runs: {', '.join(ended)} (valid-action rate under {COLLAPSE_VALID_RATE:.0%}, or "
            f"success 0 for the last {STUCK_STEPS}+ steps)."
        )
    reference = next((p for p in found if p.is_reference), None)
    tested = [p for p in found if not p.is_reference and p.label in ended]
    if reference and tested:
        listed = ", ".join(
            f"{p.label} {p.collapsed}/{p.runs} (p {p.collapse_p:.3g}, Holm {p.collapse_holm:.3g})" for p in tested
        )
        text += (
            f" Runs ending collapsed against {reference.label}'s {reference.collapsed}/{reference.runs} "
            f"(Fisher's exact test, two-sided): {listed}."
        )
    if came_back:
        text += f" Collapsed and answering again at the end (every collapsed run came back): {', '.join(came_back)}."
    return text


def _paired_text(found: list[Pairing]) -> str:
    """The labels whose paired interval excludes 0, with their exact tests, and what the number of pairs
    allows at best: a difference not found is absence of evidence, not evidence of equality."""
    reference = next((p for p in found if p.is_reference), None)
    tested = [p for p in found if p.tested]
    if reference is None or not tested:
        return ""
    sides = []
    for side, names in (
        (f"ahead of {reference.label}", [p for p in tested if p.difference.low > 0]),
        ("behind it", [p for p in tested if p.difference.high < 0]),
    ):
        if names:
            listed = ", ".join(
                f"{p.label} ({format_cell('vs', p.difference)} on {len(p.differences)} pairs, sign-flip p "
                f"{p.sign_flip_p:.3g}, Holm {p.sign_flip_holm:.3g})"
                for p in names
            )
            sides.append(f"{side}, {listed}")
    text = f" Paired on the seeds where neither run ended collapsed: {'; '.join(sides)}." if sides else ""
    pairs = max(len(p.differences) for p in tested)
    floor = smallest_two_sided_p(pairs)
    family = f" (after Holm over {len(tested)} tests: {min(1.0, len(tested) * floor):.3g})" if len(tested) > 1 else ""
    text += (
        f" With {pairs} pairs no exact paired test can give a two-sided p under 2/2^{pairs} = {floor:.3g}{family}: "
        "a difference not found here is absence of evidence, not evidence of equality."
    )
    return text


def _caveats(finished: list[dict]) -> str:
    """What the intervals and the endpoint can and cannot carry."""
    text = (
        " Intervals are Student t over seeds at nominal 95%; with few seeds, and runs that collapse (a "
        "two-mode sample), they cover less than that."
    )
    dropped = [f"{r['source']} {r['stale-dropped/run']}" for r in finished if r["stale-dropped/run"] != "-"]
    if dropped:
        text += (
            f" Final success is measured on the training stream (its last {SMOOTH} steps), so it depends on "
            "which groups finish first and on the groups dropped as stale, which differ by source "
            f"(stale-dropped groups per run: {', '.join(dropped)})."
        )
    return text


def recommendation(table: list[dict], found: list[Pairing], margin: float = NONINFERIORITY_MARGIN) -> str:
    """One paragraph, led by the recommendation and the rule that decided it.

    With an exact source (`best_exact`) among the ranked sources: non-inferiority. Sources are taken cheapest
    first (time, with overlapping s/step intervals tied; then memory; then old-logit work, ties within
    NEGLIGIBLE_WORK of a step broken by the higher mean final success); the first that `Pairing.shortfall`
    passes is recommended, which at the latest is the exact source itself. Without one: the cheapest of the
    best tied group by final success. Sources with fewer than MIN_RANKED_SEEDS seeds are named as
    unranked, never recommended. Then collapses, paired differences and what the statistics can carry."""
    finished = [r for r in table if r["final success"] == r["final success"]]
    if not finished:
        return "No finished runs to recommend from."
    rows = [r for r in finished if r["rank"] == r["rank"]]
    unranked = [r["source"] for r in finished if r["rank"] != r["rank"]]
    note = (
        f" Not ranked (fewer than {MIN_RANKED_SEEDS} seeds): {', '.join(unranked)}; run more seeds to rank them."
        if unranked
        else ""
    )
    if not rows:
        return f"No source has {MIN_RANKED_SEEDS} finished seeds yet: nothing to rank or recommend.{note}"
    reference = next((p for p in found if p.is_reference), None)
    if reference is not None and reference.label in {r["source"] for r in rows}:
        text = _noninferiority_rule(rows, found, margin)
    else:
        text = _tied_group_rule(rows)
    return text + _collapse_text(finished, found) + _paired_text(found) + _caveats(finished) + note


def regime_table(groups: list[Group]) -> list[dict]:
    """What the runs stressed, per label: token lag (mean, max, distribution), mixed-version share, KLs.

    Token lag is the trainer's version minus the version that sampled the token (agent tokens of the
    trained batches); `lag k` columns are the shares of tokens per lag bucket; `mixed-version trajs` the
    share of trajectories whose agent tokens span more than one version (partial rollouts). All are
    per-step means over steps and seeds; `lag max` is the largest lag any step saw.
    """
    rows = []
    for g in groups:
        rows.append(
            {
                "source": g.label,
                "lag mean": g.mean_of(M.STALENESS_MEAN, skip_first=False),
                "lag max": max((v for r in g.runs for v in r.series(M.STALENESS_MAX) if v == v), default=math.nan),
                **{
                    f"lag {b.replace('plus', '+')}": g.mean_of(M.lag_fraction(b), skip_first=False) for b in LAG_BUCKETS
                },
                "mixed-version trajs": g.mean_of(M.MULTI_VERSION_FRAC, skip_first=False),
                "KL disc": g.mean_of(M.KL_DISCREPANCY_K3, skip_first=False),
                "KL stale": g.mean_of(M.KL_STALENESS_K3, skip_first=False),
            }
        )
    return rows


def throughput_table(groups: list[Group]) -> list[dict]:
    """Samples/s and tokens/s per label, the speedup over `sync`, and the ideal overlap bound.

    Overlap bound: a sync step costs G + T (the rollout phase, then the trainer's T = old logits +
    training + weight sync); perfect overlap costs max(G, T), so async can at best reach
    (G + T) / max(G, T) x sync. G is the sync run's `time/idle`: the trainer waits through the whole
    rollout phase, which is generation plus env steps (tool latency included).
    """

    def rate(g: Group, key: str) -> float:
        num = sum(sum(r.series(key)[1:]) for r in g.runs)
        den = sum(sum(r.series(M.STEP_SECONDS)[1:]) for r in g.runs)
        return num / den if den > 0 else math.nan

    sync = next((g for g in groups if g.label.startswith("sync")), None)
    ideal = math.nan
    sync_rate = math.nan
    if sync is not None:
        gen = sync.mean_of(M.time_part("idle"))
        trainer = sum(sync.mean_of(M.time_part(p)) for p in ("old_logits", "training", "weight_sync"))
        ideal = (gen + trainer) / max(gen, trainer)
        sync_rate = rate(sync, M.TRAJECTORIES)

    def by_seed(g: Group) -> dict[int, Group]:
        seeds: dict[int, Group] = {}
        for r in g.runs:
            seeds.setdefault(r.seed, Group(g.label)).runs.append(r)
        return seeds

    sync_seeds = by_seed(sync) if sync is not None else {}

    def per_seed(g: Group) -> str:
        """The range of this label's speedups over the seeds the sync runs have too, e.g. '0.86-1.94x' (runs of one
        seed pooled; a seed whose runs have no step after the first is left out)."""
        ratios = [
            rate(runs, M.TRAJECTORIES) / rate(sync_seeds[seed], M.TRAJECTORIES)
            for seed, runs in by_seed(g).items()
            if seed in sync_seeds
        ]
        ratios = [x for x in ratios if math.isfinite(x)]
        return f"{min(ratios):.3g}-{max(ratios):.3g}x over {len(ratios)} seeds" if ratios else "-"

    several_seeds = any(len(by_seed(g)) > 1 for g in groups)
    rows = []
    for g in groups:
        samples = rate(g, M.TRAJECTORIES)
        rows.append(
            {
                "run": g.label,
                "samples/s": samples,
                "tokens/s": rate(g, M.TOKENS),
                **{f"{p} s": g.mean_of(M.time_part(p)) for p in M.TIME_PARTS},
                "speedup vs sync": samples / sync_rate,
                **({"speedup per seed": per_seed(g)} if several_seeds else {}),
                "ideal speedup": ideal,
                "of ideal": (samples / sync_rate - 1) / (ideal - 1) if ideal > 1 else math.nan,
            }
        )
    return rows


def format_cell(key: str, v) -> str:
    """One table cell as text: NaN as '-', overheads and fractions as percentages, 3 significant digits."""
    if isinstance(v, str):
        return v
    if isinstance(v, Interval):
        return _interval_text(v, signed=key.startswith("vs"))
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "-"
    if key == "extra vs behavior":
        return f"{v:+.0%}" if round(v, 2) != 0 else "0%"  # not "-0%" for a cost that rounds to nothing
    if key == "of ideal":
        return f"{v:.0%}"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no runs)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(format_cell(k, r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots


def log_scale_with_zero(values: list[float]) -> tuple[str, dict]:
    """Matplotlib y-scale for positive errors that may include exact zeros.

    A log axis cannot place 0 (matplotlib clips it to the axis bottom, where it reads as a tiny
    error). When a 0 is present, use symlog, linear below the decade of the smallest positive value
    (a power of ten, so no decade tick falls inside the linear part), so an exact source sits at 0
    and every positive value keeps its log position.
    """
    finite = [v for v in values if not math.isnan(v)]
    if 0.0 not in finite:
        return "log", {}
    positive = [v for v in finite if v > 0]
    return "symlog", {"linthresh": 10.0 ** math.floor(math.log10(min(positive))) if positive else 1.0}


class _Figures:
    """The report's PNGs: each figure is written into `out` and listed under its section of the page."""

    def __init__(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self._plt = plt
        self.out = out
        self.by_section: dict[str, list[Path]] = {k: [] for k in SECTIONS}

    def subplots(self, *args, **kwargs):
        return self._plt.subplots(*args, **kwargs)

    def save(self, fig, section: str, name: str) -> None:
        path = self.out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        self._plt.close(fig)
        self.by_section[section].append(path)


def _log_y_axis(ax, plotted: list[float]) -> None:
    scale, kwargs = log_scale_with_zero(plotted)
    ax.set_yscale(scale, **kwargs)
    if scale == "symlog":  # errors are >= 0: no negative half
        ax.set_ylim(bottom=0)


def _band(ax, xs, curve: list[Interval], label: str, smooth_it: bool = False):
    """The seed mean with its t band, nominal 95% (each smoothed over SMOOTH steps when asked)."""
    m, lo, hi = ([getattr(iv, f) for iv in curve] for f in ("mean", "low", "high"))
    if smooth_it:
        m, lo, hi = (trailing_means(x, SMOOTH) for x in (m, lo, hi))
    line = ax.plot(xs, m, label=label)[0]
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    return line, m


def _per_step(
    figs: _Figures,
    section: str,
    name: str,
    keys_titles: list[tuple[str, str]],
    groups: list[Group],
    smooth_it: bool = False,
    log_y: bool = False,
) -> None:
    """One panel per metric against the step, one band per group; on success, an x where a run collapsed."""
    fig, axes = figs.subplots(1, len(keys_titles), figsize=(5.5 * len(keys_titles), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys_titles, strict=True):
        plotted = []
        for g in groups:
            curve = g.mean_curve(key)
            line, m = _band(ax, list(range(1, len(curve) + 1)), curve, g.label, smooth_it)
            plotted += m
            if key == M.SUCCESS_RATE:
                steps = [c for c in (r.collapse_step() for r in g.runs) if c is not None and c <= len(m)]
                ax.plot(steps, [m[c - 1] for c in steps], "x", color=line.get_color(), markersize=9)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log_y:
            _log_y_axis(ax, plotted)
    axes[0][0].legend(fontsize=7)
    figs.save(fig, section, name)


def _plot_wall_clock(figs: _Figures, groups: list[Group]) -> None:
    fig, axes = figs.subplots(1, 2, figsize=(11, 3.8))
    for ax, (key, title) in zip(axes, [(M.SUCCESS_RATE, "success rate"), (M.REWARD_MEAN, "reward")], strict=True):
        for g in groups:
            wall = [iv.mean for iv in g.mean_curve(M.STEP_SECONDS)]
            _band(ax, list(itertools.accumulate(wall)), g.mean_curve(key), g.label, smooth_it=True)
        ax.set_title(f"{title} ({SMOOTH}-step mean)")
        ax.set_xlabel("wall-clock (s)")
    axes[0].legend(fontsize=7)
    figs.save(fig, "wall-clock", "curves_wall")


def _plot_error_vs_lag(figs: _Figures, audit_groups: list[Group]) -> None:
    fig, ax = figs.subplots(figsize=(6, 3.8))
    plotted = []
    for g in audit_groups:
        errors = [g.mean_of(M.audit_error_at_lag(b), skip_first=False) for b in LAG_BUCKETS]
        ax.plot(range(len(LAG_BUCKETS)), errors, "o-", label=g.label)
        plotted += errors
    ax.set_xticks(range(len(LAG_BUCKETS)), [b.replace("plus", "+") for b in LAG_BUCKETS])
    ax.set_xlabel("token lag (trainer version - token version)")
    ax.set_ylabel("mean |old log-prob - exact|")
    _log_y_axis(ax, plotted)
    ax.set_title("approximation error against staleness")
    ax.legend(fontsize=7)
    figs.save(fig, "audit", "audit_error_vs_lag")


def _plot_time_split(figs: _Figures, groups: list[Group]) -> None:
    """Two bars per group: the rollout thread's generation time, and the trainer's step (idle + old logits +
    training + weight sync), which is the wall-clock per step; in async the two overlap."""
    fig, ax = figs.subplots(figsize=(max(6, 1.2 * len(groups)), 3.8))
    xs = list(range(len(groups)))
    ax.bar(
        [x - 0.2 for x in xs],
        [g.mean_of(M.time_part("generation")) for g in groups],
        width=0.38,
        label="generation (rollout)",
        color="tab:blue",
    )
    bottom = [0.0] * len(groups)
    for part, color in zip(M.TIME_PARTS[1:], ("tab:orange", "tab:green", "tab:red", "tab:gray"), strict=True):
        vals = [0.0 if math.isnan(v) else v for v in (g.mean_of(M.time_part(part)) for g in groups)]
        ax.bar([x + 0.2 for x in xs], vals, bottom=bottom, width=0.38, label=part, color=color)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(xs, [g.label for g in groups])
    ax.set_ylabel("seconds per step")
    ax.set_title("left: generation, right: trainer step (they overlap in async mode)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=7)
    figs.save(fig, "overhead-table", "time_split")


def _plots(groups: list[Group], audit_groups: list[Group], out: Path) -> dict[str, list[Path]]:
    """Write every figure of the report into `out`; returns each section's PNGs."""
    figs = _Figures(out)
    _per_step(
        figs,
        "learning-curves",
        "curves_step",
        [(M.SUCCESS_RATE, f"success rate ({SMOOTH}-step mean)"), (M.REWARD_MEAN, f"reward ({SMOOTH}-step mean)")],
        groups,
        smooth_it=True,
    )
    _plot_wall_clock(figs, groups)
    _per_step(figs, "active-ratio", "active_ratio", [(M.ACTIVE_TOKEN_RATIO, "active-token ratio")], groups)
    kls = [
        (M.KL_DISCREPANCY_K3, "discrepancy KL(mu || pi_old), k3"),
        (M.KL_STALENESS_K3, "staleness KL(pi_old || pi_theta), k3"),
    ]
    _per_step(figs, "kl-split", "kl_split", kls, groups)
    clip_mask = [
        (M.CLIP_FRAC_LOW, "PPO clip fraction, low side"),
        (M.CLIP_FRAC_HIGH, "PPO clip fraction, high side"),
        (M.MASK_FRAC, "r_d masked fraction"),
    ]
    _per_step(figs, "clip-mask", "clip_mask", clip_mask, groups)
    if audit_groups:
        error = [(M.AUDIT_ABS_ERR_MEAN, "mean |old log-prob - exact|")]
        _per_step(figs, "audit", "audit_error", error, audit_groups, log_y=True)
        _plot_error_vs_lag(figs, audit_groups)
    ewma = [g for g in groups if any(M.EWMA_RESETS in r.rows[-1] for r in g.runs)]
    if ewma:
        _per_step(figs, "ewma-resets", "ewma_resets", [(M.EWMA_RESETS, "PPO-EWMA resets (cumulative)")], ewma)
    _plot_time_split(figs, groups)
    return figs.by_section


# ---------------------------------------------------------------------------------------------- outputs


@dataclass
class _Findings:
    """The report's tables and its recommendation, written both as summary.md and as report.html."""

    source: list[dict]
    ranking: list[dict]
    reference: str | None  # the best exact source, against which `paired` compares
    paired: list[dict]
    heldout_paired: list[dict]  # held-out success against the reference; empty where runs were not scored
    margin: float
    regime: list[dict]
    throughput: list[dict] | None  # only when the runs differ in mode (sync vs async)
    advice: str


def _findings(runs: list[Run], groups: list[Group], audit_groups: list[Group], margin: float) -> _Findings:
    table = source_table(groups, audit_groups)
    reference = best_exact(groups)
    found = pairings(groups, reference)
    return _Findings(
        source=table,
        ranking=ranking_table(table),
        reference=reference.label if reference else None,
        paired=paired_table(found, margin),
        heldout_paired=heldout_pairs(groups, reference),
        margin=margin,
        regime=regime_table(groups),
        throughput=throughput_table(groups) if len({r.config["mode"] for r in runs}) > 1 else None,
        advice=recommendation(table, found, margin),
    )


def _paired_caption(found: _Findings) -> tuple[str, str]:
    """(title, text) above the table of collapses and paired comparisons."""
    exact = ", ".join(EXACT_SOURCES)
    if found.reference is None:
        return "Collapses and paired comparisons", (
            f"No exact source ({exact}) with {MIN_RANKED_SEEDS} seeds among these runs: nothing to pair against."
        )
    return f"Collapses and paired comparisons against {found.reference}", (
        f"The reference is {found.reference}, the best exact source (the smallest share of runs ending collapsed, "
        "then the highest final success of the others). `ended collapsed`: runs stuck at 0 success or not "
        "answering at their last step, tested against the reference's by Fisher's exact test. "
        "`success if not collapsed`: final success of the other runs. `vs reference`: the paired difference "
        "of final success on the seeds where neither run ended collapsed, with exact sign-flip and sign "
        "tests. Every p is two-sided; `Holm` columns adjust over this table's tests, one family per test; "
        "`smallest p` is the least a test on that many pairs can give (2/2^n). Non-inferior: no larger share "
        f"of runs ending collapsed and a paired 95% t lower bound above -{found.margin:g}."
    )


def _heldout_caption(found: _Findings) -> tuple[str, str]:
    """(title, text) above the table of held-out success paired against the reference."""
    return f"Held-out success paired against {found.reference}", (
        "Each run's final checkpoint scored on held-out tasks (`twofold compare --heldout`; `held-out 95% t CI` "
        "above), paired by seed with the reference's. Collapsed runs count with their score. The mean "
        "difference with its 95% t interval, the exact two-sided sign-flip p and Holm over these rows. The "
        "recommendation reads the training stream's final success, which every run has."
    )


def _summary_markdown(runs: list[Run], found: _Findings) -> str:
    paired_title, paired_caption = _paired_caption(found)
    md = [
        "# twofold report",
        "",
        f"Runs: {len(runs)} ({', '.join(sorted({str(r.path) for r in runs}))})",
        "",
        "## " + SECTIONS["recommendation"],
        "",
        found.advice,
        "",
        markdown_table(found.ranking),
        "### " + paired_title,
        "",
        paired_caption,
        "",
        markdown_table(found.paired) if found.paired else "",
    ]
    if found.heldout_paired:
        heldout_title, heldout_caption = _heldout_caption(found)
        md += ["### " + heldout_title, "", heldout_caption, "", markdown_table(found.heldout_paired)]
    md += [
        "## " + SECTIONS["overhead-table"],
        "",
        "Seconds are means per step after the first; `extra vs behavior` is the wall-clock cost over the "
        "`behavior` source; success is the seed mean over the last "
        f"{SMOOTH} steps (final) and the best {SMOOTH}-step mean (best).",
        "",
        markdown_table(found.source),
        "## " + SECTIONS["regime"],
        "",
        "Token lag = trainer version - the token's version; `lag k`: share of agent tokens per lag; "
        "KLs are k3 estimates (discrepancy: mu vs the source's pi_old; staleness: pi_old vs pi_theta).",
        "",
        markdown_table(found.regime),
    ]
    if found.throughput:
        md += ["## Throughput", "", markdown_table(found.throughput)]
    return "\n".join(md)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(no runs)</p>"
    keys = list(rows[0])
    return (
        "<table><tr>"
        + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        + "</tr>"
        + "".join(
            "<tr>" + "".join(f"<td>{html.escape(format_cell(k, r[k]))}</td>" for k in keys) + "</tr>" for r in rows
        )
        + "</table>"
    )


def _html_page(runs: list[Run], groups: list[Group], found: _Findings, figs: dict[str, list[Path]]) -> str:
    notes = {
        "audit": "No audit runs among these directories: run `twofold compare --audit` (or a run with "
        "`oldlogits.audit=true`) to measure each approximation against exact old log-probs.",
        "ewma-resets": "No PPO-EWMA runs among these directories.",
    }
    body = [
        f"<h1>twofold report</h1><p>{len(runs)} runs, {len(groups)} groups: "
        f"{html.escape(', '.join(g.label + f' ({len(g.runs)} seeds)' for g in groups))}</p>"
    ]
    for key, title in SECTIONS.items():
        body.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>')
        if key == "overhead-table":
            body.append(_html_table(found.source))
        if key == "regime":
            body.append(_html_table(found.regime) + "</section>")
            continue
        if key == "recommendation":
            body.append(f"<p>{html.escape(found.advice)}</p>{_html_table(found.ranking)}")
            title, caption = _paired_caption(found)
            body.append(f"<h3>{html.escape(title)}</h3><p>{html.escape(caption)}</p>")
            body.append(_html_table(found.paired) if found.paired else "")
            if found.heldout_paired:
                title, caption = _heldout_caption(found)
                body.append(f"<h3>{html.escape(title)}</h3><p>{html.escape(caption)}</p>")
                body.append(_html_table(found.heldout_paired))
            body.append("</section>")
            continue
        body += [_img(p) for p in figs[key]] or [f"<p>{html.escape(notes.get(key, 'No data.'))}</p>"]
        body.append("</section>")
    if found.throughput:
        body.append(f'<section id="throughput"><h2>Throughput</h2>{_html_table(found.throughput)}</section>')
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>twofold report</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "</style></head><body>" + "\n".join(body) + "</body></html>"
    )


def write_report(paths: list[Path], out: Path, margin: float = NONINFERIORITY_MARGIN) -> tuple[Path, str]:
    """Write report.html, its PNGs and summary.md into `out`; returns (html path, markdown text). `margin`:
    the non-inferiority margin of the recommendation, in final success."""
    if not 0 <= margin < 1:
        raise ConfigError("--margin", f"must be in [0, 1) (a difference of success rates), got {margin}")
    runs = load_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no run directories with metrics under {', '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs([r for r in runs if not r.audit])
    audit_groups = group_runs([r for r in runs if r.audit])
    found = _findings(runs, groups, audit_groups, margin)
    figs = _plots(groups, audit_groups, out)
    markdown = _summary_markdown(runs, found)
    (out / "summary.md").write_text(markdown)
    path = out / "report.html"
    path.write_text(_html_page(runs, groups, found, figs))
    return path, markdown
