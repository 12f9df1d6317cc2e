"""A run directory: resolved config, metrics (JSONL + TensorBoard), atomic checkpoints.

Layout:
    config.yaml            the resolved config
    model_folder.txt       the local folder the run's model was loaded from (`model.path` resolved, or the tiny
                           model's cache entry), absolute: resume and export load it without resolving again
    metrics.jsonl          one JSON object per train step, appended and flushed per line
    tb/                    TensorBoard event files
    checkpoints/step_N/    the last `run.keep_checkpoints` checkpoints, each written atomically (checkpoint.py)
    summary.json           written when the run stops: finished (all steps) or stopped by a signal
    snapshots/             weight snapshots while the run holds them (`oldlogits.snapshot_device=disk`), a
                           directory per process, removed with it
    run.lock               held (flock) by the process writing the run; holds its pid
    heldout.json           the final checkpoint scored on held-out tasks (`twofold compare --heldout`)
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
import uuid
from pathlib import Path

from twofold.config import Config, ConfigError

SNAPSHOT_DIRECTORY = "snapshots"
HELDOUT_FILE = "heldout.json"
# In a `twofold export` folder (export.py): which run, step and version it came from.
EXPORT_INFO = "twofold_export.json"
EXPORT_CONFIG = "twofold_config.yaml"  # an export's copy of its run's config.yaml
MODEL_FOLDER = "model_folder.txt"


def atomic_write_bytes(path: Path, write) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def lock_run_dir(run_dir: Path):
    """Hold `run_dir/run.lock` while this process writes the run, and return the open lock file.

    A second writer (a cell left running by a killed `twofold compare`, a resume started twice) would
    interleave its steps and checkpoints with this one's. flock goes with the process however it ends,
    so a killed run never leaves the directory locked."""
    fh = open(run_dir / "run.lock", "a+")  # noqa: SIM115 (held for the whole run; Pipeline.close closes it)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        if holder == str(os.getpid()):  # flock is per open file: this process holds it through another one
            raise ConfigError(
                "run.dir",
                f"{str(run_dir)!r} is held by this process: an earlier Pipeline on it was not closed "
                "(call its close(), as run() does when it ends)",
            ) from None
        raise ConfigError(
            "run.dir",
            f"{str(run_dir)!r} is being written by another twofold process (pid {holder}); wait for it to end "
            f"or stop it, then continue with `twofold train --resume {run_dir}`",
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def read_metrics(path: str | Path) -> list[dict]:
    """Complete lines of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class MetricsSink:
    """One metrics row per step to metrics.jsonl (the record), TensorBoard and, when configured, W&B."""

    def __init__(
        self, run_dir: Path, tensorboard: bool, resume_step: int | None = None, wandb=None, config: dict | None = None
    ):
        self.path = run_dir / "metrics.jsonl"
        self.kept_rows: list[dict] = []  # a resumed run's rows up to its checkpoint
        if resume_step is not None:
            # Keep exactly the steps up to the checkpoint: later lines are redone by the resumed run.
            kept = self.kept_rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            atomic_write_bytes(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        self.file = open(self.path, "a")  # noqa: SIM115 (held for the run's life; closed in close())
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1
            )
        self.wandb = open_wandb(run_dir, wandb, config) if wandb is not None and wandb.project else None

    def log(self, row: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])

    def summary(self, data: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in data.items() if k != "last"})

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_wandb(run_dir: Path, cfg, config: dict | None):
    """A W&B run for this run directory: the id is kept in RUN_DIR/wandb_id, so `--resume` continues the same
    W&B run (W&B drops steps it already has; the resumed run logs again from the checkpoint's step on)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "run.wandb.project", "W&B is not installed: `pip install twofold[wandb]`, or leave run.wandb.project empty"
        ) from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity or None,
        name=cfg.name or run_dir.name,
        id=run_id,
        resume="allow",
        mode=cfg.mode,
        dir=str(run_dir),
        config=config,
    )


def write_summary(run_dir: Path, data: dict) -> None:
    atomic_write_bytes(run_dir / "summary.json", lambda f: f.write(json.dumps(data, indent=2).encode()))


def summary(run_dir: Path) -> dict | None:
    """The run's summary.json, or None while it has not ended (or ended by a crash)."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def heldout_result(run_dir: Path) -> dict | None:
    """The run's HELDOUT_FILE: its final checkpoint scored on held-out tasks; None where it was not scored, or
    where the score is of another step than the run's last (a run extended after it was scored)."""
    try:
        found = json.loads((Path(run_dir) / HELDOUT_FILE).read_text())
        found["success_rate"] = float(found["success_rate"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    scored, last = found.get("checkpoint_step"), (summary(run_dir) or {}).get("steps")
    return None if scored is not None and last is not None and scored != last else found


def heldout_success(run_dir: Path) -> float | None:
    """`heldout_result`'s success rate; None where there is none."""
    found = heldout_result(run_dir)
    return None if found is None else found["success_rate"]


def leftover_snapshot_bytes(run_dir: Path) -> int:
    """Bytes of snapshot files a stopped run left in RUN_DIR/snapshots/: the run's next store removes them as it
    opens (`SnapshotStore`), so a resumed run may count them as free."""
    folder = Path(run_dir) / SNAPSHOT_DIRECTORY
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def default_run_dir(cfg: Config) -> Path:
    return (
        Path("runs")
        / f"{cfg.env.name}-{cfg.mode}-{cfg.oldlogits.source}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    )


def refuse_existing_run(run_dir: Path, resume: bool) -> None:
    """A fresh run never writes into a finished or interrupted one (its metrics would interleave)."""
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            "run.dir",
            f"{str(run_dir)!r} already holds a run; continue it with "
            f"`twofold train --resume {run_dir}` or choose another run.dir",
        )
