"""Where the test suite's CPU goes: a pytest plugin that records, for every test, the machine's busy CPU-seconds
and the wall seconds from its setup to its teardown, and for the whole session how busy the cores were.

    rm -f runs/suite_cpu.jsonl        # rows are appended: one file per measured run
    PYTHONPATH=benchmarks .venv/bin/python -m pytest tests -p suite_cpu               # one process: per-test CPU
    PYTHONPATH=benchmarks .venv/bin/python -m pytest tests -n 2 --dist loadfile -p suite_cpu   # as `make test`
    .venv/bin/python benchmarks/suite_cpu.py            # the tables, from what the run wrote

The CPU is the whole machine's (Linux's /proc/stat: user, nice, system, irq, softirq, steal), so it counts what a
test's subprocesses, Ray actors and vLLM engines burn, which the test's own process times would not. That makes
a row the test's own only when nothing else runs: one pytest process (no `-n`) on an otherwise idle machine.
With two workers the per-test rows overlap, but the session row still says how busy the cores were: near 100%,
the suite is CPU-bound and its length is its CPU over the cores; well below, it waits (sleeps, polling, one
worker left with the last file). Rows go to $TWOFOLD_SUITE_CPU (default runs/suite_cpu.jsonl).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

OUT = Path(os.environ.get("TWOFOLD_SUITE_CPU", "runs/suite_cpu.jsonl"))
TICKS = os.sysconf("SC_CLK_TCK")


def busy_and_total_seconds() -> tuple[float, float]:
    """The machine's busy and total CPU-seconds since boot, over all cores (the first line of /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy / TICKS, (busy + idle + iowait) / TICKS


def _write(row: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    busy, wall = busy_and_total_seconds()[0], time.monotonic()
    yield
    _write(
        {
            "test": item.nodeid,
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
            "cpu_s": round(busy_and_total_seconds()[0] - busy, 2),
            "wall_s": round(time.monotonic() - wall, 2),
        }
    )


_session: dict = {}


def pytest_sessionstart(session):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller (or the one process): the whole session
        _session["busy"], _session["total"] = busy_and_total_seconds()
        _session["wall"] = time.monotonic()


def pytest_sessionfinish(session):
    if _session:
        busy, total = busy_and_total_seconds()
        _write(
            {
                "session": True,
                "workers": int(getattr(session.config.option, "numprocesses", 0) or 0),
                "cores": os.cpu_count(),
                "cpu_s": round(busy - _session["busy"], 1),
                "wall_s": round(time.monotonic() - _session["wall"], 1),
                "busy_fraction": round((busy - _session["busy"]) / (total - _session["total"]), 3),
            }
        )


def main(path: Path = OUT, top: int = 25) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tests = [r for r in rows if "test" in r]
    for s in (r for r in rows if r.get("session")):
        print(
            f"session: {s['workers'] or 1} worker(s) on {s['cores']} cores, {s['wall_s']:.0f} s, "
            f"{s['cpu_s']:.0f} CPU-s, cores busy {100 * s['busy_fraction']:.0f}% of the time"
        )
    print(f"\n{len(tests)} tests, {sum(r['cpu_s'] for r in tests):.0f} CPU-s; per file:")
    print("| file | CPU-s | wall s |\n|---|---|---|")
    cpu, wall = Counter(), Counter()
    for r in tests:
        cpu[r["test"].split("::")[0]] += r["cpu_s"]
        wall[r["test"].split("::")[0]] += r["wall_s"]
    for name, seconds in cpu.most_common(12):
        print(f"| {name} | {seconds:.0f} | {wall[name]:.0f} |")
    print(f"\nthe {top} tests that use the most CPU:\n| test | CPU-s | wall s |\n|---|---|---|")
    for r in sorted(tests, key=lambda r: -r["cpu_s"])[:top]:
        print(f"| {r['test']} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
