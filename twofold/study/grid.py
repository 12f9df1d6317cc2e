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
from twofold.pipeline.resolve import resolve_model_path
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


def _train_command(cell: Cell, run_dir: Path, base: Path, steps: int) -> list[str]:
    """`twofold train` for one cell: resumed where it had started (from step 0 if it has no checkpoint yet),
    else started from the grid's base config."""
    args = ["--resume", str(run_dir)] if cell_started(run_dir) else ["--config", str(base)]
    return [
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


class _CellProcesses:
    """The cells' training subprocesses: started, watched for the steps they log (on one progress bar over the
    grid) and for their exit status, and handed a stop signal."""

    def __init__(self, out: Path, base: Path, steps: int, bar: tqdm) -> None:
        self.out, self.base, self.steps, self.bar = out, base, steps, bar
        self.running: dict[str, subprocess.Popen] = {}
        self.counted: dict[str, int] = {}  # steps of each cell already on the bar
        self.status: dict[str, int | None] = {}
        self.stopped: set[str] = set()  # cells running when a stop signal came
        self.stop_requested = False

    def count_logged(self, cell: Cell) -> None:
        """Put the steps a cell logged before this grid run on the bar."""
        self.counted[cell.name] = len(read_metrics(self.out / cell.name / "metrics.jsonl"))
        self.bar.update(self.counted[cell.name])

    def launch(self, cell: Cell) -> None:
        run_dir = self.out / cell.name
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "a") as log_file:  # the child keeps its own descriptor
            env = {**os.environ, PARENT_PID_VAR: str(os.getpid())}  # compare killed: its cells too
            self.running[cell.name] = subprocess.Popen(
                _train_command(cell, run_dir, self.base, self.steps), stdout=log_file, stderr=subprocess.STDOUT, env=env
            )

    def poll(self) -> None:
        """Advance the bar by the steps logged since the last poll; record the cells that ended."""
        for name, proc in list(self.running.items()):
            run_dir = self.out / name
            done = len(read_metrics(run_dir / "metrics.jsonl"))
            self.bar.update(max(0, done - self.counted[name]))
            self.counted[name] = max(self.counted[name], done)  # a resumed run first trims to its checkpoint
            if proc.poll() is not None:
                self.status[name] = proc.returncode
                del self.running[name]
                if proc.returncode != 0:
                    tail = (run_dir / "train.log").read_text().splitlines()[-5:]
                    self.bar.write(
                        f"run {name} failed (exit {proc.returncode}); last lines of {run_dir / 'train.log'}:\n  "
                        + "\n  ".join(tail)
                    )

    def stop(self, signum, frame) -> None:
        self.stop_requested = True
        for name, proc in self.running.items():
            self.stopped.add(name)
            proc.send_signal(signum)  # the cell checkpoints at the end of its step and exits


def run_grid(
    cfg: Config, cells: list[Cell], out: Path, *, parallel: int = 1, progress: bool = True
) -> dict[str, int | None]:
    """Run every unfinished cell; returns {cell name: exit status} (0 also for cells already done, None for
    cells a stop signal left unfinished or unstarted)."""
    if parallel < 1:
        raise ConfigError("--parallel", "must be >= 1")
    base = prepare_grid(cfg, out)
    steps = cfg.trainer.steps
    done = [c for c in cells if cell_finished(out / c.name, steps)]
    todo = started_first([c for c in cells if c not in done], out)
    bar = tqdm(
        total=len(cells) * steps,
        disable=not progress,
        unit="step",
        desc=f"grid ({len(done)}/{len(cells)} runs already done)",
    )
    bar.update(len(done) * steps)
    procs = _CellProcesses(out, base, steps, bar)
    procs.status.update((c.name, 0) for c in done)
    for cell in todo:
        procs.count_logged(cell)
    queue = list(todo)
    with stop_signals(procs.stop):
        while (queue and not procs.stop_requested) or procs.running:
            while queue and not procs.stop_requested and len(procs.running) < parallel:
                procs.launch(queue.pop(0))
            time.sleep(0.5)
            procs.poll()
    bar.close()
    for cell in cells:
        # Stopped by the signal (a cell still starting dies of it: not a failure), or never started.
        if (cell.name in procs.stopped or cell.name not in procs.status) and not cell_finished(out / cell.name, steps):
            procs.status[cell.name] = None
    return procs.status
