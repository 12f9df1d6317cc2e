"""Which tests make the test suite's processes large: a pytest plugin that records, after every test, the peak
resident size its worker reached during that test and the largest process the worker has waited for so far.

    rm -f runs/suite_memory.jsonl     # rows are appended: one file per measured run
    PYTHONPATH=benchmarks .venv/bin/python -m pytest tests -n 2 --dist loadfile -p suite_memory
    .venv/bin/python benchmarks/suite_memory.py            # the table, from what the run wrote

Each worker's peak (Linux's VmHWM) is reset before every test, so a row's
`worker peak` is that test's own. `children peak` is getrusage(RUSAGE_CHILDREN).ru_maxrss: the largest
descendant the worker has reaped, which only grows, so a test that raised it is the one that started that
process. Rows go to $TWOFOLD_SUITE_MEMORY (default runs/suite_memory.jsonl), one file for all workers.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

from twofold.pipeline.os_memory import reset_peak, resident_and_peak_bytes

OUT = Path(os.environ.get("TWOFOLD_SUITE_MEMORY", "runs/suite_memory.jsonl"))
GIB = 2**30


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up: their memory is the test's
def pytest_runtest_setup(item):
    reset_peak()


@pytest.hookimpl(trylast=True)  # after the test's fixtures are torn down: what the worker carries on
def pytest_runtest_teardown(item, nextitem):
    resident, peak = resident_and_peak_bytes()
    row = {
        "test": item.nodeid,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "worker_peak": peak or 0,  # 0 where there is no /proc (not Linux)
        "worker_resident": resident or 0,
        "children_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "finished_at": time.time(),  # each worker's last row: when it ran out of files
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main(path: Path = OUT, top: int = 20) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    print(f"{len(rows)} tests; the {top} with the largest worker peak (GiB):")
    print("| test | worker | worker peak | worker resident after |")
    print("|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["worker_peak"])[:top]:
        print(f"| {r['test']} | {r['worker']} | {r['worker_peak'] / GIB:.2f} | {r['worker_resident'] / GIB:.2f} |")
    last: dict[str, float] = {}
    for r in rows:
        last[r["worker"]] = max(last.get(r["worker"], 0.0), r.get("finished_at", 0.0))
    if all(last.values()):
        start = min(last.values())
        print(
            "\nWorkers' last test, seconds after the first worker ran out: "
            + ", ".join(f"{w} +{t - start:.0f}" for w, t in sorted(last.items()))
        )
    print("\nTests that started a process larger than any before it on their worker (GiB):")
    print("| test | worker | children peak |")
    print("|---|---|---|")
    seen: dict[str, int] = {}
    for r in rows:
        if r["children_peak"] > seen.get(r["worker"], 0):
            seen[r["worker"]] = r["children_peak"]
            print(f"| {r['test']} | {r['worker']} | {r['children_peak'] / GIB:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
