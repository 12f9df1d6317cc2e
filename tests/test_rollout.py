"""The rollout worker's handling of a turn cut by a weight update (rollout.partial_rollout)."""

import dataclasses

import pytest
import torch
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


def test_a_new_cpu_thread_share_reaches_a_running_continuous_batch(tiny_path, tokenizer, monkeypatch):
    """Under continuous batching one generate call can run through several train steps (episodes keep joining it),
    so the rollout thread's share of the CPU threads is applied between its tokens, not only between calls: the
    share changes from 2 to 1 once the call has begun, and its forwards after the first token run on 1."""
    cfg = small_config(**{"rollout.group_size": 2, "engine.max_new_tokens": 6, "engine.continuous_batching": True})
    engine = make_engine(cfg.engine, tiny_path, tokenizer, seed=0)
    worker = RolloutWorker(engine, tokenizer, cfg, admit=lambda: False, on_group=lambda g: None)
    worker._start_group()
    seen, calls = [], []
    forward = engine.model.forward

    def counted(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counted)
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    worker._cpu_threads = lambda: 1 if seen else 2  # the trainer's trial splits once generation has begun
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        worker._generate([ep for ep in worker.episodes.values() if ep.request is not None])
    finally:
        torch.set_num_threads(before)
        worker.stop()
    # the prefill's forwards ran on 2; every forward after the first token's joiners on 1, in the same call
    assert 1 in seen, seen
    prefill = seen.index(1)
    assert len(calls) == 1 and prefill >= 1 and seen == [2] * prefill + [1] * (len(seen) - prefill)
