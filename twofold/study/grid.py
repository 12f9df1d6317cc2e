"""Grids of training runs: `twofold compare` (old-logit sources x seeds) and `twofold bench throughput`
(sync vs async at several staleness windows).

Every cell is an ordinary `twofold train` in its own subprocess and run directory under one grid folder,
so a crashed cell fails alone, cells can run in parallel, and re-running the same command skips the
finished cells and resumes the interrupted ones from their last checkpoint. The grid folder keeps the
resolved base config (`base.yaml`); re-using the folder with a different config is refused, since the
finished cells would no longer be comparable. SIGINT/SIGTERM stop the grid: running cells get the signal
(each checkpoints and stops), no new cell starts. SIGKILL takes the running cells with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from twofold.config import EXACT_SOURCES, OLD_LOGIT_SOURCES, Config, ConfigError, dump_config
from twofold.pipeline.progress import PARENT_PID_VAR, stop_signals
from twofold.pipeline.rundir import read_metrics, summary


@dataclass(frozen=True)
class Cell:
    name: str  # run directory name inside the grid folder
    overrides: tuple[str, ...]


def compare_cells(sources: list[str], seeds: int, base_seed: int, audit: bool) -> list[Cell]:
    """source x seed, same seeds (hence the same level order) for every source.

    Seed-major: every source of the first seed, then of the next. A grid stopped part-way (a long study run
    in pieces) then holds whole seeds, and every whole seed is a paired comparison of all the sources.

    With `audit`, each approximate source also gets one run on the first seed that measures its error
    against exact old log-probs; audit runs keep snapshots, so they are kept out of the timing table.
    """
    unknown = [s for s in sources if s not in OLD_LOGIT_SOURCES]
    if unknown or not sources:
        raise ConfigError("--sources", f"unknown source(s) {unknown}; choose from {','.join(OLD_LOGIT_SOURCES)}")
    if seeds < 1:
        raise ConfigError("--seeds", "must be >= 1")
    cells = [
        Cell(f"{src}-seed{base_seed + i}", (f"oldlogits.source={src}", f"seed={base_seed + i}"))
        for i in range(seeds)
        for src in sources
    ]
    if audit:
        cells += [
            Cell(
                f"{src}-seed{base_seed}-audit", (f"oldlogits.source={src}", f"seed={base_seed}", "oldlogits.audit=true")
            )
            for src in sources
            if src not in EXACT_SOURCES
        ]
    return cells


def throughput_cells(windows: list[int]) -> list[Cell]:
    """The synchronous baseline and async runs at each staleness window, same source and seed."""
    if not windows or any(w < 1 for w in windows):
        raise ConfigError("--staleness", "give staleness windows >= 1, e.g. 1,2,4")
    return [Cell("sync", ("mode=sync",))] + [Cell(f"async-W{w}", ("mode=async", f"max_staleness={w}")) for w in windows]


def cell_started(run_dir: Path) -> bool:
    """A cell whose run has begun (its resolved config is written): resumed with `--resume`, not started anew."""
    return (run_dir / "config.yaml").exists()


def cell_finished(run_dir: Path, steps: int) -> bool:
    s = summary(run_dir)
    return bool(s and s.get("finished") and s.get("steps", 0) >= steps)


def logged_runs(out: Path, cells: list[Cell]) -> list[Path]:
    """Run directories of the cells that logged at least one step (a grid folder may hold other runs)."""
    return [out / c.name for c in cells if (out / c.name / "metrics.jsonl").exists()]


def prepare_grid(cfg: Config, out: Path) -> Path:
    """Write (or check) the grid's base config and build the starting checkpoint once for all cells."""
    from twofold.pipeline.resolve import resolve_model_path

    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.yaml"
    text = dump_config(cfg)
    if base.exists() and base.read_text() != text:
        raise ConfigError(
            "--out",
            f"{str(out)!r} holds a grid made with a different config; choose another --out or delete that folder",
        )
    base.write_text(text)
    resolve_model_path(cfg, progress=cfg.run.progress)  # warm start trained here, not once per cell
    return base


def started_first(cells: list[Cell], out: Path) -> list[Cell]:
    """`cells` with those a stopped grid had started (their run folder holds a config) moved to the front, each
    group in its own order: a resumed grid finishes what it has begun before it begins more."""
    started = [c for c in cells if cell_started(out / c.name)]
    return started + [c for c in cells if c not in started]


def run_grid(
    cfg: Config, cells: list[Cell], out: Path, *, parallel: int = 1, progress: bool = True
) -> dict[str, int | None]:
    """Run every unfinished cell; returns {cell name: exit status} (0 also for cells already done, None for
    cells a stop signal left unfinished or unstarted)."""
    if parallel < 1:
        raise ConfigError("--parallel", "must be >= 1")
    base = prepare_grid(cfg, out)
    steps = cfg.trainer.steps
    status: dict[str, int] = {}
    todo = []
    for cell in cells:
        if cell_finished(out / cell.name, steps):
            status[cell.name] = 0
        else:
            todo.append(cell)
    todo = started_first(todo, out)
    bar = tqdm(
        total=len(cells) * steps,
        disable=not progress,
        unit="step",
        desc=f"grid ({len(cells) - len(todo)}/{len(cells)} runs already done)",
    )
    bar.update((len(cells) - len(todo)) * steps)
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    counted: dict[str, int] = {}

    def launch(cell: Cell) -> None:
        run_dir = out / cell.name
        run_dir.mkdir(parents=True, exist_ok=True)
        # started before: resume (from step 0 if no checkpoint yet)
        args = ["--resume", str(run_dir)] if cell_started(run_dir) else ["--config", str(base)]
        cmd = [
            sys.executable,
            "-m",
            "twofold.cli",
            "train",
            *args,
            *cell.overrides,
            f"run.dir={run_dir}",
            "run.progress=false",
            f"trainer.steps={steps}",
        ]
        with open(run_dir / "train.log", "a") as log_file:  # the child keeps its own descriptor
            env = {**os.environ, PARENT_PID_VAR: str(os.getpid())}  # compare killed: its cells too
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            running[cell.name] = (proc, run_dir)

    def poll() -> None:
        for name, (proc, run_dir) in list(running.items()):
            done = len(read_metrics(run_dir / "metrics.jsonl"))
            bar.update(max(0, done - counted[name]))
            counted[name] = max(counted[name], done)  # a resumed run first trims to its checkpoint
            if proc.poll() is not None:
                status[name] = proc.returncode
                del running[name]
                if proc.returncode != 0:
                    tail = (run_dir / "train.log").read_text().splitlines()[-5:]
                    bar.write(
                        f"run {name} failed (exit {proc.returncode}); last lines of {run_dir / 'train.log'}:\n  "
                        + "\n  ".join(tail)
                    )

    for cell in todo:
        counted[cell.name] = len(read_metrics(out / cell.name / "metrics.jsonl"))
        bar.update(counted[cell.name])
    queue = list(todo)
    stopped: set[str] = set()  # cells running when a stop signal came
    stop_requested = False

    def stop(signum, frame) -> None:
        nonlocal stop_requested
        stop_requested = True
        for name, (proc, _) in running.items():
            stopped.add(name)
            proc.send_signal(signum)  # the cell checkpoints at the end of its step and exits

    with stop_signals(stop):
        while (queue and not stop_requested) or running:
            while queue and not stop_requested and len(running) < parallel:
                launch(queue.pop(0))
            time.sleep(0.5)
            poll()
    bar.close()
    for cell in cells:
        # Stopped by the signal (a cell still starting dies of it: not a failure), or never started.
        if (cell.name in stopped or cell.name not in status) and not cell_finished(out / cell.name, steps):
            status[cell.name] = None
    return status
