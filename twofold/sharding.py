"""FSDP2 sharding of a policy across the trainer's ranks: every decoder layer, then a root whose forward is the
chunked log-prob computation, so the LM head runs inside one FSDP forward (see `twofold.distributed` for the
ranks themselves).

A sharded policy is built on the meta device, sharded, and only then given memory and values
(`load_sharded_policy`): no rank ever holds the whole model on its device. Old-logit sources keep no sharded
copies: they score other versions through the policy itself, its shards swapped in place
(`oldlogits.base.with_parameters`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from twofold.config import ModelConfig
from twofold.distributed import Ranks
from twofold.logprobs import SHARDED_ROOT, policy_logprobs, sharded_root
from twofold.models import empty_policy, load_policy


class ShardedLogprobs(torch.nn.Module):
    """The FSDP2 root around a policy: its forward is the chunked `token_logprobs`, so the decoder and the
    LM head run inside one forward and FSDP's hooks gather (and free) the root's parameters around it.
    Calls of `token_logprobs(policy, ...)` on a sharded policy are routed here (`logprobs.sharded_root`)."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(
        self,
        input_ids,
        attention_mask,
        temperature: float,
        chunk_size: int,
        wanted=None,
        packed: bool = False,
        share_prefixes: bool = False,
    ) -> torch.Tensor:
        return policy_logprobs(
            self.policy, input_ids, attention_mask, temperature, chunk_size, wanted, packed, share_prefixes
        )


def decoder_layers(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one: the decoder's `layers` (Hugging Face causal LMs,
    LoRA-wrapped or not)."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__}: no decoder `layers` to shard")
    return list(layers)


def mixed_precision(param_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """FSDP2's policy for the trainer: parameters all-gathered in `param_dtype` (`trainer.fsdp_param_dtype`),
    gradients reduce-scattered in float32; the sharded master weights stay float32 whatever `param_dtype` is."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_on(policy: torch.nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Shard `policy` in place over `mesh` (per decoder layer, then a root holding the embeddings, the final norm
    and the LM head) and return it; on the meta device too (the shards stay meta until materialised).
    Gradients are summed across ranks, not averaged: each rank's loss is already divided by the whole
    minibatch's denominator."""
    policy_mp = mixed_precision(param_dtype)
    for layer in decoder_layers(policy):
        fully_shard(layer, mesh=mesh, mp_policy=policy_mp)
    # The root reshards after every forward too (FSDP2 keeps a root gathered by default, expecting a backward):
    # scoring forwards have none, and parameters read between forwards (snapshots, the EWMA) must be shards.
    root = fully_shard(ShardedLogprobs(policy), mesh=mesh, reshard_after_forward=True, mp_policy=policy_mp)
    for unit in root.modules():  # every unit (each layer, the root) sums; plain SUM: gloo has no PREMUL_SUM
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    # A plain attribute, not a submodule (the root contains the policy): the two form a cycle that dies with
    # the policy. A weak-keyed table would keep both forever, its value holding its key.
    object.__setattr__(policy, SHARDED_ROOT, root)
    return policy


def shard(
    policy: torch.nn.Module, ranks: Ranks, device: torch.device, param_dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """`shard_on` a mesh of all `ranks` on `device`'s type; `policy` as it is with one rank."""
    if not ranks.sharded:
        return policy
    return shard_on(policy, init_device_mesh(device.type, (ranks.world_size,)), param_dtype)


def _materialise(policy: torch.nn.Module, device: torch.device) -> None:
    """Memory for this rank's shards (and the buffers) of a sharded policy built on the meta device, values
    unset. Through the FSDP root, which re-registers the new shards (and keeps tied weights one parameter)."""
    sharded_root(policy).to_empty(device=device)


@torch.no_grad()
def _set_buffers(policy: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    own = dict(policy.named_buffers())
    for name, value in buffers.items():
        own[name].copy_(value)


def load_sharded_policy(
    path: str | Path,
    cfg: ModelConfig,
    ranks: Ranks,
    device: torch.device,
    param_dtype: torch.dtype = torch.float32,
    mesh: DeviceMesh | None = None,
) -> torch.nn.Module:
    """The policy `load_policy(path, cfg)` gives, sharded across `ranks` without any rank's `device` holding it
    whole: every rank builds it on the meta device and shards it, then allocates its shards on `device`; rank 0
    loads the float32 policy in host memory (LoRA adapters drawn from its RNG as one process draws them) and
    sends it one tensor at a time (`set_model_state_dict(full_state_dict, broadcast_from_rank0)`, each rank
    keeping its slice). Buffers, which the meta device leaves empty (rotary `inv_freq`: not in the state dict),
    are rank 0's. Every rank leaves with rank 0's torch RNG state, as if each had loaded the policy itself.
    `mesh`: all of `ranks` on `device`'s type unless given (one rank's mesh shards a policy in one process)."""
    whole = load_policy(path, cfg) if ranks.is_main else None
    mesh = mesh or init_device_mesh(device.type, (ranks.world_size,))
    policy = shard_on(empty_policy(path, cfg), mesh, param_dtype)
    _materialise(policy, device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(policy, whole.state_dict() if whole is not None else {}, options=options)
    _set_buffers(policy, ranks.broadcast(dict(whole.named_buffers()) if whole is not None else None))
    torch.set_rng_state(ranks.broadcast(torch.get_rng_state()))
    return policy
