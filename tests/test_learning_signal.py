"""A run that learns nothing says so: most groups with one reward for several steps in a row."""

import json

import pytest
from conftest import small_config

from twofold.pipeline.learning_signal import LearningSignalWatch, zero_variance_group_fraction
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.rundir import read_metrics
from twofold.rollout.trajectory import Trajectory


def episode(group: int, reward: float) -> Trajectory:
    t = Trajectory(uid=0, group_id=group, level_seed=0)
    t.turn_rewards.append(reward)
    return t


def test_zero_variance_groups_are_those_with_one_reward():
    # group 0: 1, 1 (one reward); group 1: 0, 1; group 2: 0, 0 (one reward) -> 2 of 3
    trajs = [episode(0, 1.0), episode(0, 1.0), episode(1, 0.0), episode(1, 1.0), episode(2, 0.0), episode(2, 0.0)]
    assert zero_variance_group_fraction(trajs) == pytest.approx(2 / 3)
    assert zero_variance_group_fraction([]) == 0.0


def test_the_warning_needs_three_steps_in_a_row_and_comes_once():
    watch = LearningSignalWatch(share=0.9, steps=3)
    said = [watch.update(step, frac, 0.1) for step, frac in enumerate([0.95, 1.0, 0.5, 0.9, 1.0, 1.0, 1.0], start=1)]
    assert [s is not None for s in said] == [False, False, False, False, False, True, False]  # steps 4-6, once
    assert watch.warning == {"from_step": 4, "steps": 3, "zero_variance_group_frac": 1.0, "format_ok_rate": 0.1}
    assert "10% of replies are in the format" in said[5]


# The untrained tiny model never computes the sum, and a wrong or unparsed answer scores 0 here: every group has
# one reward, every step.
NO_VARIANCE = {"env.name": "arithmetic", "env.options": {}, "env.format_penalty": 0.0}


def test_a_run_where_every_reward_is_zero_records_it(tmp_path, tiny_path, caplog, capsys):
    cfg = small_config(**{**NO_VARIANCE, "trainer.steps": 3, "run.progress": True})
    with caplog.at_level("WARNING"):
        Pipeline(cfg, tmp_path / "run", model_path=tiny_path).run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["rollout/zero_variance_group_frac"] for r in rows] == [1.0, 1.0, 1.0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["no_learning_signal"]["from_step"] == 1
    assert sum("no learning signal" in r.message for r in caplog.records) == 1
    bar = capsys.readouterr().err.split("\r")  # tqdm redraws the line: its last drawing is the run's end
    assert "signal=NONE (see log)" in bar[-1] and not any("signal=" in line for line in bar if "2/3" in line)
    # The Ray driver's bar replays metrics.jsonl through a watch of its own: the same warning, at the same step.
    replay = LearningSignalWatch()
    said = [replay.update_from_row(row) for row in rows]
    assert [s is not None for s in said] == [False, False, True] and replay.warning == summary["no_learning_signal"]


def test_a_streak_without_variance_goes_on_across_a_resume(tmp_path, tiny_path):
    # Two steps, then resumed for a third: the resumed run counts the two kept rows, so its third step in a row
    # without reward variance is the warning's, from step 1 (a watch started empty would see one step).
    settings = {**NO_VARIANCE, "run.checkpoint_every": 1}
    Pipeline(small_config(**{**settings, "trainer.steps": 2}), tmp_path / "run", model_path=tiny_path).run()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["no_learning_signal"] is None
    Pipeline(
        small_config(**{**settings, "trainer.steps": 3}), tmp_path / "run", resume=True, model_path=tiny_path
    ).run()
    warning = json.loads((tmp_path / "run" / "summary.json").read_text())["no_learning_signal"]
    assert warning is not None and warning["from_step"] == 1
