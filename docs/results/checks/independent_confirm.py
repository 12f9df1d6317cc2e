#!/usr/bin/env python3
"""Independent check of the pre-registered confirmation (docs/results.md, "Pre-registered confirmation
(registered 2026-12-03, before any run)").  Written by a reviewer from the registration text, tested on synthetic
grids with hand-derived p-values before it saw any data, and run once on the committed grids; it imports no twofold
code, so it checks `twofold/study/confirm.py` rather than repeating it.

    python docs/results/checks/independent_confirm.py --tooluse DIR --stale DIR --stale-noreset DIR [--json OUT.json]

Hypotheses (difference = first arm - second arm on the same seed, seeds 5-14, one-sided):
  H1  tool use (b):      snapshot - recompute                         > 0
  H2  FrozenLake (b):    snapshot - recompute                         > 0
  H3  FrozenLake (b):    ewma - snapshot                              > -0.05  (tested as d + 0.05 > 0)
  H4  ewma (no-reset folder) - ewma (FrozenLake (b) folder)           > 0
Primary endpoint: `success_rate` of each cell's heldout.json.
Secondary endpoint: mean of `success/rate` over the metrics.jsonl rows with step 21..60 (all 40 must be there).
Test: exact paired sign-flip test over all 2^n sign assignments, p = share with sum >= observed sum.
Holm step-down over H1-H4 per endpoint, alpha 0.05 (adjusted p: running max, capped at 1).

Implementation choices (independent of twofold's code):
  * Values are taken as exact rationals of their shortest decimal form (Fraction(repr(x))), the margin as
    exactly 1/20, the secondary mean as an exact rational; the enumeration then compares integers, so ties
    are exact with no tolerance.  A float re-computation with a 1e-12 tolerance is done beside it and any
    disagreement is printed as a WARNING.
  * metrics.jsonl: every line is parsed; an unparsable line is skipped with a WARNING (it does not end the
    file).  A step logged twice keeps its LAST row (the row of the resumed run, the one the final checkpoint
    descends from); duplicates are reported as a WARNING, with whether their values differ.
  * A seed whose value is missing in either arm (no cell, no heldout.json, or a step of 21..60 missing or
    non-numeric) leaves its pair out; the test runs on the remaining pairs and the table names the seed.
    With 0 pairs p = 1.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from fractions import Fraction
from pathlib import Path

ALPHA = 0.05
SEEDS = tuple(range(5, 15))
FIRST_STEP, LAST_STEP = 21, 60
FINAL_STEP = 60
HELDOUT_EPISODES = 256

# name, statement, (grid, source) first arm, (grid, source) second arm, margin
FAMILY = (
    ("H1", "tool use (b): snapshot - recompute > 0", ("tooluse", "snapshot"), ("tooluse", "recompute"), Fraction(0)),
    ("H2", "FrozenLake (b): snapshot - recompute > 0", ("stale", "snapshot"), ("stale", "recompute"), Fraction(0)),
    ("H3", "FrozenLake (b): ewma - snapshot > -0.05", ("stale", "ewma"), ("stale", "snapshot"), Fraction(1, 20)),
    ("H4", "FrozenLake (b): ewma no-reset - ewma reset > 0", ("stale_noreset", "ewma"), ("stale", "ewma"), Fraction(0)),
)

T975 = {  # two-sided 95% t quantiles, used only when scipy is absent
    1: 12.706205,
    2: 4.302653,
    3: 3.182446,
    4: 2.776445,
    5: 2.570582,
    6: 2.446912,
    7: 2.364624,
    8: 2.306004,
    9: 2.262157,
    10: 2.228139,
    11: 2.200985,
    12: 2.178813,
    13: 2.160369,
    14: 2.144787,
    15: 2.131450,
    16: 2.119905,
    17: 2.109816,
    18: 2.100922,
    19: 2.093024,
    20: 2.085963,
}

WARNINGS: list[str] = []


def warn(msg: str) -> None:
    WARNINGS.append(msg)


def exact(x) -> Fraction:
    """The exact rational of a JSON number as written (0.45 -> 9/20, not the binary double)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"not a finite number: {x!r}")
    return Fraction(repr(x)) if isinstance(x, float) else Fraction(x)


# ----------------------------------------------------------------------------------------------- data


def cells(grid: Path, source: str) -> dict[int, Path]:
    """{seed: folder} of the cells named exactly SOURCE-seedN in a grid folder."""
    pat = re.compile(r"^" + re.escape(source) + r"-seed([0-9]+)$")
    out = {}
    for p in sorted(grid.iterdir()):
        m = pat.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def primary_value(cell: Path, source: str, seed: int) -> Fraction | None:
    f = cell / "heldout.json"
    if not f.exists():
        warn(f"{cell}: no heldout.json (pair left out of the primary)")
        return None
    try:
        h = json.loads(f.read_text())
        v = exact(h["success_rate"])
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        warn(f"{cell}: unreadable heldout.json success_rate ({e}); pair left out of the primary")
        return None
    # consistency checks (warnings only; they do not change the value)
    if "checkpoint_step" in h and h["checkpoint_step"] != FINAL_STEP:
        warn(
            f"{cell}: heldout.json checkpoint_step = {h['checkpoint_step']} "
            f"(registered: the final checkpoint, step {FINAL_STEP})"
        )
    for key in ("episodes", "episodes_requested"):
        if key in h and h[key] != HELDOUT_EPISODES:
            warn(f"{cell}: heldout.json {key} = {h[key]} (registered: {HELDOUT_EPISODES})")
    if "eval_seed" in h and h["eval_seed"] != 1000:
        warn(f"{cell}: heldout.json eval_seed = {h['eval_seed']} (registered: 1000)")
    if "seed" in h and h["seed"] != seed:
        warn(f"{cell}: heldout.json seed = {h['seed']} but the folder says seed {seed}")
    if "source" in h and h["source"] != source:
        warn(f"{cell}: heldout.json source = {h['source']!r} but the folder says {source!r}")
    return v


def secondary_value(cell: Path) -> Fraction | None:
    f = cell / "metrics.jsonl"
    if not f.exists():
        warn(f"{cell}: no metrics.jsonl (pair left out of the secondary)")
        return None
    by_step: dict[int, object] = {}
    dup_steps, dup_differ = [], []
    for lineno, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warn(f"{cell}/metrics.jsonl line {lineno}: unparsable line skipped")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            warn(f"{cell}/metrics.jsonl line {lineno}: row without an integer 'step' skipped")
            continue
        s = row["step"]
        v = row.get("success/rate")
        if s in by_step:
            dup_steps.append(s)
            if by_step[s] != v:
                dup_differ.append(s)
        by_step[s] = v  # the last row of a step wins
    if dup_steps:
        inwin = sorted({s for s in dup_steps if FIRST_STEP <= s <= LAST_STEP})
        warn(
            f"{cell}/metrics.jsonl: {len(dup_steps)} duplicated step rows (steps {min(dup_steps)}-{max(dup_steps)}; "
            f"{len(inwin)} in the {FIRST_STEP}-{LAST_STEP} window; values differ at {len(set(dup_differ))} steps); "
            "the last row of each step is used"
        )
    total = Fraction(0)
    for s in range(FIRST_STEP, LAST_STEP + 1):
        v = by_step.get(s)
        try:
            total += exact(v)
        except ValueError:
            warn(
                f"{cell}/metrics.jsonl: step {s} missing or success/rate not numeric ({v!r}); "
                "pair left out of the secondary"
            )
            return None
    if max(by_step, default=0) < FINAL_STEP:
        warn(f"{cell}/metrics.jsonl: last step {max(by_step, default=0)} < {FINAL_STEP}")
    return total / (LAST_STEP - FIRST_STEP + 1)


def arm_values(grid: Path, source: str, endpoint: str) -> dict[int, Fraction]:
    out = {}
    for seed, cell in cells(grid, source).items():
        if seed not in SEEDS:
            continue
        v = primary_value(cell, source, seed) if endpoint == "primary" else secondary_value(cell)
        if v is not None:
            out[seed] = v
    return out


# ----------------------------------------------------------------------------------------------- statistics


def sign_flip_exact(d: list[Fraction]) -> Fraction:
    """One-sided exact p: share of the 2^n assignments e with sum e_i |d_i| >= sum d_i (exact integers)."""
    n = len(d)
    if n == 0:
        return Fraction(1)
    den = 1
    for x in d:
        den = den * x.denominator // math.gcd(den, x.denominator)
    a = [abs(int(x * den)) for x in d]
    obs = int(sum(d) * den)
    total = sum(a)
    hits = 0
    for mask in range(1 << n):  # bit i set: d_i gets a minus sign
        neg = 0
        for i in range(n):
            if mask >> i & 1:
                neg += a[i]
        if total - 2 * neg >= obs:
            hits += 1
    return Fraction(hits, 1 << n)


def sign_flip_float(d: list[float], tol: float = 1e-12) -> float:
    """The same test in floating point with an absolute tolerance for ties (a cross-check)."""
    n = len(d)
    if n == 0:
        return 1.0
    obs = sum(d)
    hits = 0
    for mask in range(1 << n):
        s = sum(-abs(x) if mask >> i & 1 else abs(x) for i, x in enumerate(d))
        if s >= obs - tol:
            hits += 1
    return hits / (1 << n)


def holm(ps: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (m = len(ps)), in input order."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    adj = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        adj[i] = running
    return adj


def t_quantile(df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return T975[df]


def t_interval(d: list[float]) -> tuple[float, float, float] | None:
    n = len(d)
    if n == 0:
        return None
    mean = sum(d) / n
    if n == 1:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------------------------- analysis


def analyse(grids: dict[str, Path], endpoint: str) -> list[dict]:
    cache: dict[tuple[str, str], dict[int, Fraction]] = {}

    def values(arm):
        if arm not in cache:
            cache[arm] = arm_values(grids[arm[0]], arm[1], endpoint)
        return cache[arm]

    results = []
    for name, statement, first, second, margin in FAMILY:
        a, b = values(first), values(second)
        seeds = [s for s in SEEDS if s in a and s in b]
        missing = [s for s in SEEDS if s not in seeds]
        diffs = [a[s] - b[s] for s in seeds]  # unshifted, exact
        shifted = [x + margin for x in diffs]
        p_exact = sign_flip_exact(shifted)
        fdiffs = [float(a[s]) - float(b[s]) for s in seeds]  # float path, as a program would compute it
        p_float = sign_flip_float([x + float(margin) for x in fdiffs])
        if abs(float(p_exact) - p_float) > 1e-15:
            warn(f"{endpoint} {name}: exact p {float(p_exact):.6g} != float p {p_float:.6g} (a tie broken by rounding)")
        results.append(
            {
                "hypothesis": name,
                "statement": statement,
                "n": len(seeds),
                "seeds": seeds,
                "missing": missing,
                "differences": [float(x) for x in diffs],
                "margin": float(margin),
                "hits": int(p_exact * (1 << len(seeds))),
                "p": float(p_exact),
                "p_float": p_float,
                "t": t_interval([float(x) for x in diffs]),
            }
        )
    for r, adj in zip(results, holm([r["p"] for r in results]), strict=True):
        r["p_holm"] = adj
        r["confirmed"] = adj <= ALPHA
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| hyp | statement | n pairs | missing seeds | mean diff | 95% t CI (descriptive) | p (hits/2^n) | Holm p "
        "| confirmed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["t"]
        mean = "-" if t is None else f"{t[0]:+.4f}"
        ci = "-" if t is None or math.isnan(t[1]) else f"[{t[1]:+.4f}, {t[2]:+.4f}]"
        lines.append(
            f"| {r['hypothesis']} | {r['statement']} | {r['n']} | {', '.join(map(str, r['missing'])) or 'none'} | "
            f"{mean} | {ci} | {r['p']:.6g} ({r['hits']}/{1 << r['n']}) | {r['p_holm']:.6g} | "
            f"{'yes' if r['confirmed'] else 'no'} |"
        )
    lines.append("")
    lines.append("Per-seed differences (first arm - second arm, unshifted):")
    for r in results:
        lines.append(
            f"  {r['hypothesis']}: "
            + (", ".join(f"{s}: {d:+.4f}" for s, d in zip(r["seeds"], r["differences"], strict=True)) or "(none)")
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tooluse", required=True)
    ap.add_argument("--stale", required=True)
    ap.add_argument("--stale-noreset", required=True)
    ap.add_argument("--json", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    grids = {"tooluse": Path(args.tooluse), "stale": Path(args.stale), "stale_noreset": Path(args.stale_noreset)}
    for role, folder in grids.items():
        if not folder.is_dir():
            ap.error(f"--{role.replace('_', '-')}: {folder} is not a folder")
    out = {}
    for endpoint, title in (
        ("primary", "PRIMARY endpoint: held-out success_rate (heldout.json); Holm over H1-H4, alpha 0.05"),
        (
            "secondary",
            f"SECONDARY endpoint: mean success/rate over steps {FIRST_STEP}-{LAST_STEP} (metrics.jsonl); "
            "Holm over H1-H4",
        ),
    ):
        res = analyse(grids, endpoint)
        out[endpoint] = res
        print(title + "\n")
        print(table(res))
    if WARNINGS:
        print("WARNINGS:")
        for w in dict.fromkeys(WARNINGS):
            print("  - " + w)
    else:
        print("No warnings.")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
