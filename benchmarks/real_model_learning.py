"""Does RL improve a real model here? SmolLM2-135M-Instruct on `larger_number`, several seeds, with a held-out
evaluation of each exported final model against the starting model (issue 34, item 7).

    python benchmarks/real_model_learning.py --seeds 0,1,2 --out runs/smollm2-larger

Per seed: `twofold train --config configs/smollm2.yaml seed=S` (async W = 2, `snapshot`, 30 steps; it exports
the final model), then `twofold eval` of that export on a held-out file written with another generator seed
(`twofold dataset example --task larger_number --seed 1`), and the starting model on the same file once.
A seed whose run already finished (its summary.json says so) is not trained again, so the script resumes
where it stopped. Prints, per seed, the training-stream success over the first and last 5 steps and the
held-out success, then the mean of each difference with a two-sided 95% Student t interval over seeds
(descriptive at this n: 3 seeds give 2 degrees of freedom).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from scipy import stats

from twofold import metrics as M

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2.yaml"
WINDOW = 5


def twofold(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "twofold.cli", *args], check=True, cwd=ROOT, capture_output=True, text=True
    ).stdout


def heldout_success(data: Path, episodes: int, model: Path | None) -> float:
    args = ["eval", "--config", str(CONFIG), f"env.options.path={data}", "--episodes", str(episodes)]
    out = twofold(*args, *(["--model", str(model)] if model else []))
    return json.loads(out)["success_rate"]


def train(run_dir: Path, seed: int, steps: int, train_data: Path) -> None:
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("finished"):
        return
    if run_dir.exists():  # stopped part-way: go on from its last checkpoint
        twofold("train", "--resume", str(run_dir))
        return
    twofold(
        "train",
        "--config",
        str(CONFIG),
        f"seed={seed}",
        f"trainer.steps={steps}",
        f"env.options.path={train_data}",
        f"run.dir={run_dir}",
        "run.progress=false",
    )


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student t interval over seeds."""
    mean = statistics.fmean(values)
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--episodes", type=int, default=128, help="held-out rows per evaluation")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "smollm2-larger")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_data, heldout = args.out / "larger.jsonl", args.out / "larger-heldout.jsonl"
    for path, seed in ((train_data, 0), (heldout, 1)):
        if not path.exists():
            twofold("dataset", "example", str(path), "--task", "larger_number", "--seed", str(seed), "--n", "500")
    start = heldout_success(heldout, args.episodes, None)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dir = args.out / f"snapshot-seed{seed}"
        train(run_dir, seed, args.steps, train_data)
        success = [json.loads(line)[M.SUCCESS_RATE] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        first, last = statistics.fmean(success[:WINDOW]), statistics.fmean(success[-WINDOW:])
        final = heldout_success(heldout, args.episodes, run_dir / "export")
        rows.append((seed, first, last, final))
        print(f"seed {seed}: first {WINDOW} {first:.3f}, last {WINDOW} {last:.3f}, held-out {start:.3f} -> {final:.3f}")
    print(f"\n| seed | steps 1-{WINDOW} | last {WINDOW} steps | difference | held-out, start | held-out, final |")
    print("|---|---|---|---|---|---|")
    for seed, first, last, final in rows:
        print(f"| {seed} | {first:.3f} | {last:.3f} | {last - first:+.3f} | {start:.3f} | {final:.3f} |")
    if len(rows) > 1:
        for name, values in (
            (f"last {WINDOW} - first {WINDOW}", [r[2] - r[1] for r in rows]),
            ("held-out final - start", [r[3] - start for r in rows]),
        ):
            mean, low, high = interval(values)
            print(f"{name}: mean {mean:+.3f}, 95% t interval [{low:+.3f}, {high:+.3f}] over {len(rows)} seeds")


if __name__ == "__main__":
    main()
