"""Ranks of a sharded trainer: the process group, the few collectives the pipeline needs, FSDP2 sharding,
and starting local ranks.

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
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        t = torch.tensor([float(value)], dtype=torch.float64)
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


# --------------------------------------------------------------------------- FSDP2


class ShardedLogprobs(torch.nn.Module):
    """The FSDP2 root around a policy: its forward is the chunked `token_logprobs`, so the decoder and the
    LM head run inside one forward and FSDP's hooks gather (and free) the root's parameters around it.
    Calls of `token_logprobs(policy, ...)` on a sharded policy are routed here (`sharded_root`)."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, attention_mask, temperature: float, chunk_size: int) -> torch.Tensor:
        from twofold.logprobs import policy_logprobs

        return policy_logprobs(self.policy, input_ids, attention_mask, temperature, chunk_size)


def sharded_root(policy: torch.nn.Module) -> ShardedLogprobs | None:
    return policy.__dict__.get("_sharded_root")


def decoder_layers(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one: the decoder's `layers` (Hugging Face causal LMs,
    LoRA-wrapped or not)."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__}: no decoder `layers` to shard")
    return list(layers)


def shard(policy: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """Shard `policy` in place across `ranks` (per decoder layer, then a root holding the embeddings, the
    final norm and the LM head) and return it. Gradients are summed across ranks, not averaged: each rank's
    loss is already divided by the whole minibatch's denominator."""
    if not ranks.sharded:
        return policy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (ranks.world_size,))
    for layer in decoder_layers(policy):
        fully_shard(layer, mesh=mesh)
    # The root reshards after every forward too (FSDP2 keeps a root gathered by default, expecting a backward):
    # scoring forwards have none, and parameters read between forwards (snapshots, the EWMA) must be shards.
    root = fully_shard(ShardedLogprobs(policy), mesh=mesh, reshard_after_forward=True)
    for unit in root.modules():  # every unit (each layer, the root) sums; plain SUM: gloo has no PREMUL_SUM
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    # A plain attribute, not a submodule (the root contains the policy): the two form a cycle that dies with
    # the policy. A weak-keyed table would keep both forever, its value holding its key.
    object.__setattr__(policy, "_sharded_root", root)
    return policy


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter gathered whole on every rank (a collective); a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (its storage), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t


# --------------------------------------------------------------------------- local ranks


def spawn_ranks(fn: Callable, world_size: int, *args, join: bool = True):
    """Run fn(rank, world_size, address, port, *args) in `world_size` processes. join=True waits for them: when
    one dies the others are stopped and the death is raised (torch.multiprocessing.spawn's contract); join=False
    returns the spawn context to wait on. A rank whose fn returns leaves without the interpreter's teardown
    (`_rank_process`)."""
    import torch.multiprocessing as mp

    port = free_port()
    return mp.spawn(_rank_process, args=(fn, world_size, "127.0.0.1", port, *args), nprocs=world_size, join=join)


def _rank_process(rank: int, fn: Callable, *args) -> None:
    """A spawned rank: fn, then exit at once. FSDP2's DTensor caches keep the device mesh, and with it the gloo
    process group and its threads, alive after `close_ranks`; tearing them down in the interpreter's exit
    aborts the process now and then ("terminate called without an active exception", SIGABRT: once in 80
    two-rank runs on 2 busy cores), which the launcher must report as a lost rank. When fn returns,
    everything of the rank's is written and closed, so skipping the teardown loses nothing. A rank that
    raises does not get here: torch.multiprocessing records its traceback as usual."""
    fn(rank, *args)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


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
