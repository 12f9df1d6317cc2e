"""TRL's GRPOTrainer and twofold (sync and async) side by side on one task, model and settings.

    bash benchmarks/peers/setup.sh                                 # once: TRL in its own virtual environment
    python benchmarks/peers/compare.py --steps 100                 # single turn: word problems
    python benchmarks/peers/compare.py --task tooluse --steps 10   # multi-turn: tool calls with tool latency

The task: 1,000 arithmetic word problems (`twofold dataset example`, verl's layout), one turn, exact reward
on <answer>...</answer>. The model: twofold's tiny model warm-started on that task (cached), given to both.
Settings matched: 8 prompts x 4 completions per step, one optimizer step per step, lr 2e-4, 16 new tokens,
temperature 1, no KL term, float32 generation (TRL generates with the training model), and one loss (group
advantages not scaled by their std, token-mean, clip 0.2 both sides, no dual clip, gradient norm 1). Throughput counts
completions (samples) and generated tokens over the whole training time; success is the mean reward of
the last 5 steps; peak memory is the process's maximum RSS.

`--task tooluse`: twofold's customer-service task (configs/tooluse.yaml: 1-6 tool calls per episode, each env
step waiting ~100 ms, log-normal), the committed tool-use warm start as the model for both, TRL through its own
agent path (`environment_factory`, trl_tooluse.py) with the same tools, schemas, waits and token budget, the same
loss and one optimizer step per step; twofold's engine in float32 as TRL's generation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def max_rss_mib(stderr: str) -> float:
    line = next(x for x in stderr.splitlines() if "Maximum resident set size" in x)
    return int(line.split(":")[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("dataset", "tooluse"), default="dataset")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--work", default="runs/peers")
    args = ap.parse_args()

    from twofold.config import load_config
    from twofold.envs.dataset import write_example
    from twofold.pipeline.resolve import resolve_model_path
    from twofold.pipeline.rundir import read_metrics

    work = Path(args.work)
    common = [
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
        "trainer.device=cpu",  # as TRL's use_cpu=True
        "engine.device=cpu",
    ]
    if args.task == "dataset":
        data = write_example(work / "word_problems.jsonl", "verl", n=1000)
        config = "configs/dataset.yaml"
        common.insert(0, f"env.options.path={data}")
        model = resolve_model_path(load_config(config, common))  # the warm start, built once and cached
        trl_script, trl_args = "trl_grpo.py", ["--data", str(data)]
    else:
        config = "configs/tooluse.yaml"
        model = ROOT / "docs" / "results" / "data" / "warmstarts" / "tooluse-c5cf8b953542"  # built by its config
        trl_script, trl_args = "trl_tooluse.py", ["--config", config]
    rows = []

    trl_python = HERE / ".venv" / "bin" / "python"
    if trl_python.exists():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "trl.json"
            done = subprocess.run(
                [str(trl_python), str(HERE / trl_script), "--model", str(model), "--steps", str(args.steps)]
                + [*trl_args, "--out", str(out)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},  # trl_tooluse.py plays twofold's own env
            )
            if done.returncode == 0:
                r = json.loads(out.read_text())
                rows.append(
                    (
                        "TRL GRPOTrainer (sync)",
                        r["samples_per_s"],
                        sum(r["reward"][-5:]) / len(r["reward"][-5:]),
                        r.get("tool_calls_per_sample", 0.0),  # each tool call waits; the final reply does not
                        0,
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
        run = work / f"twofold-{args.task}-{folder}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        done = subprocess.run(
            ["/usr/bin/time", "-v", sys.executable, "-m", "twofold.cli", "train", "--config", config]
            + [*common, *overrides, f"run.dir={run}", f"model.path={model}", "model.warmstart=false"],
            capture_output=True,
            text=True,
            cwd=ROOT,
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
                sum(r["success/rate"] for r in m[-5:]) / len(m[-5:]),
                sum(r["rollout/turns_mean"] for r in m) / len(m),  # every env step waits, the final reply's too
                sum(r["rollout/stale_dropped_groups"] for r in m),  # generated, not trained, not counted
                max_rss_mib(done.stderr),
                seconds,
            )
        )

    task = "one turn" if args.task == "dataset" else "multi-turn tool use, ~100 ms per env step"
    print(f"{args.steps} steps, 8 prompts x 4 completions each, {task}, the same warm-started tiny model\n")
    print(
        "| trainer | samples/s | vs TRL | success (last 5 steps) | waits per sample | stale-dropped groups "
        "| peak RSS | training time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0][1] if rows and rows[0][0].startswith("TRL") else None
    for name, samples, success, waits, dropped, rss, seconds in rows:
        ratio = f"{samples / base:.2f}x" if base else "-"
        print(
            f"| {name} | {samples:.2f} | {ratio} | {success:.3f} | {waits:.2f} | {dropped:.0f} | {rss:,.0f} MiB "
            f"| {seconds:.0f} s |"
        )


if __name__ == "__main__":
    main()
