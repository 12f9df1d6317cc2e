"""Grids of training runs: `twofold compare` (old-logit sources x seeds) and `twofold bench throughput`
(sync vs async at several staleness windows).

Every cell is an ordinary `twofold train` in its own subprocess and run directory under one grid folder,
so a crashed cell fails alone, cells can run in parallel, and re-running the same command skips the
finished cells and resumes the interrupted ones from their last checkpoint. The grid folder keeps the
resolved base config (`base.yaml`); re-using the folder with a different config is refused, since the
finished cells would no longer be comparable. SIGINT/SIGTERM stop the grid: running cells get the signal
(each checkpoints and stops), no new cell starts. SIGKILL takes the running cells with it.

Two options serve the pre-registered confirmation (docs/results.md): a warm start per seed (each seed's
cells start from an SFT checkpoint of that seed, so the seeds also sample the warm start's variation), and
a held-out evaluation per cell (`study.heldout`: once a cell's training finishes, its final checkpoint plays
a fixed set of unseen levels in the same slot, and the cell is done when heldout.json is written).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from twofold.config import (
    EXACT_SOURCES,
    OLD_LOGIT_SOURCES,
    Config,
    ConfigError,
    dump_config,
    load_config,
    runs_on_this_machine,
)
from twofold.pipeline.progress import PARENT_PID_VAR, stop_signals
from twofold.pipeline.resolve import resolve_model_path
from twofold.pipeline.rundir import read_metrics, summary
from twofold.study.heldout import HeldoutSpec, heldout_done

TRAIN_LOG, HELDOUT_LOG = "train.log", "heldout.log"  # each job of a cell logs to its own file in the run folder


@dataclass(frozen=True)
class Cell:
    name: str  # run directory name inside the grid folder
    overrides: tuple[str, ...]


def _require_seeds(seeds: int) -> None:
    if seeds < 1:
        raise ConfigError("--seeds", "must be >= 1")


def compare_cells(
    sources: list[str], seeds: int, base_seed: int, audit: bool, warmstart_per_seed: bool = False
) -> list[Cell]:
    """source x seed, same seeds (hence the same level order) for every source.

    Seed-major: every source of the first seed, then of the next. A grid stopped part-way (a long study run
    in pieces) then holds whole seeds, and every whole seed is a paired comparison of all the sources.

    With `audit`, each approximate source also gets one run on the first seed that measures its error
    against exact old log-probs; audit runs keep snapshots, so they are kept out of the timing table.
    With `warmstart_per_seed`, a cell of seed s starts from the warm start of `warmstart.seed=s` (every
    source of one seed from the same one); without, every cell starts from the config's one warm start.
    """
    unknown = [s for s in sources if s not in OLD_LOGIT_SOURCES]
    if unknown or not sources:
        raise ConfigError("--sources", f"unknown source(s) {unknown}; choose from {','.join(OLD_LOGIT_SOURCES)}")
    _require_seeds(seeds)

    def seeded(seed: int) -> tuple[str, ...]:
        return (f"seed={seed}",) + ((f"warmstart.seed={seed}",) if warmstart_per_seed else ())

    cells = [
        Cell(f"{src}-seed{base_seed + i}", (f"oldlogits.source={src}", *seeded(base_seed + i)))
        for i in range(seeds)
        for src in sources
    ]
    if audit:
        cells += [
            Cell(
                f"{src}-seed{base_seed}-audit", (f"oldlogits.source={src}", *seeded(base_seed), "oldlogits.audit=true")
            )
            for src in sources
            if src not in EXACT_SOURCES
        ]
    return cells


def throughput_cells(windows: list[int], seeds: int = 1, base_seed: int = 0) -> list[Cell]:
    """The synchronous baseline and async runs at each staleness window, same source. One seed: the config's, cells
    named by mode alone; several: seed-major from `base_seed` (a stopped bench holds whole seeds), named with it.
    An agent run's samples a second differ between seeds and between runs of one seed by far more than the
    difference async makes (which groups finish first changes what the policy learns, and so how long its episodes
    are), so a single pair of runs says little."""
    if not windows or any(w < 1 for w in windows):
        raise ConfigError("--staleness", "give staleness windows >= 1, e.g. 1,2,4")
    _require_seeds(seeds)
    modes = [("sync", ("mode=sync",))] + [(f"async-W{w}", ("mode=async", f"max_staleness={w}")) for w in windows]
    if seeds == 1:
        return [Cell(name, overrides) for name, overrides in modes]
    return [
        Cell(f"{name}-seed{base_seed + i}", (*overrides, f"seed={base_seed + i}"))
        for i in range(seeds)
        for name, overrides in modes
    ]


def cell_started(run_dir: Path) -> bool:
    """A cell whose run has begun (its resolved config is written): resumed with `--resume`, not started anew."""
    return (run_dir / "config.yaml").exists()


def cell_finished(run_dir: Path, steps: int) -> bool:
    s = summary(run_dir)
    return bool(s and s.get("finished") and s.get("steps", 0) >= steps)


def cell_done(run_dir: Path, steps: int, heldout: HeldoutSpec | None) -> bool:
    """Trained to `steps`, and evaluated on the held-out set when the grid has one."""
    return cell_finished(run_dir, steps) and (heldout is None or heldout_done(run_dir, heldout))


def logged_runs(out: Path, cells: list[Cell]) -> list[Path]:
    """Run directories of the cells that logged at least one step (a grid folder may hold other runs)."""
    return [out / c.name for c in cells if (out / c.name / "metrics.jsonl").exists()]


def prepare_grid(cfg: Config, out: Path, cells: list[Cell]) -> Path:
    """Write (or check) the grid's base config and build every starting checkpoint that `cells` (the cells
    still to run) need, each once and one after another, before any cell starts (two cells building the same
    warm start at once would write one folder together). A done cell needs none: a grid resumed on a fresh
    machine, its finished cells copied back, builds only the warm starts of the seeds still to run."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.yaml"
    text = dump_config(cfg)
    if base.exists() and base.read_text() != text:
        raise ConfigError(
            "--out",
            f"{str(out)!r} holds a grid made with a different config; choose another --out or delete that folder",
        )
    base.write_text(text)
    for cell_cfg in (load_config(base, c.overrides) for c in cells):
        # trained at the first call, cached after; a budget the first prompt fills stops the grid before it
        resolve_model_path(cell_cfg, progress=cfg.run.progress, check_budget=runs_on_this_machine(cell_cfg))
    return base


def started_first(cells: list[Cell], out: Path) -> list[Cell]:
    """`cells` with those a stopped grid had started (their run folder holds a config) moved to the front, each
    group in its own order: a resumed grid finishes what it has begun before it begins more."""
    started = [c for c in cells if cell_started(out / c.name)]
    return started + [c for c in cells if c not in started]


def _heldout_command(run_dir: Path, spec: HeldoutSpec) -> list[str]:
    """`study.heldout` on one finished cell."""
    return [
        sys.executable,
        "-m",
        "twofold.study.heldout",
        str(run_dir),
        "--episodes",
        str(spec.episodes),
        "--seed",
        str(spec.seed),
    ]


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
    """The cells' subprocesses (training, then the held-out evaluation when the grid has one): started, watched
    for the steps they log (on one progress bar over the grid) and for their exit status, and handed a stop
    signal."""

    def __init__(self, out: Path, base: Path, steps: int, bar: tqdm, heldout: HeldoutSpec | None = None) -> None:
        self.out, self.base, self.steps, self.bar, self.heldout = out, base, steps, bar, heldout
        self.cells: dict[str, Cell] = {}
        self.running: dict[str, subprocess.Popen] = {}
        self.log_names: dict[str, str] = {}  # the log file of each running cell's job
        self.counted: dict[str, int] = {}  # steps of each cell already on the bar
        self.status: dict[str, int | None] = {}
        self.stopped: set[str] = set()  # cells running when a stop signal came
        self.stop_requested = False

    def count_logged(self, cell: Cell) -> None:
        """Put the steps a cell logged before this grid run on the bar."""
        self.counted[cell.name] = len(read_metrics(self.out / cell.name / "metrics.jsonl"))
        self.bar.update(self.counted[cell.name])

    def _next_command(self, cell: Cell) -> tuple[list[str], str]:
        """(command, log file name) of the cell's next job: training until it has finished, then the held-out
        evaluation."""
        run_dir = self.out / cell.name
        if self.heldout is not None and cell_finished(run_dir, self.steps):
            return _heldout_command(run_dir, self.heldout), HELDOUT_LOG
        return _train_command(cell, run_dir, self.base, self.steps), TRAIN_LOG

    def launch(self, cell: Cell) -> None:
        self.cells[cell.name] = cell
        run_dir = self.out / cell.name
        run_dir.mkdir(parents=True, exist_ok=True)
        command, log_name = self._next_command(cell)
        with open(run_dir / log_name, "a") as log_file:  # the child keeps its own descriptor
            env = {**os.environ, PARENT_PID_VAR: str(os.getpid())}  # compare killed: its cells too
            self.running[cell.name] = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        self.log_names[cell.name] = log_name

    def poll(self) -> None:
        """Advance the bar by the steps logged since the last poll; record the cells that ended, and start the
        held-out evaluation of a cell whose training just finished (in the slot it held)."""
        for name, proc in list(self.running.items()):
            run_dir = self.out / name
            done = len(read_metrics(run_dir / "metrics.jsonl"))
            self.bar.update(max(0, done - self.counted[name]))
            self.counted[name] = max(self.counted[name], done)  # a resumed run first trims to its checkpoint
            if proc.poll() is None:
                continue
            self.status[name] = proc.returncode
            del self.running[name]
            log_path = run_dir / self.log_names[name]
            if proc.returncode != 0:
                tail = log_path.read_text().splitlines()[-5:]
                self.bar.write(
                    f"run {name} failed (exit {proc.returncode}); last lines of {log_path}:\n  " + "\n  ".join(tail)
                )
            elif log_path.name == TRAIN_LOG and self._heldout_pending(name) and not self.stop_requested:
                self.launch(self.cells[name])

    def _heldout_pending(self, name: str) -> bool:
        """Trained to the end, and the grid's held-out evaluation of it not written yet."""
        run_dir = self.out / name
        return (
            self.heldout is not None and cell_finished(run_dir, self.steps) and not heldout_done(run_dir, self.heldout)
        )

    def stop(self, signum, frame) -> None:
        self.stop_requested = True
        for name, proc in self.running.items():
            self.stopped.add(name)
            proc.send_signal(signum)  # the cell checkpoints at the end of its step and exits


def run_grid(
    cfg: Config,
    cells: list[Cell],
    out: Path,
    *,
    parallel: int = 1,
    progress: bool = True,
    heldout: HeldoutSpec | None = None,
) -> dict[str, int | None]:
    """Run every unfinished cell (and, with `heldout`, evaluate each finished one on the held-out set); returns
    {cell name: exit status} (0 also for cells already done, None for cells a stop signal left unfinished or
    unstarted)."""
    if parallel < 1:
        raise ConfigError("--parallel", "must be >= 1")
    if heldout is not None and heldout.episodes < 1:
        raise ConfigError("--heldout", "must be >= 1 episodes")
    steps = cfg.trainer.steps
    done = [c for c in cells if cell_done(out / c.name, steps, heldout)]
    todo = started_first([c for c in cells if c not in done], out)
    base = prepare_grid(cfg, out, todo)
    bar = tqdm(
        total=len(cells) * steps,
        disable=not progress,
        unit="step",
        desc=f"grid ({len(done)}/{len(cells)} runs already done)",
    )
    bar.update(len(done) * steps)
    procs = _CellProcesses(out, base, steps, bar, heldout)
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
        if (cell.name in procs.stopped or cell.name not in procs.status) and not cell_done(
            out / cell.name, steps, heldout
        ):
            procs.status[cell.name] = None
    return procs.status
