"""`train()`: one training run (or its resumption) on the configured runtime, with one or several trainer ranks."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from pathlib import Path

import torch.multiprocessing as mp

from twofold.config import Config, ConfigError, runs_on_this_machine
from twofold.distributed import close_ranks, init_ranks, rank_device, spawn_ranks, threads_per_rank
from twofold.envs import env_from_config
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.os_memory import limit_malloc_arenas
from twofold.pipeline.plan import check_memory_plan
from twofold.pipeline.progress import RankLost, stop_signals
from twofold.pipeline.resolve import resolve_model_path
from twofold.pipeline.rundir import default_run_dir, refuse_existing_run, summary

log = logging.getLogger(__name__)


def train(cfg: Config, run_dir: Path | None = None, *, resume: bool = False) -> tuple[Path, dict]:
    """Run (or resume) one training run; return (run directory, last metrics)."""
    limit_malloc_arenas(cfg.run.malloc_arenas)  # before loading a model opens arenas in torch's threads
    # A bad env.options (a reward function in no known signature, a missing data file) is a one-line ConfigError
    # here, on this thread, before any model loads: the env workers that build it next run in other threads,
    # processes or Ray actors, where it would surface as a failed worker after minutes of loading. Not on a
    # Ray cluster's driver, which need not have the env's files and modules: only its nodes must.
    local = runs_on_this_machine(cfg)
    if local:
        env_from_config(cfg.env)
    model_path = resolve_model_path(  # the warm start is built here; a resumed run loads the folder it recorded
        cfg, progress=cfg.run.progress, check_budget=local, run_dir=run_dir if resume else None
    )
    # logged; a run that cannot fit this machine (or its disk snapshots the run directory's disk) stops before it
    # loads a weight
    check_memory_plan(cfg, model_path, Path(run_dir or cfg.run.dir or default_run_dir(cfg)))
    if cfg.runtime.backend == "embedded" and cfg.trainer.world_size == 1:
        pipeline = Pipeline(cfg, run_dir, resume=resume, model_path=model_path)
        return pipeline.run_dir, pipeline.run()
    run_dir = Path(run_dir or cfg.run.dir or default_run_dir(cfg))
    refuse_existing_run(run_dir, resume)  # before any rank or actor starts
    if cfg.runtime.backend == "embedded":
        run_local_ranks(cfg, run_dir, model_path, resume)
        return run_dir, (summary(run_dir) or {}).get("last", {})
    try:
        from twofold.pipeline.ray_runtime import RaySession
    except ImportError as e:
        raise ConfigError(
            "runtime.backend",
            f"Ray is not installed ({e}); `pip install twofold[ray]`, or use runtime.backend=embedded",
        ) from None
    with RaySession(cfg, run_dir, model_path, resume=resume) as session:
        return run_dir, session.run()


def _rank_main(
    rank: int,
    world_size: int,
    address: str,
    port: int,
    cfg: Config,
    run_dir: str,
    model_path: str,
    resume: bool,
) -> None:
    """One local rank: join the group, build the Pipeline (rank 0 with the rollout side), run it. It exits with
    the launcher (`spawn_ranks`)."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"%(levelname)s rank{rank} %(name)s: %(message)s"
    )
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / f"rank{rank}.pid").write_text(str(os.getpid()))  # which process is which rank
    ranks = init_ranks(rank, world_size, address, port, rank_device(cfg.trainer.device, rank))
    try:
        with threads_per_rank(world_size):
            Pipeline(cfg, Path(run_dir), resume=resume, model_path=Path(model_path), ranks=ranks).run()
    finally:
        close_ranks(ranks)


def run_local_ranks(cfg: Config, run_dir: Path, model_path: Path, resume: bool) -> None:
    """`trainer.world_size` processes on this machine (torch.multiprocessing, one process group). SIGINT and
    SIGTERM are passed on (rank 0 decides when every rank stops, after a checkpoint). A rank that dies ends the
    run: the others are stopped and the error says which rank and how to resume."""
    n = cfg.trainer.world_size
    context = spawn_ranks(_rank_main, n, cfg, str(run_dir), str(model_path), resume, join=False)

    def forward(signum, frame):
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    with stop_signals(forward):
        try:
            while not context.join(timeout=1.0):
                pass
        except mp.ProcessExitedException as e:
            how = f"killed by {e.signal_name}" if e.signal_name else f"exit status {e.exit_code}"
            raise RankLost(
                f"trainer rank {e.error_index} (pid {e.error_pid}) died ({how}); the other ranks were "
                f"stopped. Resume from the last checkpoint with `twofold train --resume {run_dir}`"
            ) from None
        except mp.ProcessRaisedException:
            tracebacks = rank_tracebacks(context.error_files)
            for trace in tracebacks.values():
                last = trace.strip().splitlines()[-1]
                m = re.match(r"twofold\.config\.ConfigError: config field '([^']*)': (.*)", last)
                if m:
                    raise ConfigError(m.group(1), m.group(2)) from None
            ends = {rank: f"exit code {p.exitcode}" for rank, p in enumerate(context.processes)} | tracebacks
            listed = "\n".join(f"-- rank {rank}: {end}" for rank, end in ends.items())
            raise RuntimeError(f"trainer ranks {sorted(tracebacks)} failed; every rank's end:\n{listed}") from None


def rank_tracebacks(error_files: list[str]) -> dict[int, str]:
    """The traceback of every rank that raised (torch.multiprocessing writes one file per failed rank). All of
    them, not only the first seen: a rank whose peer died fails too ("Connection closed by peer"), and which of
    the two the launcher notices first is a race, so the cause may be the other one."""
    tracebacks = {}
    for rank, path in enumerate(error_files):
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            tracebacks[rank] = pickle.load(fh)
    return tracebacks
