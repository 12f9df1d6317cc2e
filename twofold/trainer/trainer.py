"""The RL trainer: float32 log-probs, the decoupled loss from `twofold.loss`, optimizer steps.

One train step consumes one batch, runs `ppo_epochs x num_minibatches` optimizer steps and advances
the policy version by one. The trainer knows nothing about engines or rollouts: pi_old of each
minibatch comes from the old-logit source's `old_logprobs` (the only place it enters the loss), and
the pipeline passes two hooks (before the first optimizer step, after each one).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from twofold import metrics as M
from twofold.config import Config
from twofold.distributed import Ranks, full_tensor
from twofold.logprobs import (
    DTYPES,
    Numerics,
    deal_rows,
    microbatches,
    packing_leak,
    prefix_sharing_trial,
    sharded_root,
    token_logprobs,
)
from twofold.loss import combine_metrics, decoupled_ppo_loss, loss_denominator
from twofold.models import load_policy
from twofold.oldlogits import OldLogitSource
from twofold.rollout.trajectory import Batch
from twofold.rollout.versions import lag_fractions, version_staleness
from twofold.sharding import load_sharded_policy, shard
from twofold.trainer.advantages import token_advantages

log = logging.getLogger(__name__)

# A packed row's log-probs do not move at all when only its neighbour's tokens change, where attention keeps to
# rows; 1e-6 leaves room for a kernel that is not bit-reproducible, and catches a leak even at a random init.
PACKING_TOLERANCE = 1e-6


def linear_warmup(step: int, warmup_steps: int) -> float:
    """Learning-rate factor of optimizer step `step` (0-based): min(1, (step + 1) / warmup_steps), 1 when
    `warmup_steps` is 0."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def forward_layout(model: torch.nn.Module, numerics: Numerics) -> Numerics:
    """`numerics` with packing and prefix sharing as far as `model` allows them, each refusal warned about naming
    its field. A model that is not a language model has no rows. One whose packed rows see each other
    (`packing_leak`) packs none and shares none, a prefix tree being a packing; `trainer.pack_sequences=false`
    shares none either. One that `prefix_sharing_trial` refuses packs without sharing. The trainer, every source
    (through the trainer's numerics) and the warm start ask this once, at start."""
    if not hasattr(model, "get_output_embeddings"):
        return dataclasses.replace(numerics, packed=False, share_prefixes=False)
    device = next(model.parameters()).device
    name = type(model).__name__
    if numerics.packed:
        leak = packing_leak(model, device)
        if leak > PACKING_TOLERANCE:  # on by default: a model packing would corrupt trains on padded rows
            log.warning(
                "trainer.pack_sequences: this model (%s) lets packed rows see each other (a row's log-probs moved "
                "by up to %.2g when only the row packed before it changed: layers that do not keep to transformers' "
                "packed-sequence mask, such as recurrent or convolution mixers); it trains, and every old-logit "
                "source scores, with padded rows",
                name,
                leak,
            )
            numerics = dataclasses.replace(numerics, packed=False)
    if not numerics.packed:
        return dataclasses.replace(numerics, share_prefixes=False)
    if numerics.share_prefixes:
        refusal = prefix_sharing_trial(model, device)
        if refusal:
            log.warning(
                "trainer.share_prefixes: this model (%s) cannot share prefixes (%s); its rows are packed whole",
                name,
                refusal,
            )
            return dataclasses.replace(numerics, share_prefixes=False)
    return numerics


class TrainingHalted(RuntimeError):
    """Too many consecutive optimizer steps were skipped for non-finite loss or gradients."""


class Trainer:
    """The policy being optimised: its model (float32 master weights on the trainer's device, sharded across
    `ranks` with FSDP2 when there are several), the optimizer over the parameters that train, and the
    version counter.

    `model` is a whole policy (moved to the trainer's device and sharded here), or one already sharded
    (`from_pretrained` builds it so, and a one-rank mesh shards it in one process), used as it is."""

    def __init__(self, model: torch.nn.Module, cfg: Config, seed: int = 0, ranks: Ranks | None = None):
        self.cfg = cfg
        self.ranks = ranks or Ranks()
        t = cfg.trainer
        self.numerics = Numerics.from_config(cfg, self.ranks.rank)
        if t.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif t.gradient_checkpointing:  # on by default: a model transformers cannot checkpoint trains without it
            log.warning("%s has no activation checkpointing; it trains without it", type(model).__name__)
        if sharded_root(model) is None:
            model = model.to(device=self.numerics.device, dtype=torch.float32)
            model = shard(model, self.ranks, self.numerics.device, DTYPES[t.fsdp_param_dtype])
        self.model = model.train()
        self.numerics = forward_layout(self.model, self.numerics)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=t.lr, weight_decay=t.weight_decay, fused=True if t.fused_optimizer else None
        )
        self.version = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_pretrained(cls, path: str | Path, cfg: Config, seed: int = 0, ranks: Ranks | None = None) -> Trainer:
        """The trainer of the policy at `path` (`model.lora` applied). One process loads it whole; several ranks
        build it on the meta device, shard it and fill their shards from rank 0's copy
        (`sharding.load_sharded_policy`), so no rank's device ever holds the whole model."""
        ranks = ranks or Ranks()
        if not ranks.sharded:
            return cls(load_policy(path, cfg.model), cfg, seed, ranks)
        device = Numerics.from_config(cfg, ranks.rank).device
        param_dtype = DTYPES[cfg.trainer.fsdp_param_dtype]
        return cls(load_sharded_policy(path, cfg.model, ranks, device, param_dtype), cfg, seed, ranks)

    def my_microbatches(self, mb: Batch) -> list[list[int] | None]:
        """This rank's micro-batches of a minibatch (row indices), padded with None to the count of the rank
        that has the most, so every rank runs as many forwards and backwards as the others (FSDP's
        collectives pair up). Rows go to ranks round-robin, longest first; sharing prefixes, a rank's rows go
        into micro-batches in sorted token order (`logprobs.microbatches`)."""
        num = self.numerics
        lengths = mb.attention_mask.sum(dim=1).tolist()
        tokens = [mb.input_ids[i, :n].tolist() for i, n in enumerate(lengths)] if num.share_prefixes else None
        return deal_rows(
            lengths, self.ranks, lambda mine: microbatches(lengths, num.max_tokens, num.packed, mine, tokens)
        )

    def accumulate_gradients(self, mb: Batch, advantages: torch.Tensor, source: OldLogitSource) -> tuple[float, dict]:
        """Forward and backward of one minibatch, micro-batch by micro-batch; gradients add up in `.grad`.

        Each micro-batch holds at most `trainer.max_tokens_per_microbatch` padded tokens and is divided by
        the whole minibatch's loss denominator, so the gradients do not depend on the split, nor on how the
        rows are spread over ranks (FSDP2 sums the ranks' gradients). pi_old of each micro-batch comes from
        `source.old_logprobs`. A rank with fewer micro-batches than the others runs zero-loss ones (a row
        with its loss mask cleared). Returns (minibatch loss, metrics), both over all ranks.
        """
        cfg, num = self.cfg, self.numerics
        denominator = loss_denominator(mb.loss_mask, cfg.loss.aggregation, cfg.loss.normalizer)
        total, parts = 0.0, []
        for rows in self.my_microbatches(mb):
            micro = mb.select(rows if rows is not None else [0]).trimmed().to(num.device)
            if rows is None:  # a placeholder: the same forward, backward and old-logit calls, no loss
                micro.loss_mask = torch.zeros_like(micro.loss_mask)
            adv = advantages[rows if rows is not None else [0]][:, : micro.input_ids.shape[1]].to(num.device)
            with num.autocast():
                logprobs = token_logprobs(  # the LM head only where the loss is taken
                    self.model,
                    micro.input_ids,
                    micro.attention_mask,
                    num.temperature,
                    num.chunk_size,
                    micro.loss_mask,
                    num.packed,
                    num.share_prefixes,
                )
            old = source.old_logprobs(micro, logprobs.detach(), self.version).to(num.device)
            loss, metrics = decoupled_ppo_loss(
                logprobs, old, micro.behavior_logprobs, adv, micro.loss_mask, cfg.loss, denominator
            )
            loss.backward()
            total += loss.item()
            if rows is not None:
                parts.append((metrics, float(micro.loss_mask.sum())))
        if self.ranks.sharded:
            total = self.ranks.all_reduce(total)
            parts = [p for rank_parts in self.ranks.all_gather(parts) for p in rank_parts]
        return total, combine_metrics(parts)

    def train_step(
        self,
        batch: Batch,
        source: OldLogitSource,
        *,
        before_first_update: Callable[[], None] = lambda: None,
        after_optimizer_step: Callable[[], None] = lambda: None,
    ) -> dict[str, float]:
        """One step over `batch`: pi_old of each minibatch from `source`, then the decoupled loss.

        Metrics: counts (`metrics.COUNT_METRICS`) are summed over the minibatches of a pass over the batch
        (averaged over epochs); every other metric is the mean over the step's optimizer steps.
        """
        cfg = self.cfg
        adv = token_advantages(batch, cfg.advantage.estimator, cfg.advantage.normalize_std, cfg.advantage.gamma)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        n_updates = 0
        first = True
        params = [p for p in self.model.parameters() if p.requires_grad]
        for _ in range(cfg.trainer.ppo_epochs):
            order = torch.randperm(len(batch.trajectories), generator=self.generator)
            for rows in torch.chunk(order, cfg.trainer.num_minibatches):
                loss, metrics = self.accumulate_gradients(batch.select(rows), adv[rows], source)
                for k in M.COUNT_METRICS & metrics.keys():
                    counts[k] += metrics.pop(k) / cfg.trainer.ppo_epochs
                grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.trainer.max_grad_norm))
                if first:
                    before_first_update()
                    first = False
                if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.skipped_steps += 1
                    self.consecutive_skips += 1
                    if self.consecutive_skips >= cfg.trainer.max_consecutive_skips:
                        raise TrainingHalted(
                            f"{self.consecutive_skips} consecutive optimizer steps had a non-finite loss or gradient "
                            f"(trainer.max_consecutive_skips={cfg.trainer.max_consecutive_skips})"
                        )
                    continue
                lr = self.set_learning_rate()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.consecutive_skips = 0
                after_optimizer_step()
                n_updates += 1
                metrics[M.LOSS_VALUE] = loss
                metrics[M.GRAD_NORM] = float(grad_norm)
                metrics[M.LEARNING_RATE] = lr
                for k, v in metrics.items():
                    sums[k] += v
        out = {k: v / max(n_updates, 1) for k, v in sums.items()}
        out.update(counts)
        out.update(version_staleness(batch.versions, batch.loss_mask, self.version))
        out.update(lag_fractions(batch.versions, batch.loss_mask, self.version))
        out[M.OPTIMIZER_STEPS] = float(n_updates)
        out[M.SKIPPED_STEPS] = float(self.skipped_steps)
        self.version += 1
        return out

    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far, read from the optimizer's own state (so a restored checkpoint, of any
        version, carries it): Adam's per-parameter step count."""
        for state in self.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def set_learning_rate(self) -> float:
        """The learning rate of the next optimizer step, warm-up applied (`trainer.lr_warmup_steps`)."""
        t = self.cfg.trainer
        lr = t.lr * linear_warmup(self.optimizer_steps(), t.lr_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
