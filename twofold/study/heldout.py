"""Held-out evaluation of a run's final checkpoint: the primary endpoint of the pre-registered confirmation
(docs/results.md, "Pre-registered confirmation").

Success on the training stream depends on which groups finish first and on the groups a source drops as
stale, which differ by source. Here the final weights of every run play one fixed set of tasks that no
training run draws: levels level_seed(seed + EVAL_SEED_OFFSET, k) for k < episodes, with the engine's
sampling seeded by `seed`, whatever the run's own seed. Runs of every source and seed are scored on the same
tasks, so the paired comparison is on one measurement.

The weights are the checkpoint of the run's last step, exported (LoRA merged) to RUN_DIR/heldout-model and
scored by `twofold eval`'s code path (`trainer.warmstart.evaluate`), with the run's engine and env. Simulated
env latency is set to 0: it changes how long an episode takes, never what happens in it.

    python -m twofold.study.heldout RUN_DIR [RUN_DIR ...] --episodes 256 --seed 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from twofold.config import Config, load_config
from twofold.envs.seeding import EVAL_SEED_OFFSET
from twofold.pipeline.export import EXPORT_INFO, export_run
from twofold.pipeline.rundir import HELDOUT_FILE, heldout_result, summary
from twofold.trainer.warmstart import evaluate

MODEL_DIR = "heldout-model"


@dataclasses.dataclass(frozen=True)
class HeldoutSpec:
    """Which held-out set: `episodes` levels of the evaluation seed `seed` (the same for every run)."""

    episodes: int
    seed: int

    def levels(self) -> str:
        return f"level_seed({self.seed} + {EVAL_SEED_OFFSET}, k) for k < {self.episodes}"


def heldout_config(cfg: Config, spec: HeldoutSpec) -> Config:
    """The run's config as the evaluation sees it: the spec's seed in place of the run's (so the levels and the
    sampling seed are the spec's), and no simulated env latency."""
    return dataclasses.replace(cfg, seed=spec.seed, env=dataclasses.replace(cfg.env, step_latency_ms=0.0))


def final_step(run_dir: Path) -> int | None:
    """The last step of a finished run, None while it has not finished."""
    s = summary(run_dir)
    return int(s["steps"]) if s and s.get("finished") else None


def heldout_done(run_dir: Path, spec: HeldoutSpec) -> bool:
    """Whether RUN_DIR/heldout.json holds this spec's evaluation of the run's final checkpoint."""
    found = heldout_result(run_dir) or {}
    scored = (found.get("episodes_requested"), found.get("eval_seed"), found.get("checkpoint_step"))
    return scored == (spec.episodes, spec.seed, final_step(run_dir))


def exported_final(run_dir: Path, step: int) -> Path:
    """RUN_DIR/heldout-model holding the weights of `step` (exported now unless an earlier call did)."""
    out = run_dir / MODEL_DIR
    info = out / EXPORT_INFO
    if info.exists():
        exported = json.loads(info.read_text())["step"]
        if exported != step:
            raise FileExistsError(f"{out} holds step {exported}, not the final step {step}; move it away")
        return out
    return export_run(run_dir, out, step=step, merge=True)


def evaluate_heldout(run_dir: str | Path, spec: HeldoutSpec) -> dict:
    """Score the final checkpoint of a finished run on the spec's held-out levels; writes RUN_DIR/heldout.json
    and returns what it holds."""
    run_dir = Path(run_dir)
    step = final_step(run_dir)
    if step is None:
        raise FileNotFoundError(f"{run_dir} has not finished (no summary.json with finished: true)")
    cfg = load_config(run_dir / "config.yaml")
    scores = evaluate(heldout_config(cfg, spec), exported_final(run_dir, step), spec.episodes)
    result = {
        "source": cfg.oldlogits.source,
        "seed": cfg.seed,
        "checkpoint_step": step,
        "eval_seed": spec.seed,
        "episodes_requested": spec.episodes,
        "levels": spec.levels(),
        **scores,
    }
    tmp = run_dir / (HELDOUT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(run_dir / HELDOUT_FILE)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m twofold.study.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--episodes", type=int, required=True, help="held-out levels per run")
    p.add_argument("--seed", type=int, required=True, help="evaluation seed: the same for every run compared")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes must be >= 1")
    spec = HeldoutSpec(args.episodes, args.seed)
    for run_dir in map(Path, args.run_dirs):
        if heldout_done(run_dir, spec):
            print(f"{run_dir}: {HELDOUT_FILE} already holds this evaluation")
            continue
        result = evaluate_heldout(run_dir, spec)
        print(f"{run_dir}: success {result['success_rate']:.3f} over {result['episodes']:.0f} held-out episodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
