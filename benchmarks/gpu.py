"""GPU figures: tokens/s, seconds per step and its split, peak GPU memory, for the tiny model and a random
0.5B-shaped model (Qwen2.5-0.5B's shape), bfloat16, built-in engine and vLLM, snapshots on the host or on
the GPU. Run it whenever a GPU is lent; `--device cpu --models tiny --engines builtin` is a smoke run. Run on a GPU
once, the 0.5B shape with the built-in engine (docs/gpu/2026-12-04-h200-third/); vLLM cells never (no lent
image had vLLM).

    python benchmarks/gpu.py                       # everything, ~10 steps per cell
    python benchmarks/gpu.py --models tiny --engines builtin,vllm --steps 5

Each cell is a `twofold train` subprocess (its own CUDA context, so peak memory is its own); the table is
printed as Markdown from each run's metrics.jsonl (steps 2..N: step 1 fills the pipeline).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gpu_check import SIZES

from twofold.pipeline.rundir import read_metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="tiny,0.5b")
    ap.add_argument("--engines", default="builtin,vllm")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="runs/gpu-bench")
    args = ap.parse_args()

    import torch

    from twofold.envs import tokenizer_corpus
    from twofold.models import save_random_model

    out = Path(args.out)
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                models[name] = []  # the warm-started tiny model of configs/frozenlake.yaml
            else:
                path = save_random_model(Path(tmp) / name, corpus=tokenizer_corpus(), **SIZES["0.5b"].model)
                models[name] = [f"model.path={path}", "model.warmstart=false"]
        rows = []
        for model, model_args in models.items():
            for engine in args.engines.split(","):
                for snapshots in ("cpu", args.device):
                    cell = out / f"{model}-{engine}-snapshots-{snapshots}"
                    cmd = [
                        sys.executable,
                        "-m",
                        "twofold.cli",
                        "train",
                        "--config",
                        "configs/frozenlake.yaml",
                        *model_args,
                        f"engine.backend={engine}",
                        f"engine.device={args.device}",
                        f"trainer.device={args.device}",
                        "trainer.dtype=bfloat16",
                        "oldlogits.source=snapshot",
                        f"oldlogits.snapshot_device={snapshots}",
                        "trainer.max_tokens_per_microbatch=8192",
                        f"trainer.steps={args.steps}",
                        f"run.dir={cell}",
                        "run.progress=false",
                        "engine.gpu_memory_utilization=0.3",
                    ]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        print(f"{cell.name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                        continue
                    rows.append((cell.name, read_metrics(cell / "metrics.jsonl")[1:]))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{device}; torch {torch.__version__}; {args.steps} steps per cell, means over steps 2..N\n")
    print(
        "| cell | s/step | generation | old logits | training | weight sync | tokens/s | peak GPU GiB | snapshots MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, metrics in rows:

        def mean(key, metrics=metrics):
            vals = [r[key] for r in metrics if r.get(key) is not None]
            return statistics.mean(vals) if vals else float("nan")

        peak = max((r.get("memory/device_peak_bytes", 0.0) for r in metrics), default=0.0) / 2**30
        snap = max((r.get("snapshot/peak_bytes", 0.0) for r in metrics), default=0.0) / 2**20
        print(
            f"| {name} | {mean('time/step'):.2f} | {mean('time/generation'):.2f} | {mean('time/old_logits'):.2f} | "
            f"{mean('time/training'):.2f} | {mean('time/weight_sync'):.2f} | {mean('throughput/tokens_per_s'):,.0f} | "
            f"{peak:.1f} | {snap:,.0f} |"
        )


if __name__ == "__main__":
    main()
