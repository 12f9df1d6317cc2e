"""Where in a step the peak resident size is reached: each phase of the trainer's step on the SmolLM2 probe config
(benchmarks/real_model.py's), with the kernel's peak (VmHWM) reset as the phase starts.

    python benchmarks/memory_phases.py                                       # snapshot, full fine-tune
    python benchmarks/memory_phases.py trainer.gradient_checkpointing=true run.return_freed_memory=true

Prints, per step and phase, the resident size at its start, its peak and its end (GiB). The rollout thread runs
beside the phases (async mode), so a phase's peak includes whatever generation allocated meanwhile. Phases:
`source.prepare` (the batch's old log-probs), `fwd+bwd` (one minibatch's forward and backward), `before_update`
(the sources' work before the first optimizer step: snapshot captures the version being trained), the optimizer
step, and `publish` (weights to the engine, the new version to the sources).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path

from real_model import PROBE

from twofold.config import load_config
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.os_memory import reset_peak, resident_and_peak_bytes, resident_bytes

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def main() -> None:
    # The run's checkpoints are about 1.7 GiB: the folder goes when the figures are printed.
    with tempfile.TemporaryDirectory(prefix="memory-phases-") as folder:
        measure(Path(folder), sys.argv[1:])


def measure(out: Path, overrides: list[str]) -> None:
    data = out / "word_problems.jsonl"
    subprocess.run([sys.executable, "-m", "twofold.cli", "dataset", "example", str(data)], check=True)
    probe = [f"env.options.path={data}", "oldlogits.source=snapshot", "trainer.steps=4", *PROBE, *overrides]
    pipeline = Pipeline(load_config(ROOT / "configs" / "dataset.yaml", probe), out / "run")
    rows = []

    def measured(owner, name: str, label: str) -> None:
        phase = getattr(owner, name)

        @functools.wraps(phase)
        def run(*args, **kwargs):
            reset_peak()
            start = resident_bytes()
            result = phase(*args, **kwargs)
            resident, peak = resident_and_peak_bytes()
            rows.append((pipeline.step, label, start, peak, resident))
            return result

        setattr(owner, name, run)

    measured(pipeline.source, "prepare", "source.prepare")
    measured(pipeline.trainer, "accumulate_gradients", "fwd+bwd")
    measured(pipeline, "_before_update", "before_update")
    measured(pipeline.trainer.optimizer, "step", "optimizer.step")
    measured(pipeline, "_publish", "publish")
    pipeline.run()
    print("| step | phase | resident at start GiB | peak GiB | resident at end GiB |\n|---|---|---|---|---|")
    for step, label, start, peak, end in rows:
        print(f"| {step} | {label} | {start / GIB:.2f} | {peak / GIB:.2f} | {end / GIB:.2f} |")


if __name__ == "__main__":
    main()
