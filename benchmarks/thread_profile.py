"""Where one thread's time goes, from py-spy's sampled stacks: each function's inclusive samples in one thread.

    py-spy record --threads --idle --rate 40 --format raw -o async.txt -- \
        twofold train --config configs/tooluse.yaml trainer.lr=1e-12 trainer.steps=10 run.split_cpu_threads=false
    py-spy record --threads --idle --rate 40 --format raw -o sync.txt -- \
        twofold train --config configs/tooluse.yaml mode=sync trainer.lr=1e-12 trainer.steps=10
    python benchmarks/thread_profile.py async.txt:rollout sync.txt:MainThread --top 40

Each argument is PROFILE:THREAD (py-spy's thread name: `rollout` is the async rollout thread; in sync mode the
rollout runs in `MainThread`; stacks py-spy could not name a thread for, start-up's, are left out). A function
counts once per sampled stack it is on (recursion is not counted twice), so a row is the samples (at the recorded
rate) spent in it or below it. With two profiles of runs that did the same work (the policy held still, the same
steps), the last column compares their samples: how much more time one mode spends in each part.
py-spy is not a dependency of twofold: `pip install py-spy`.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def inclusive_samples(lines, thread: str) -> tuple[Counter, int]:
    """(samples per function, the thread's samples) over py-spy raw lines `thread (id): name;frame;... count`."""
    per_function: Counter = Counter()
    total = 0
    for line in lines:
        stack, count = line.rstrip("\n").rsplit(" ", 1)
        frames = stack.split(";")
        if not frames[0].endswith(f": {thread}"):
            continue
        total += int(count)
        for name in {re.sub(r" \(.*", "", frame) for frame in frames[1:]}:
            per_function[name] += int(count)
    return per_function, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", help="PROFILE:THREAD, one or two")
    parser.add_argument("--top", type=int, default=30, help="functions shown, by the first profile's samples")
    args = parser.parse_args()
    counts = []
    for spec in args.profiles:
        path, thread = spec.rsplit(":", 1)
        with open(path) as f:
            counts.append(inclusive_samples(f, thread))
    header = " | ".join(f"{spec} samples | %" for spec in args.profiles)
    print(f"| function | {header} |" + (" first / second |" if len(counts) == 2 else ""))
    print("|---" * (1 + 2 * len(counts) + (len(counts) == 2)) + "|")
    first = counts[0][0]
    for name, _ in first.most_common(args.top):
        cells = " | ".join(f"{c[name]} | {100 * c[name] / max(total, 1):.1f}" for c, total in counts)
        if len(counts) == 2:
            ratio = f" {first[name] / counts[1][0][name]:.2f}x |" if counts[1][0][name] else " |"
        else:
            ratio = ""
        print(f"| {name} | {cells} |" + ratio)


if __name__ == "__main__":
    main()
