"""Advantages: per-sequence estimators (GRPO's group baseline, REINFORCE's batch baseline) and per-turn
discounted returns, broadcast to the tokens that carry loss. Pure functions on tensors, plus
`token_advantages`, which reads them off a batch as `advantage.estimator` says."""

from __future__ import annotations

from collections import defaultdict

import torch

from twofold.rollout.trajectory import Batch


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: A_i = r_i - mean_{j in g(i)} r_j, divided by (std_g + eps) when `normalize_std` (std unbiased=False)."""
    adv = torch.empty_like(rewards)
    for g in torch.unique(group_ids):
        sel = group_ids == g
        r = rewards[sel]
        a = r - r.mean()
        if normalize_std:
            a = a / (r.std(unbiased=False) + eps)
        adv[sel] = a
    return adv


def reinforce_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a batch-mean baseline: A_i = r_i - mean_j r_j."""
    return rewards - rewards.mean()


def discounted_returns(turn_rewards: list[float], gamma: float) -> list[float]:
    """Per-turn returns G_k = sum_{j >= k} gamma^(j-k) r_j of one multi-turn episode."""
    out, running = [0.0] * len(turn_rewards), 0.0
    for k in range(len(turn_rewards) - 1, -1, -1):
        running = turn_rewards[k] + gamma * running
        out[k] = running
    return out


def broadcast_turn_values(turn_values: torch.Tensor, token_turns: torch.Tensor) -> torch.Tensor:
    """Per-token values from per-turn values [B, K]; `token_turns` [B, T] holds each token's turn, -1 off-turn."""
    idx = token_turns.clamp(min=0).long()
    vals = torch.gather(turn_values, 1, idx)
    return torch.where(token_turns >= 0, vals, torch.zeros_like(vals))


def token_advantages(batch: Batch, estimator: str, normalize_std: bool, gamma: float) -> torch.Tensor:
    """Per-token advantages [B, T] on agent tokens (0 elsewhere)."""
    trajs = batch.trajectories
    if estimator == "discounted":
        # A at turn k = G_k - mean over the group of G_0: per-turn credit, a GRPO-style baseline.
        returns = [discounted_returns(t.turn_rewards, gamma) or [0.0] for t in trajs]
        baseline: dict[int, list[float]] = defaultdict(list)
        for t, g in zip(trajs, returns, strict=True):
            baseline[t.group_id].append(g[0])
        width = max(len(g) for g in returns)
        per_turn = torch.zeros((len(trajs), width))
        for i, (t, g) in enumerate(zip(trajs, returns, strict=True)):
            b = sum(baseline[t.group_id]) / len(baseline[t.group_id])
            per_turn[i, : len(g)] = torch.tensor(g) - b
        return broadcast_turn_values(per_turn, batch.turns.clamp(max=width - 1)) * batch.loss_mask
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    if estimator == "grpo":
        adv = group_advantages(rewards, torch.tensor([t.group_id for t in trajs]), normalize_std)
    else:
        adv = reinforce_advantages(rewards)
    return adv[:, None] * batch.loss_mask
