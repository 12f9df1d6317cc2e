"""`train()`: one training run (or its resumption) on the configured runtime."""

from __future__ import annotations

from pathlib import Path

from twofold.config import Config, ConfigError
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.resolve import resolve_model_path
from twofold.pipeline.rundir import default_run_dir, refuse_existing_run


def train(cfg: Config, run_dir: Path | None = None, *, resume: bool = False) -> tuple[Path, dict]:
    """Run (or resume) one training run; return (run directory, last metrics)."""
    if cfg.runtime.backend == "embedded":
        pipeline = Pipeline(cfg, run_dir, resume=resume)
        return pipeline.run_dir, pipeline.run()
    try:
        from twofold.pipeline.ray_runtime import RaySession
    except ImportError as e:
        raise ConfigError(
            "runtime.backend",
            f"Ray is not installed ({e}); `pip install twofold[ray]`, or use runtime.backend=embedded",
        ) from None
    run_dir = Path(run_dir or cfg.run.dir or default_run_dir(cfg))
    refuse_existing_run(run_dir, resume)  # here too: before any actor starts
    model_path = resolve_model_path(cfg, progress=cfg.run.progress)  # on the driver: actors share the path
    with RaySession(cfg, run_dir, model_path, resume=resume) as session:
        return run_dir, session.run()
