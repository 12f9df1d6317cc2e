"""Policy versions: the lifecycle of a version, admission control, and how stale a batch's tokens are.

    stamped    the engine stamps every sampled token with `engine.version`, the version of the weights that
               produced it; a reply paused by an update and continued carries several versions
    bumped     the trainer's version goes v -> v+1 when its optimizer steps for a batch are done
               (`Trainer.train_step`)
    published  the pipeline pauses the rollout at a token boundary, hands W_{v+1} to the engine
               (`engine.version = v+1`) and resumes (`Pipeline._publish`); `Admission.publish` records it
    admitted   group k starts only while k < (published + W + 1) * groups_per_step + dropped  (AReaL's rule):
               at most W+1 steps of groups are in flight or queued. Counting from the *published* version,
               not the trainer's, matters: between bump and publish the engine still stamps v, so a group
               admitted then under the bound of v+1 would start at v and be found W+1 versions old.
               `rollout.start_ahead` = A < W admits (published + A + 1) * groups_per_step instead: a group
               started last, which a longer group overtaking it would leave W+1 versions old, keeps W - A
               versions of slack
    stale      at train time, a group whose oldest trajectory started more than W versions before the
               trainer's version is dropped (counted) or trained, as `rollout.stale_policy` says
Sync mode is W = 0: one step of groups, generated after the previous publish, never stale.

A token's lag at train time is the trainer's version minus the version that sampled it; the staleness metrics
(`version/staleness_mean|max`, `version/lag{0,1,2,3,4plus}_frac`) describe a batch by it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from twofold import metrics as M
from twofold.config import Config
from twofold.rollout.trajectory import Trajectory


class Admission:
    """When the rollout may start a group, and which finished groups are too stale to train."""

    def __init__(
        self,
        window: int,
        groups_per_step: int,
        stale_policy: str,
        published_version: int = 0,
        start_ahead: int | None = None,
    ):
        self.window = window
        self.start_ahead = window if start_ahead is None else start_ahead  # steps of groups started ahead
        self.groups_per_step = groups_per_step
        self.stale_policy = stale_policy
        self.published_version = published_version  # written by the trainer while the rollout is paused
        self.dropped_groups = 0  # stale or failed: each lets one more group start
        self.stale_dropped = 0
        # the levels trained or dropped: all below `levels_below`, and `levels_above` beyond it (groups finish
        # out of order in async mode, so the consumed levels need not be a prefix)
        self.levels_below = 0
        self.levels_above: set[int] = set()

    @classmethod
    def of(cls, cfg: Config, async_mode: bool) -> Admission:
        """A run's admission control as its `twofold.config.Config` says: W = max_staleness in async mode (0 in
        sync mode, which never starts ahead), groups started `rollout.start_ahead` steps ahead (-1: W)."""
        window = cfg.max_staleness if async_mode else 0
        ahead = cfg.rollout.start_ahead if async_mode and cfg.rollout.start_ahead >= 0 else window
        return cls(window, cfg.rollout.groups_per_step, cfg.rollout.stale_policy, start_ahead=ahead)

    def admits(self, next_group: int) -> bool:
        """Rollout thread: may group `next_group` start now?"""
        limit = (self.published_version + self.start_ahead + 1) * self.groups_per_step + self.dropped_groups
        return next_group < limit

    def publish(self, version: int) -> None:
        self.published_version = version

    def lag(self, group: list[Trajectory], trainer_version: int) -> int:
        return trainer_version - min(t.start_version for t in group)

    def too_stale(self, group: list[Trajectory], trainer_version: int) -> bool:
        return self.stale_policy == "drop" and self.lag(group, trainer_version) > self.window

    def drop(self, stale: bool) -> None:
        """A group will not be trained (stale, or no episode finished): admit one more in its place."""
        self.dropped_groups += 1
        self.stale_dropped += int(stale)

    def consume(self, level: int) -> None:
        """The group of level `level` was trained or dropped: a resumed run does not play it again."""
        self.levels_above.add(level)
        while self.levels_below in self.levels_above:
            self.levels_above.remove(self.levels_below)
            self.levels_below += 1

    def levels_to_play(self) -> Iterator[int]:
        """The levels not yet trained or dropped, in order: where a resumed run's groups start. In sync mode
        (and whenever groups finish in order) `levels_below` onwards, the level `next_group` counts."""
        skip = set(self.levels_above)
        return (level for level in itertools.count(self.levels_below) if level not in skip)

    def next_group(self, steps_done: int) -> int:
        """The first group not yet trained or dropped after `steps_done` steps (where a resumed run restarts)."""
        return steps_done * self.groups_per_step + self.dropped_groups

    def state_dict(self) -> dict:
        return {
            "dropped_groups": self.dropped_groups,
            "stale_dropped": self.stale_dropped,
            "levels_below": self.levels_below,
            "levels_above": sorted(self.levels_above),
        }

    def load_state_dict(self, state: dict, steps_done: int = 0) -> None:
        self.dropped_groups, self.stale_dropped = state["dropped_groups"], state["stale_dropped"]
        # a checkpoint from before the levels were kept: they were taken to be a prefix
        self.levels_below = state.get("levels_below", self.next_group(steps_done))
        self.levels_above = set(state.get("levels_above", []))


LAG_BUCKETS = ("0", "1", "2", "3", "4plus")  # token lag in versions; the last bucket is 4 and more


def lag_bucket(lag: torch.Tensor) -> torch.Tensor:
    """Index into LAG_BUCKETS of each lag (versions >= 0)."""
    return lag.clamp(min=0, max=len(LAG_BUCKETS) - 1).long()


def version_staleness(token_versions: torch.Tensor, mask: torch.Tensor, current_version: int) -> dict[str, float]:
    """Mean and max of current_version - v_t over agent tokens (`version/staleness_mean|max`)."""
    sel = (mask > 0) & (token_versions >= 0)
    if not sel.any():
        return {M.STALENESS_MEAN: 0.0, M.STALENESS_MAX: 0.0}
    lag = (current_version - token_versions[sel]).to(torch.float32)
    return {M.STALENESS_MEAN: float(lag.mean()), M.STALENESS_MAX: float(lag.max())}


def lag_fractions(token_versions: torch.Tensor, mask: torch.Tensor, current_version: int) -> dict[str, float]:
    """The token lag's distribution: `version/lag{0,1,2,3,4plus}_frac`, shares of agent tokens per bucket."""
    sel = (mask > 0) & (token_versions >= 0)
    if not sel.any():
        return {}
    counts = torch.bincount(lag_bucket(current_version - token_versions[sel]), minlength=len(LAG_BUCKETS))
    return {M.lag_fraction(b): float(c) / int(sel.sum()) for b, c in zip(LAG_BUCKETS, counts, strict=True)}
