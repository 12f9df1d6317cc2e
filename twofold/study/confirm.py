"""The analysis of the pre-registered confirmation (docs/results.md, "Pre-registered confirmation"), fixed
before any of its runs.

Four one-sided hypotheses (`FAMILY`), each an exact paired sign-flip test of the differences d_s = better_s -
other_s + margin over the seeds both arms finished: under H0 each d_s is symmetric about 0 and p is the share
of the 2^n sign assignments whose sum is at least the observed one. Holm over the four keeps the family-wise
error at ALPHA. The primary endpoint is the held-out success of each run's final checkpoint (heldout.json,
`study.heldout`); the secondary is the mean training-stream success over steps 21-60, tested the same way as
a family of its own. A run that collapsed is an outcome and is scored like any other; only a seed where one
arm has no value (a run that failed twice, or has not finished) leaves its pair out, and the table says so.
Beside the tests, as registered and descriptive only: each pair's difference, and per arm the runs that end
collapsed (the report's definition) with Fisher's exact test between the two arms, the mean token lag and the
groups dropped as stale.

    python -m twofold.study.confirm --tooluse runs/confirm-tooluse-stale --stale runs/confirm-frozenlake-stale \\
        --stale-noreset runs/confirm-frozenlake-stale-noreset

Each folder is a grid's `--out` (its cells `SOURCE-seedN`) or its committed copy under docs/results/data/.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twofold import metrics as M
from twofold.pipeline.rundir import heldout_success, read_metrics  # heldout_success: the primary endpoint
from twofold.study.report import Group, load_runs
from twofold.study.stats import fisher_collapses, holm, sign_flip_test, t_interval

ALPHA = 0.05
SEEDS = tuple(range(5, 15))  # the registered seeds
SECONDARY_STEPS = (21, 60)  # first and last step of the secondary endpoint's window
GRIDS = ("tooluse", "stale", "stale_noreset")  # the grid folders the family reads, by role


@dataclass(frozen=True)
class Arm:
    grid: str  # one of GRIDS
    source: str


@dataclass(frozen=True)
class Hypothesis:
    """H1 of a one-sided test: mean(better - other) > -margin (margin 0: `better` is better; margin > 0: it is
    not worse by `margin` or more, a non-inferiority test)."""

    name: str
    statement: str
    better: Arm
    other: Arm
    margin: float = 0.0


FAMILY = (
    Hypothesis("H1", "snapshot > recompute, tool use (b)", Arm("tooluse", "snapshot"), Arm("tooluse", "recompute")),
    Hypothesis("H2", "snapshot > recompute, FrozenLake (b)", Arm("stale", "snapshot"), Arm("stale", "recompute")),
    Hypothesis(
        "H3",
        "ewma non-inferior to snapshot (margin 0.05), FrozenLake (b)",
        Arm("stale", "ewma"),
        Arm("stale", "snapshot"),
        margin=0.05,
    ),
    Hypothesis(
        "H4",
        "ewma without the reset rule > ewma with it, FrozenLake (b)",
        Arm("stale_noreset", "ewma"),
        Arm("stale", "ewma"),
    ),
)

Endpoint = Callable[[Path], "float | None"]


def stream_success(run_dir: Path, first: int = SECONDARY_STEPS[0], last: int = SECONDARY_STEPS[1]) -> float | None:
    """The secondary endpoint: mean training-stream success over steps first..last; None unless the run logged
    every one of them."""
    by_step = {r["step"]: r.get(M.SUCCESS_RATE) for r in read_metrics(run_dir / "metrics.jsonl")}
    values = [by_step.get(step) for step in range(first, last + 1)]
    if any(not isinstance(v, (int, float)) for v in values):
        return None
    return sum(values) / len(values)


def arm_cells(grid: Path, source: str) -> dict[int, Path]:
    """{seed: cell folder} of the learning cells `SOURCE-seedN` of a grid folder (audit cells are not arms)."""
    pattern = re.compile(rf"^{re.escape(source)}-seed(\d+)$")
    cells = sorted(grid.iterdir()) if grid.is_dir() else []
    found = ((pattern.match(cell.name), cell) for cell in cells)
    return {int(m.group(1)): cell for m, cell in found if m}


def arm_values(grid: Path, source: str, endpoint: Endpoint) -> dict[int, float]:
    """{seed: endpoint} over an arm's cells that have a value."""
    values = {seed: endpoint(cell) for seed, cell in arm_cells(grid, source).items()}
    return {seed: v for seed, v in values.items() if v is not None}


@dataclass(frozen=True)
class Result:
    hypothesis: Hypothesis
    seeds: tuple[int, ...]  # the registered seeds both arms have
    missing: tuple[int, ...]  # the registered seeds one arm or both lack
    differences: tuple[float, ...]  # better - other, per seed in `seeds`
    p: float  # one-sided exact sign-flip p of differences + margin
    p_holm: float = math.nan

    @property
    def rejected(self) -> bool:
        return self.p_holm <= ALPHA


def paired_test(
    h: Hypothesis, grids: dict[str, Path], endpoint: Endpoint, seeds: tuple[int, ...] = SEEDS, two_sided: bool = False
) -> Result:
    """The exact sign-flip test of `h` over the `seeds` both arms have: one-sided (the family) or two-sided."""
    better = arm_values(grids[h.better.grid], h.better.source, endpoint)
    other = arm_values(grids[h.other.grid], h.other.source, endpoint)
    paired = tuple(s for s in seeds if s in better and s in other)
    differences = tuple(better[s] - other[s] for s in paired)
    p_values = sign_flip_test([d + h.margin for d in differences])
    p = p_values.two_sided if two_sided else p_values.greater
    return Result(h, paired, tuple(s for s in seeds if s not in paired), differences, p)


def analyse(grids: dict[str, Path], endpoint: Endpoint) -> list[Result]:
    """Every hypothesis of FAMILY on one endpoint, with Holm's adjustment over the four."""
    results = [paired_test(h, grids, endpoint) for h in FAMILY]
    adjusted = holm([r.p for r in results])
    return [dataclasses.replace(r, p_holm=a) for r, a in zip(results, adjusted, strict=True)]


# The exploratory arms (docs/results.md, "Exploratory arms"): seeds 5-9, each a paired difference first - second
# with its unadjusted two-sided sign-flip p; they confirm nothing and no Holm family holds them.
EXPLORATORY_SEEDS = tuple(range(5, 10))
EXPLORATORY_GRIDS = ("stale_cooldown", "stale_c4", "stale_c1.5", "tooluse_noreset")
EXPLORATORY = (
    Hypothesis("E1", "linear - snapshot, FrozenLake (b)", Arm("stale", "linear"), Arm("stale", "snapshot")),
    Hypothesis("E1", "loglinear - snapshot, FrozenLake (b)", Arm("stale", "loglinear"), Arm("stale", "snapshot")),
    Hypothesis("E1", "linear - loglinear, FrozenLake (b)", Arm("stale", "linear"), Arm("stale", "loglinear")),
    *(
        Hypothesis("E2", f"{source} at c = {c} - at c = 2", Arm(f"stale_c{c}", source), Arm("stale", source))
        for c in ("4", "1.5")
        for source in ("snapshot", "loglinear", "linear")
    ),
    Hypothesis(
        "E3",
        "ewma without the reset rule - with it, tool use (b)",
        Arm("tooluse_noreset", "ewma"),
        Arm("tooluse", "ewma"),
    ),
    Hypothesis(
        "E4", "ewma with a cool-down (k = 8) - with the reset rule", Arm("stale_cooldown", "ewma"), Arm("stale", "ewma")
    ),
    Hypothesis(
        "E4",
        "ewma with a cool-down (k = 8) - without the reset rule",
        Arm("stale_cooldown", "ewma"),
        Arm("stale_noreset", "ewma"),
    ),
)


def explore(grids: dict[str, Path], endpoint: Endpoint) -> list[Result]:
    """The exploratory comparisons whose two grid folders are given, each over seeds 5-9, unadjusted."""
    return [
        paired_test(h, grids, endpoint, EXPLORATORY_SEEDS, two_sided=True)
        for h in EXPLORATORY
        if h.better.grid in grids and h.other.grid in grids
    ]


def described(r: Result) -> tuple[str, str]:
    """A comparison's mean paired difference with its 95% t interval, and its missing seeds, as table cells."""
    iv = t_interval(list(r.differences))
    interval = "-" if math.isnan(iv.mean) else f"{iv.mean:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"
    return interval, ", ".join(map(str, r.missing)) or "none"


def exploratory_table(results: list[Result]) -> str:
    head = (
        "| arm | comparison (first - second) | pairs | missing seeds | mean difference, 95% t CI (descriptive) "
        "| two-sided sign-flip p (unadjusted) |\n|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        interval, missing = described(r)
        h = r.hypothesis
        rows.append(f"| {h.name} | {h.statement} | {len(r.seeds)} | {missing} | {interval} | {r.p:.4g} |")
    return head + "\n".join(rows) + "\n"


def results_table(results: list[Result]) -> str:
    head = (
        "| hypothesis | pairs | missing seeds | mean difference, 95% t CI (descriptive) | one-sided sign-flip p "
        "| Holm p | at alpha 0.05 |\n|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        interval, missing = described(r)
        verdict = "H0 rejected" if r.rejected else "not rejected"
        h = r.hypothesis
        rows.append(
            f"| {h.name}: {h.statement} | {len(r.seeds)} | {missing} | {interval} | {r.p:.4g} | {r.p_holm:.4g} "
            f"| {verdict} |"
        )
    return head + "\n".join(rows) + "\n"


def pairs_table(results: list[Result]) -> str:
    """Each hypothesis's paired differences (first arm - second arm, unshifted), seed by seed."""
    rows = [
        f"| {r.hypothesis.name} | "
        + ", ".join(f"{s}: {d:+.3f}" for s, d in zip(r.seeds, r.differences, strict=True))
        + " |"
        for r in results
    ]
    return "| hypothesis | seed: difference |\n|---|---|\n" + "\n".join(rows) + "\n"


def arm_group(grid: Path, arm: Arm, seeds: tuple[int, ...] = SEEDS) -> Group:
    """An arm's runs of the registered seeds, as the report reads them (config and metrics)."""
    cells = [cell for seed, cell in arm_cells(grid, arm.source).items() if seed in seeds]
    return Group(f"{arm.source} ({arm.grid})", load_runs(cells))


def descriptive_table(grids: dict[str, Path], family: tuple[Hypothesis, ...] = FAMILY) -> str:
    """Per hypothesis and arm, descriptive only: runs ending collapsed (`report.Run.ended_collapsed`) with
    Fisher's exact two-sided p of the two arms' counts (unadjusted), the mean token lag (agent tokens, every
    step) and the groups dropped as more than W versions old per run."""
    head = (
        "| hypothesis | arm | runs | ended collapsed | Fisher's exact p, two-sided, unadjusted | mean token lag "
        "| stale-dropped groups per run |\n|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for h in family:
        arms = [arm_group(grids[a.grid], a) for a in (h.better, h.other)]
        collapsed = [sum(r.ended_collapsed() for r in g.runs) for g in arms]
        sizes = [len(g.runs) for g in arms]
        p = fisher_collapses(collapsed[0], sizes[0], collapsed[1], sizes[1]).two_sided if all(sizes) else math.nan
        for i, g in enumerate(arms):
            lag = g.mean_of(M.STALENESS_MEAN, skip_first=False) if g.runs else math.nan
            fisher = "" if i else "-" if math.isnan(p) else f"{p:.3g}"
            rows.append(
                f"| {h.name if i == 0 else ''} | {g.label} | {sizes[i]} | {collapsed[i]} | {fisher} "
                f"| {'-' if math.isnan(lag) else f'{lag:.2f}'} | {g.stale_dropped_text() if g.runs else '-'} |"
            )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m twofold.study.confirm", description=__doc__.split("\n\n")[0])
    p.add_argument("--tooluse", required=True, help="grid folder of configs/study/confirm-tooluse-stale.yaml")
    p.add_argument("--stale", required=True, help="grid folder of configs/study/confirm-frozenlake-stale.yaml")
    p.add_argument(
        "--stale-noreset", required=True, help="grid folder of configs/study/confirm-frozenlake-stale-noreset.yaml"
    )
    for grid in EXPLORATORY_GRIDS:
        p.add_argument(f"--{grid.replace('_', '-')}", help=f"exploratory grid folder ({grid}); adds its comparisons")
    args = p.parse_args(argv)
    grids = {"tooluse": Path(args.tooluse), "stale": Path(args.stale), "stale_noreset": Path(args.stale_noreset)}
    extra = {g: Path(v) for g in EXPLORATORY_GRIDS if (v := getattr(args, g)) is not None}
    for grid, folder in {**grids, **extra}.items():
        if not folder.is_dir():  # else its hypotheses would print as tested on 0 pairs
            p.error(
                f"--{grid.replace('_', '-')}: no grid folder at {folder}: give the grid's --out folder or its "
                "committed copy under docs/results/data/"
            )
    first, last = SECONDARY_STEPS
    primary, secondary = analyse(grids, heldout_success), analyse(grids, stream_success)
    print("Primary endpoint: held-out success of the final checkpoint (Holm over H1-H4)\n")
    print(results_table(primary))
    print(pairs_table(primary))
    print(f"Secondary endpoint: mean training-stream success over steps {first}-{last} (Holm over H1-H4)\n")
    print(results_table(secondary))
    print(pairs_table(secondary))
    print("Descriptive: collapses, token lag and stale-dropped groups per arm\n")
    print(descriptive_table(grids))
    print("Exploratory arms, seeds 5-9, held-out success (unadjusted; they confirm nothing)\n")
    print(exploratory_table(explore({**grids, **extra}, heldout_success)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
