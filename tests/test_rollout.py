"""The rollout worker's handling of a turn cut by a weight update (rollout.partial_rollout)."""

import dataclasses

import pytest
from conftest import small_config

from twofold.engine import make_engine
from twofold.models import full_weights, load_model
from twofold.rollout.worker import RolloutWorker


@pytest.mark.parametrize("mode", ["continue", "regenerate_turn"])
def test_a_turn_paused_at_version_0_finishes_at_version_1(tiny_path, tokenizer, mode):
    """3 tokens sampled at version 0, then a pause and an update to version 1.

    continue: the 3 tokens stay (stamped 0) and version 1 writes the rest of the turn.
    regenerate_turn: the 3 tokens are thrown away (counted) and version 1 writes the whole turn.
    """
    cfg = small_config(
        **{
            "rollout.partial_rollout": mode,
            "rollout.group_size": 1,
            "advantage.estimator": "reinforce",
            "engine.max_new_tokens": 8,
        }
    )
    engine = make_engine(cfg.engine, tiny_path, tokenizer, seed=0)
    worker = RolloutWorker(engine, tokenizer, cfg, admit=lambda: False, on_group=lambda g: None)
    worker._start_group()
    (ep,) = worker.episodes.values()
    prompt_len = len(ep.traj.token_ids)
    first = engine.generate(
        [dataclasses.replace(ep.request, params=dataclasses.replace(ep.request.params, max_new_tokens=3))]
    )[0]
    worker._on_generated(ep, dataclasses.replace(first, finish_reason="paused"))  # as if cut by pause()
    engine.update_weights(full_weights(load_model(tiny_path)), 1)

    worker.run_until(lambda: ep.turn >= 1 or ep.traj.status != "running")  # the env has answered turn 0
    worker.stop()
    turn = [
        v for v, k in zip(ep.traj.versions, ep.traj.turns, strict=True) if k == 0
    ]  # ends at 8 tokens or the stop token
    if mode == "continue":
        assert ep.traj.token_ids[prompt_len : prompt_len + 3] == first.output_ids
        assert ep.traj.behavior_logprobs[prompt_len : prompt_len + 3] == first.output_logprobs
        assert turn[:3] == [0] * 3 and len(turn) > 3 and set(turn[3:]) == {1}
        assert ep.traj.discarded_tokens == 0
    else:
        assert len(turn) > 0 and set(turn) == {1}
        assert ep.traj.discarded_tokens == 3 and worker.counters.discarded_tokens == 3
