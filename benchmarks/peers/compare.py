"""TRL's GRPOTrainer and twofold (sync and async) side by side on one task, model and settings.

    bash benchmarks/peers/setup.sh                  # once: TRL in its own virtual environment
    python benchmarks/peers/compare.py --steps 100  # prints a Markdown table

The task: 1,000 arithmetic word problems (`twofold dataset example`, verl's layout), one turn, exact reward
on <answer>...</answer>. The model: twofold's tiny model warm-started on that task (cached), given to both.
Settings matched: 8 prompts x 4 completions per step, one optimizer step per step, lr 2e-4, 16 new tokens,
temperature 1, no KL term, float32 generation (TRL generates with the training model), and one loss (group
advantages not scaled by their std, token-mean, clip 0.2 both sides, no dual clip, gradient norm 1). Throughput counts
completions (samples) and generated tokens over the whole training time; success is the mean reward of
the last 5 steps; peak memory is the process's maximum RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def max_rss_mib(stderr: str) -> float:
    line = next(x for x in stderr.splitlines() if "Maximum resident set size" in x)
    return int(line.split(":")[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--work", default="runs/peers")
    args = ap.parse_args()

    from twofold.config import load_config
    from twofold.envs.dataset import write_example
    from twofold.pipeline.resolve import resolve_model_path
    from twofold.pipeline.rundir import read_metrics

    work = Path(args.work)
    data = write_example(work / "word_problems.jsonl", "verl", n=1000)
    common = [
        f"env.options.path={data}",
        "trainer.num_minibatches=1",
        # the loss TRL runs (trl_grpo.py sets TRL's side to the same): clip 0.2 both sides, no dual clip,
        # group advantages not divided by their std, token-mean
        "loss.eps_high=0.2",
        "loss.dual_clip=null",
        "advantage.normalize_std=false",
        "loss.aggregation=token-mean",
        "trainer.gradient_checkpointing=true",  # both sides' default (TRL's GRPOConfig), named
        "run.progress=false",
        f"trainer.steps={args.steps}",
        "run.checkpoint_every=0",
        "engine.dtype=float32",  # TRL generates with the training model, in float32 on a CPU
    ]
    cfg = load_config("configs/dataset.yaml", common)
    model = resolve_model_path(cfg)  # the warm start, built once and cached
    rows = []

    trl_python = HERE / ".venv" / "bin" / "python"
    if trl_python.exists():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "trl.json"
            done = subprocess.run(
                [
                    str(trl_python),
                    str(HERE / "trl_grpo.py"),
                    "--model",
                    str(model),
                    "--data",
                    str(data),
                    "--steps",
                    str(args.steps),
                    "--out",
                    str(out),
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                r = json.loads(out.read_text())
                rows.append(
                    (
                        "TRL GRPOTrainer (sync)",
                        r["samples_per_s"],
                        r["tokens_per_s"],
                        sum(r["reward"][-5:]) / len(r["reward"][-5:]),
                        r["peak_rss_mib"],
                        r["seconds"],
                    )
                )
            else:
                print(f"TRL failed:\n{done.stderr[-3000:]}", file=sys.stderr)
    else:
        print("TRL is not set up: run `bash benchmarks/peers/setup.sh` first", file=sys.stderr)

    variants = (
        ("twofold sync", "sync", ["mode=sync"]),
        # the same work per step as TRL with num_iterations=1 (no separate old-log-prob forward)
        ("twofold sync, oldlogits.source=behavior", "sync-behavior", ["mode=sync", "oldlogits.source=behavior"]),
        ("twofold async", "async", ["mode=async"]),
    )
    for name, folder, overrides in variants:
        run = work / f"twofold-{folder}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        done = subprocess.run(
            [
                "/usr/bin/time",
                "-v",
                sys.executable,
                "-m",
                "twofold.cli",
                "train",
                "--config",
                "configs/dataset.yaml",
                *common,
                *overrides,
                f"run.dir={run}",
                f"model.path={model}",
                "model.warmstart=false",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        m = read_metrics(run / "metrics.jsonl")
        seconds = sum(r["time/step"] for r in m)
        rows.append(
            (
                name,
                sum(r["rollout/trajectories"] for r in m) / seconds,
                sum(r["throughput/tokens_per_s"] * r["time/step"] for r in m) / seconds,
                sum(r["success/rate"] for r in m[-5:]) / len(m[-5:]),
                max_rss_mib(done.stderr),
                seconds,
            )
        )

    print(f"{args.steps} steps, 8 prompts x 4 completions each, tiny model warm-started on the task\n")
    print("| trainer | samples/s | generated tokens/s | success (last 5 steps) | peak RSS | training time |")
    print("|---|---|---|---|---|---|")
    for name, samples, tokens, success, rss, seconds in rows:
        print(f"| {name} | {samples:.1f} | {tokens:,.0f} | {success:.3f} | {rss:,.0f} MiB | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
