"""Does splitting torch's CPU threads pay for a whole async run? The same run twice per seed, the split pinned off
(every thread for the trainer and the rollout thread) and pinned on (half each), no trial: samples and batch tokens
a second over the steps after the first, and the episodes' mean turns (a policy that learns shorter episodes
flatters samples a second).

    python benchmarks/cpu_threads.py --config configs/tooluse.yaml --seeds 0,1 --steps 30
    python benchmarks/cpu_threads.py --seeds 0 --repeats 3 trainer.lr=1e-12   # the policy held still

The in-run trial (`run.split_cpu_threads`, `twofold/pipeline/cpu_threads.py`) judges the split step by step; this
judges it by what a user sees at the end. But which groups finish first changes what an agent policy learns, and so
what its steps cost: two runs of one setting and seed have differed 2.1x in samples a second here, more than the
split changes. A learning rate near 0 keeps both settings sampling one policy, and `--repeats` runs each pair again
(the order turning: shared-split, split-shared, ...) so the spread is measured too. Run it with nothing else on the
machine. Prints a Markdown table, then the geometric mean of each seed's split / shared ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

from twofold import metrics as M
from twofold.config import load_config
from twofold.pipeline.cpu_threads import CpuThreads
from twofold.pipeline.rundir import read_metrics
from twofold.pipeline.train import train

QUIET = ["run.progress=false", "run.tensorboard=false", "run.checkpoint_every=0", "mode=async"]


def pin(split: bool) -> None:
    """Every run after this keeps `split` from its first step on: the trial never runs."""

    def observe(self, tokens: float, wall: float) -> None:
        self.split = split
        return None

    CpuThreads.observe = observe


def run(config: str, seed: int, steps: int, split: bool, out: Path, overrides: list[str]) -> dict:
    pin(split)
    cfg = load_config(config, [*QUIET, f"seed={seed}", f"trainer.steps={steps}", *overrides])
    run_dir, _ = train(cfg, out / f"seed{seed}-{'split' if split else 'shared'}")
    rows = read_metrics(run_dir / "metrics.jsonl")[1:]  # the first step fills the pipeline
    wall = sum(r[M.STEP_SECONDS] for r in rows)
    return {
        "samples/s": sum(r[M.SAMPLES_PER_S] * r[M.STEP_SECONDS] for r in rows) / wall,
        "tokens/s": sum(r[M.TOKENS] for r in rows) / wall,
        "turns": statistics.fmean(r.get(M.TURNS_MEAN, 1.0) for r in rows),
        "split": statistics.fmean(r[M.CPU_THREADS_SPLIT] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tooluse.yaml")
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs per seed")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args()
    print("| seed | repeat | threads | samples/s | batch tokens/s | turns | split / shared (samples/s) |")
    print("|---|---|---|---|---|---|---|")
    ratios: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="cpu-threads-") as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for repeat in range(args.repeats):
                order = (False, True) if repeat % 2 == 0 else (True, False)
                done = {
                    split: run(args.config, seed, args.steps, split, Path(tmp) / str(repeat), args.overrides)
                    for split in order
                }
                shared, split = done[False], done[True]
                ratios.setdefault(seed, []).append(split["samples/s"] / shared["samples/s"])
                for name, r in (("all each", shared), ("half each", split)):
                    ratio = f"{ratios[seed][-1]:.2f}x" if r is split else ""
                    print(
                        f"| {seed} | {repeat} | {name} | {r['samples/s']:.2f} | {r['tokens/s']:,.0f} | "
                        f"{r['turns']:.2f} | {ratio} |",
                        flush=True,
                    )
    for seed, found in ratios.items():
        mean = math.exp(statistics.fmean(math.log(x) for x in found))
        print(
            f"seed {seed}: split / shared {mean:.2f}x (geometric mean of {len(found)}: "
            f"{', '.join(f'{x:.2f}' for x in found)})"
        )


if __name__ == "__main__":
    main()
