"""Versions: admission control counts from the version the engine stamps, not from the trainer's bumped one;
the stale rule; the staleness metrics."""

import itertools

import pytest
import torch
from conftest import small_config

from twofold.config import ConfigError
from twofold.pipeline.loop import Pipeline
from twofold.rollout.trajectory import Trajectory
from twofold.rollout.versions import Admission, version_staleness

T = torch.tensor


def test_bound_moves_only_when_a_version_is_published():
    # W = 2, 2 groups per step: at published version 0, groups 0..5 (three steps' worth) may start
    a = Admission(window=2, groups_per_step=2, stale_policy="drop", published_version=0)
    assert a.admits(5) and not a.admits(6)
    a.drop(stale=True)  # a dropped group lets one more start in its place
    assert a.admits(6) and not a.admits(7)
    a.publish(1)
    assert a.admits(8) and not a.admits(9)
    assert a.stale_dropped == 1 and a.next_group(steps_done=1) == 3


def test_starting_fewer_steps_ahead_than_the_window_admits_fewer_groups():
    # W = 2, start_ahead = 1, 2 groups per step: at published version 0, groups 0..3 (two steps' worth)
    a = Admission(window=2, groups_per_step=2, stale_policy="drop", start_ahead=1)
    assert a.admits(3) and not a.admits(4)
    a.publish(1)
    assert a.admits(5) and not a.admits(6)
    # the stale rule is still the window's: a group started at 0 and trained at version 3 is dropped
    group = [Trajectory(uid=0, group_id=0, level_seed=0, start_version=0)]
    assert not a.too_stale(group, trainer_version=2) and a.too_stale(group, trainer_version=3)


def test_start_ahead_follows_max_staleness_unless_set_and_never_exceeds_it():
    assert Admission.of(small_config(max_staleness=3), async_mode=True).start_ahead == 3
    ahead = small_config(max_staleness=3, **{"rollout.start_ahead": 1})
    assert (Admission.of(ahead, async_mode=True).start_ahead, Admission.of(ahead, async_mode=True).window) == (1, 3)
    assert Admission.of(ahead, async_mode=False).start_ahead == 0  # sync: one step of groups, never ahead
    with pytest.raises(ConfigError, match="rollout.start_ahead"):
        small_config(max_staleness=1, **{"rollout.start_ahead": 2})


def test_a_resumed_run_plays_the_levels_not_yet_trained_or_dropped():
    # async: groups finish out of order; levels 0, 1, 3 and 4 are consumed, level 2 is still in flight
    a = Admission(window=2, groups_per_step=2, stale_policy="drop")
    for level in (1, 0, 4, 3):
        a.consume(level)
    assert (a.levels_below, a.levels_above) == (2, {3, 4})
    assert list(itertools.islice(a.levels_to_play(), 3)) == [2, 5, 6]  # 2 is played, 3 and 4 are not again
    resumed = Admission(window=2, groups_per_step=2, stale_policy="drop")
    resumed.load_state_dict(a.state_dict(), steps_done=2)
    assert list(itertools.islice(resumed.levels_to_play(), 3)) == [2, 5, 6]
    # groups consumed in order (sync mode): the levels go on where the group counter does
    b = Admission(window=0, groups_per_step=2, stale_policy="drop")
    for level in range(4):
        b.consume(level)
    assert next(b.levels_to_play()) == b.next_group(steps_done=2) == 4
    # a checkpoint written before the levels were kept: they were a prefix, 2 steps x 2 groups + 1 dropped
    old = Admission(window=2, groups_per_step=2, stale_policy="drop")
    old.load_state_dict({"dropped_groups": 1, "stale_dropped": 1}, steps_done=2)
    assert list(itertools.islice(old.levels_to_play(), 2)) == [5, 6]


def test_stale_rule_drops_only_beyond_the_window():
    group = [
        Trajectory(uid=0, group_id=0, level_seed=0, start_version=3),
        Trajectory(uid=1, group_id=0, level_seed=0, start_version=4),
    ]
    drop = Admission(window=2, groups_per_step=1, stale_policy="drop")
    assert not drop.too_stale(group, trainer_version=5)  # lag 2 = W
    assert drop.too_stale(group, trainer_version=6)  # lag 3 > W
    assert not Admission(window=2, groups_per_step=1, stale_policy="train").too_stale(group, trainer_version=6)


def test_group_admitted_between_bump_and_publish_is_not_started(tmp_path, tiny_path):
    """Forced interleaving: the trainer has bumped its version but not yet published it.

    The engine still stamps version 0, so a group started now would be W+1 versions old when its step
    comes and be dropped: admission must wait for the publish.
    """
    cfg = small_config(mode="async", max_staleness=2, **{"rollout.groups_per_step": 2})
    pipe = Pipeline(cfg, tmp_path / "run", model_path=tiny_path)
    try:
        pipe.worker.next_group = (0 + 2 + 1) * 2  # the first group beyond the bound of version 0
        assert not pipe._admit()
        pipe.trainer.version = 1  # Trainer.train_step has bumped the version; _publish has not run
        assert pipe.engine.version == 0
        assert not pipe._admit()
        pipe._publish()
        assert pipe.engine.version == 1 and pipe._admit()
    finally:
        pipe.close()


def test_version_staleness_ignores_prompt_tokens():
    m = version_staleness(T([[-1, 3, 5, 5]]), T([[0.0, 1.0, 1.0, 1.0]]), current_version=6)
    assert m == {"version/staleness_mean": pytest.approx((3 + 1 + 1) / 3), "version/staleness_max": 3.0}
