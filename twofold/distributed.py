"""Ranks of a sharded trainer: the process group, the few collectives the pipeline needs, sharded tensors,
and starting local ranks (FSDP2 sharding of a policy is `sharding.py`).

`trainer.world_size: N` runs N ranks (torch.distributed: gloo on CPU, NCCL on GPUs) that each run the same
step loop (SPMD, as torchtitan does). Rank 0 alone owns the rollout side (engine, rollout worker, envs),
the run directory and the metrics; every rank holds 1/N of the trainer's parameters, gradients and
optimizer state (FSDP2 `fully_shard` per decoder layer, then the root), and 1/N of every snapshot version
and of the EWMA average. What rank 0 alone knows (the batch, the pending trajectories, the old-logit
sources' decisions) it broadcasts at fixed points, so every rank makes the same collective calls in the
same order.

One process (`trainer.world_size: 1`, the default) needs no process group: `Ranks()` answers every
collective locally and nothing is sharded.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor


def collective_device(backend_config: str) -> torch.device:
    """The device a collective's tensors must be on, for a process group whose backends are `backend_config`
    (`dist.get_backend_config()`: 'DEVICE:BACKEND' pairs, e.g. 'cpu:gloo,cuda:gloo' for gloo, 'cuda:nccl' for
    NCCL): the CPU when a backend serves it (the values are in host memory: no copy), else the first device served.
    A group has no backend for the other devices: NCCL refuses a CPU tensor. 'cuda' is this process's current
    GPU, which `init_ranks` sets to the rank's own."""
    served = [pair.split(":")[0] for pair in backend_config.split(",")]
    return torch.device("cpu" if "cpu" in served else served[0])


@dataclass
class Ranks:
    """This process's place among the trainer's ranks, and the collectives on their group."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """Where `all_reduce` puts its value (torch's object collectives choose by the same rule)."""
        return collective_device(dist.get_backend_config()) if self.sharded else torch.device("cpu")

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a pickled copy elsewhere)."""
        if not self.sharded:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if not self.sharded:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, value: float, op: str = "sum") -> float:
        if not self.sharded:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return float(t)

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()


def free_port() -> int:
    """A TCP port nothing listens on now (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ranks(rank: int, world_size: int, address: str, port: int, device: torch.device) -> Ranks:
    """Join the trainer's process group: gloo on CPU, NCCL on CUDA (a device per rank)."""
    if world_size == 1:
        return Ranks()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        device_id=device if device.type == "cuda" else None,
    )
    return Ranks(rank, world_size)


def close_ranks(ranks: Ranks) -> None:
    if ranks.sharded and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(name: str, rank: int) -> torch.device:
    """`trainer.device` for this rank: 'auto' and 'cuda' mean this rank's own GPU (cuda:rank)."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu" if name == "auto" else name)


# --------------------------------------------------------------------------- sharded tensors


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter gathered whole on every rank (a collective); a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (its storage), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


# --------------------------------------------------------------------------- local ranks


# What every rank imports (torch, transformers, the pipeline): the fork server imports it once, and each rank is
# a fork of that server. Spawned interpreters would import it once per rank, ~5 s of CPU each here.
RANK_MODULES = ["twofold.pipeline.train"]


def spawn_ranks(fn: Callable, world_size: int, *args, join: bool = True):
    """Run fn(rank, world_size, address, port, *args) in `world_size` processes. join=True waits for them: when
    one dies the others are stopped and the death is raised (torch.multiprocessing.spawn's contract); join=False
    returns the spawn context to wait on.

    The ranks are forked from multiprocessing's fork server, started on the first call with `RANK_MODULES`
    imported and nothing else run (no threads, no CUDA context: what `fork` needs to be safe, and why PyTorch
    supports `forkserver` beside `spawn`). A rank's parent is that server, which exits when this process does.
    The server keeps the environment it started with. Each rank runs with this process's torch thread count at
    the call (set it with `threads_per_rank`), and exits at once when this process dies (`_exit_with_launcher`).
    A rank whose fn returns leaves without the interpreter's teardown (`_rank_process`)."""
    port = free_port()
    multiprocessing.set_forkserver_preload(RANK_MODULES)  # read when the server starts; later calls change nothing
    args = (fn, torch.get_num_threads(), world_size, "127.0.0.1", port, *args)
    return mp.start_processes(_rank_process, args=args, nprocs=world_size, join=join, start_method="forkserver")


def _rank_process(rank: int, fn: Callable, threads: int, *args) -> None:
    """A rank: fn on `threads` torch threads, then exit at once. FSDP2's DTensor caches keep the device mesh,
    and with it the gloo process group and its threads, alive after `close_ranks`; tearing them down in the
    interpreter's exit aborts the process now and then ("terminate called without an active exception",
    SIGABRT: once in 80 two-rank runs on 2 busy cores), which the launcher must report as a lost rank. When fn
    returns, everything of the rank's is written and closed, so skipping the teardown loses nothing. A rank
    that raises does not get here: torch.multiprocessing records its traceback as usual."""
    _exit_with_launcher()
    torch.set_num_threads(threads)
    fn(rank, *args)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _exit_with_launcher() -> None:
    """This rank exits at once when the process that started it dies, so `kill -9` of `twofold train` leaves no
    rank behind writing into the run directory. The rank's parent is the fork server, so `PR_SET_PDEATHSIG`
    cannot name the launcher; multiprocessing hands each child a sentinel that reads EOF when the launcher is
    gone (also when it was gone before this call), which a thread waits on."""
    launcher = multiprocessing.parent_process()

    def wait_for_eof():
        multiprocessing.connection.wait([launcher.sentinel])
        os._exit(1)  # nobody waits for this exit code: the launcher is gone

    threading.Thread(target=wait_for_eof, name="exit-with-launcher", daemon=True).start()


@contextlib.contextmanager
def threads_per_rank(world_size: int):
    """Each of N local CPU ranks gets 1/N of the cores (torch's default would oversubscribe them)."""
    before = torch.get_num_threads()
    if world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        yield
    finally:
        torch.set_num_threads(before)
