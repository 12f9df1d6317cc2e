"""A multi-turn trajectory as the trainer sees it: tokens, masks, behaviour log-probs, versions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Trajectory:
    """One episode of one agent. Per-token lists are aligned with `token_ids`.

    loss_mask is 1 on tokens the agent generated; prompt and observation tokens have mask 0,
    behaviour log-prob 0, version -1 and turn -1. Only the rollout thread writes a trajectory, and only
    by appending; old log-probs live with the old-logit sources (`twofold.oldlogits`), not here.
    """

    uid: int
    group_id: int
    level_seed: int
    level: int = -1  # the level's index in the run's sequence (`level_seed(cfg.seed, level)`); -1: none
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    behavior_logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    success: bool = False
    format_ok: list[bool] = field(default_factory=list)
    status: str = "running"  # running | done | truncated | env_error
    start_version: int = 0
    # Tokens the engine generated but the rollout threw away (regenerate_turn after a pause).
    discarded_tokens: int = 0

    def append(self, ids: list[int], *, agent: bool, logprobs=None, versions=None, turn: int = -1) -> None:
        n = len(ids)
        self.token_ids += ids
        self.loss_mask += [int(agent)] * n
        self.behavior_logprobs += list(logprobs) if agent else [0.0] * n
        self.versions += list(versions) if agent else [-1] * n
        self.turns += [turn if agent else -1] * n

    @property
    def reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)

    def agent_versions(self) -> set[int]:
        return {v for v in self.versions if v >= 0}


def pad_field(trajectories: list[Trajectory], name: str, fill, dtype) -> torch.Tensor:
    """One per-token field of each trajectory, right-padded with `fill` to [B, T_max]."""
    out = torch.full((len(trajectories), max(len(t.token_ids) for t in trajectories)), fill, dtype=dtype)
    for i, t in enumerate(trajectories):
        vals = getattr(t, name)
        out[i, : len(vals)] = torch.tensor(vals, dtype=dtype)
    return out


@dataclass
class Batch:
    """Right-padded tensors of a list of trajectories, [B, T] each."""

    trajectories: list[Trajectory]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    behavior_logprobs: torch.Tensor
    versions: torch.Tensor
    turns: torch.Tensor

    @classmethod
    def from_trajectories(cls, trajectories: list[Trajectory], pad_id: int) -> Batch:
        ids = pad_field(trajectories, "token_ids", -1, torch.long)  # -1 marks padding, never a token id
        return cls(
            trajectories=trajectories,
            input_ids=ids.masked_fill(ids < 0, pad_id),
            attention_mask=(ids >= 0).long(),
            loss_mask=pad_field(trajectories, "loss_mask", 0, torch.float32),
            behavior_logprobs=pad_field(trajectories, "behavior_logprobs", 0.0, torch.float32),
            versions=pad_field(trajectories, "versions", -1, torch.long),
            turns=pad_field(trajectories, "turns", -1, torch.long),
        )

    TENSORS = ("input_ids", "attention_mask", "loss_mask", "behavior_logprobs", "versions", "turns")

    def select(self, rows: torch.Tensor | list[int]) -> Batch:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Batch([self.trajectories[int(i)] for i in rows], *(getattr(self, f)[rows] for f in self.TENSORS))

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.trajectories, *(getattr(self, f).to(device) for f in self.TENSORS))

    def trimmed(self) -> Batch:
        """The same rows without the padding columns no row uses (a micro-batch's own width)."""
        width = int(self.attention_mask.sum(dim=1).max()) if len(self.trajectories) else 0
        return Batch(self.trajectories, *(getattr(self, f)[:, :width] for f in self.TENSORS))
