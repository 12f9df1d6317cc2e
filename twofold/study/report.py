"""`twofold report RUN_DIR...`: what each old-logit source costs and what it buys, from run directories.

Runs are grouped by label (the old-logit source, plus mode and window when those differ between runs);
seeds of one label are averaged (mean and spread). Runs made with `oldlogits.audit=true` feed only the
approximation-error section, since their snapshots distort timing.

Outputs: `report.html` (self-contained: the PNGs are embedded), the PNGs themselves, and `summary.md`
(the tables, also printed to the terminal).
"""

from __future__ import annotations

import base64
import html
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from twofold import metrics as M
from twofold.pipeline.rundir import read_metrics
from twofold.rollout.versions import LAG_BUCKETS
from twofold.study.stats import (
    Interval,
    bootstrap_mean,
    collapse_step,
    paired_difference,
    recovery_step,
    stuck_step,
    t_interval,
    tied_ranks,
    trailing_means,
)

SMOOTH = 5  # moving-average window (steps) for success curves and "best success"
SECTIONS = {
    "recommendation": "Which source: ranking and recommendation",
    "learning-curves": "Success and reward vs step (95% bootstrap bands over seeds; x: a run's collapse)",
    "wall-clock": "Success and reward vs wall-clock",
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


@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]

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


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)

    def mean_curve(self, key: str) -> list[Interval]:
        """Per step, the mean over seeds with its 95% bootstrap interval, up to the shortest run."""
        curves = [r.series(key) for r in self.runs]
        n = min(len(c) for c in curves)
        return [bootstrap_mean([c[i] for c in curves]) for i in range(n)]

    def interval_of(self, per_run) -> Interval:
        """Mean over seeds of a per-run success figure (e.g. `Run.final_success`), with its 95% t interval
        cut to [0, 1], where a success rate lives."""
        return t_interval([per_run(r) for r in self.runs]).within(0.0, 1.0)

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
                runs.append(Run(q, yaml.safe_load((q / "config.yaml").read_text()), rows))
    return runs


def group_runs(runs: list[Run]) -> list[Group]:
    """Group by source; add mode and window to the label when runs differ in them."""
    varied = len({(r.config["mode"], r.config["max_staleness"]) for r in runs}) > 1

    def label(r: Run) -> str:
        if not varied:
            return r.source
        window = f" W={r.config['max_staleness']}" if r.config["mode"] == "async" else ""
        return f"{r.config['mode']}{window} {r.source}"

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


def _vs_snapshot(g: Group, snapshot: Group | None) -> Interval | str:
    """The paired difference of final success to `snapshot` on the seeds both have: an Interval from
    MIN_RANKED_SEEDS shared seeds, the bare difference from one, '-' without a shared seed or a snapshot."""
    if snapshot is None or g is snapshot:
        return "-"
    mine, reference = ({r.seed: r.final_success() for r in x.runs} for x in (g, snapshot))
    diff = paired_difference(mine, reference).within(-1.0, 1.0)  # a difference of two rates
    shared = len(set(mine) & set(reference))
    if shared >= MIN_RANKED_SEEDS:
        return diff
    if shared:
        return f"{diff.mean:+.3g} (1 seed, no interval)"
    return "-"


def source_table(groups: list[Group], audit_groups: list[Group]) -> list[dict]:
    """One row per label: seconds per step and its split, overhead vs `behavior`, memory, success.

    Success columns: `final success` is the seed mean of each run's last SMOOTH steps, with its 95%
    t interval in `final 95% CI`; `vs snapshot` is the paired difference to `snapshot` on the same
    seeds (an Interval from MIN_RANKED_SEEDS shared seeds, text below that); `rank` ties sources whose
    intervals overlap (`stats.tied_ranks`), among the sources with at least MIN_RANKED_SEEDS seeds (the
    others' rank is NaN, shown '-'); `collapsed` counts runs that collapsed (`Run.collapse`), with the
    step and how; `ended collapsed` counts those still collapsed at their last step (`Run.ended_collapsed`).
    """
    baseline = next((g.mean_of(M.STEP_SECONDS) for g in groups if g.label.endswith("behavior")), math.nan)
    audit = {g.label: g.mean_of(M.AUDIT_ABS_ERR_MEAN, skip_first=False) for g in audit_groups}
    finals = {g.label: g.interval_of(Run.final_success) for g in groups}
    ranks = tied_ranks({g.label: finals[g.label] for g in groups if len(g.runs) >= MIN_RANKED_SEEDS})
    snapshot = next((g for g in groups if g.label.endswith("snapshot")), None)
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
                "s/step 95% CI": g.seed_interval(M.STEP_SECONDS),
                **{f"{p} s": g.mean_of(M.time_part(p)) for p in M.TIME_PARTS},
                "extra vs behavior": (step_s / baseline - 1) if baseline == baseline else math.nan,
                "peak extra MB": max(
                    max((v for v in r.series(M.OLDLOGIT_PEAK_BYTES) if v == v), default=0) for r in g.runs
                )
                / 2**20,
                "active ratio": g.mean_of(M.ACTIVE_TOKEN_RATIO, skip_first=False),
                "KL disc": g.mean_of(M.KL_DISCREPANCY_K3, skip_first=False),
                "KL stale": g.mean_of(M.KL_STALENESS_K3, skip_first=False),
                "audit err": audit.get(g.label, math.nan),
                "final success": finals[g.label].mean,
                "final 95% CI": _interval_text(finals[g.label]),
                "best success": best.mean,
                "best 95% CI": _interval_text(best),
                "vs snapshot": _vs_snapshot(g, snapshot),
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
    "final 95% CI",
    "vs snapshot",
    "s/step",
    "extra vs behavior",
    "peak extra MB",
    "collapsed",
)


def ranking_table(table: list[dict]) -> list[dict]:
    """The source table's ranking columns, best rank first (then by final success), unranked sources last."""

    def order(r: dict) -> tuple[float, float]:
        return (_nan_last(r["rank"]), _nan_last(-r["final success"]))

    rows = sorted(table, key=order)
    return [{k: r[k] for k in RANKING_COLUMNS} for r in rows]


def _cheapest(best: list[dict]) -> tuple[dict, list[dict], list[dict]]:
    """(pick, as fast, as cheap): the cheapest source of the best tied group, the sources as fast as the
    fastest, and those of them that also tie on memory and old-logit work."""
    # Time first, tied like success: sources whose s/step intervals overlap the fastest one's are equally fast
    # (async timing moves with each run's staleness), and extra memory, then old-logit work, decide among them.
    fastest = min(best, key=lambda r: _nan_last(r["s/step"]))
    as_fast = [r for r in best if r["s/step 95% CI"].overlaps(fastest["s/step 95% CI"])] or [fastest]
    lightest = [r for r in as_fast if r["peak extra MB"] == min(x["peak extra MB"] for x in as_fast)]
    least_work = min(_nan_last(r["old_logits s"]) for r in lightest)
    # Old-logit work within 1% of a step (copying mu, say) is no cost: then the higher mean success decides.
    as_cheap = [r for r in lightest if _nan_last(r["old_logits s"]) - least_work <= NEGLIGIBLE_WORK * fastest["s/step"]]
    pick = min(as_cheap, key=lambda r: (-r["final success"], r["source"]))
    return pick, as_fast, as_cheap


def _collapse_text(finished: list[dict]) -> str:
    """The sentences naming the sources with runs that ended collapsed, and those whose collapses all recovered."""
    collapsed = [r["source"] for r in finished if not r["collapsed"].startswith("0/")]
    ended = [r["source"] for r in finished if r["ended collapsed"]]
    came_back = [s for s in collapsed if s not in ended]
    text = ""
    if ended:
        text += (
            f" Collapsed runs: {', '.join(ended)} (valid-action rate under {COLLAPSE_VALID_RATE:.0%}, or "
            f"success 0 for the last {STUCK_STEPS}+ steps)."
        )
    if came_back:
        text += f" Collapsed and answering again at the end (every collapsed run came back): {', '.join(came_back)}."
    return text


def recommendation(table: list[dict]) -> str:
    """One paragraph: the best tied group by final success, and its cheapest member (time, then memory, then
    old-logit work; among members that tie on all three, the higher mean final success).
    Sources with fewer than MIN_RANKED_SEEDS seeds are named as unranked, never recommended."""
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
    best = sorted((r for r in rows if r["rank"] == 1), key=lambda r: (-r["final success"], r["source"]))
    pick, as_fast, as_cheap = _cheapest(best)
    text = f"Best tied group (95% intervals of final success overlap): {', '.join(r['source'] for r in best)}. "
    if len(best) > 1:
        text += (
            f"Cheapest of them: {pick['source']} at {pick['s/step']:.3g} s/step "
            f"({format_cell('extra vs behavior', pick['extra vs behavior'])} vs behavior), "
            f"{pick['peak extra MB']:.3g} MB of extra memory and {format_cell('', pick['old_logits s'])} s of "
            "old-logit work per step"
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
        text += ". "
    text += f"Recommended: {pick['source']} (final success {pick['final 95% CI']})."
    text += _collapse_text(finished)
    # Seeds are matched across sources, so a paired difference can separate sources whose own intervals overlap.
    paired = [r for r in finished if isinstance(r["vs snapshot"], Interval)]
    ahead = [r for r in paired if r["vs snapshot"].low > 0]
    behind = [r for r in paired if r["vs snapshot"].high < 0]
    for side, names in (("ahead of", ahead), ("behind", behind)):
        if names:
            listed = ", ".join(f"{r['source']} ({format_cell('vs snapshot', r['vs snapshot'])})" for r in names)
            text += f" Paired on the same seeds, {side} snapshot: {listed}."
    if len(best) == len(rows) and len(rows) > 1 and not (ahead or behind):
        text += " Every ranked source ties: more seeds or steps would be needed to separate them."
    return text + note


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
        return _interval_text(v, signed=key == "vs snapshot")
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
    """The seed mean with its 95% bootstrap band (each smoothed over SMOOTH steps when asked)."""
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
    regime: list[dict]
    throughput: list[dict] | None  # only when the runs differ in mode (sync vs async)
    advice: str


def _findings(runs: list[Run], groups: list[Group], audit_groups: list[Group]) -> _Findings:
    table = source_table(groups, audit_groups)
    return _Findings(
        source=table,
        ranking=ranking_table(table),
        regime=regime_table(groups),
        throughput=throughput_table(groups) if len({r.config["mode"] for r in runs}) > 1 else None,
        advice=recommendation(table),
    )


def _summary_markdown(runs: list[Run], found: _Findings) -> str:
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


def write_report(paths: list[Path], out: Path) -> tuple[Path, str]:
    """Write report.html, its PNGs and summary.md into `out`; returns (html path, markdown text)."""
    runs = load_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no run directories with metrics under {', '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs([r for r in runs if not r.audit])
    audit_groups = group_runs([r for r in runs if r.audit])
    found = _findings(runs, groups, audit_groups)
    figs = _plots(groups, audit_groups, out)
    markdown = _summary_markdown(runs, found)
    (out / "summary.md").write_text(markdown)
    path = out / "report.html"
    path.write_text(_html_page(runs, groups, found, figs))
    return path, markdown
