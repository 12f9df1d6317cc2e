"""FSDP2 sharding of a policy across the trainer's ranks: every decoder layer, then a root whose forward is the
chunked log-prob computation, so the LM head runs inside one FSDP forward (see `twofold.distributed` for the
ranks themselves)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from twofold.distributed import Ranks
from twofold.logprobs import SHARDED_ROOT, policy_logprobs


class ShardedLogprobs(torch.nn.Module):
    """The FSDP2 root around a policy: its forward is the chunked `token_logprobs`, so the decoder and the
    LM head run inside one forward and FSDP's hooks gather (and free) the root's parameters around it.
    Calls of `token_logprobs(policy, ...)` on a sharded policy are routed here (`logprobs.sharded_root`)."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, attention_mask, temperature: float, chunk_size: int) -> torch.Tensor:
        return policy_logprobs(self.policy, input_ids, attention_mask, temperature, chunk_size)


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
    object.__setattr__(policy, SHARDED_ROOT, root)
    return policy
