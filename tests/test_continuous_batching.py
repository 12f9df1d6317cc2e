"""Continuous batching in the built-in engine: requests join a running batch as rows finish, each result is handed
back as its row ends, and what a row samples does not depend on when it joined (tiny model, float32)."""

import pytest
import torch
from conftest import pause_from_another_thread
from test_prefix_cache import SYSTEM, A, B, C, D

from twofold.engine.base import GenerationRequest, SamplingParams
from twofold.engine.builtin import BuiltinEngine
from twofold.logprobs import Numerics, score_sequences
from twofold.models import load_model


def _greedy(max_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, stop_token_ids=[], top_k=1)


def _joining(schedule: dict[int, list[GenerationRequest]], rooms: list[int]):
    """joiners(room) that hands in schedule[k] at its k-th call (after the k-th token step) and records each room."""

    def joiners(room: int) -> list[GenerationRequest]:
        rooms.append(room)
        return schedule.pop(len(rooms), [])

    return joiners


def test_rows_that_join_sample_what_they_would_alone_and_each_result_comes_back_as_its_row_ends(tiny_path):
    """Greedy, so a row's tokens are a function of its context alone: requests joining after the 3rd and 5th token
    steps, beside rows carried over from the running batch, produce the tokens of a request generated alone."""
    engine = BuiltinEngine(tiny_path, dtype="float32")
    first = [GenerationRequest(0, SYSTEM + A, _greedy(10)), GenerationRequest(1, SYSTEM + B, _greedy(4))]
    later = {3: [GenerationRequest(2, SYSTEM + C, _greedy(10))], 5: [GenerationRequest(3, D, _greedy(10))]}
    everything = first + later[3] + later[5]
    rooms, reported = [], []
    out = engine.generate(first, _joining(later, rooms), reported.append)

    assert [o.request_id for o in out] == [0, 1]  # the call's own requests, in order
    # request 1 (4 tokens) is back at the 4th step, before the others end; joined requests come back here only
    assert [r.request_id for r in reported] == [1, 0, 2, 3]
    assert engine.joined_requests == 2
    # 64 rows at most: 2 running for steps 1-5 (row 1 leaves at step 4, row 2 came at 3), then 3
    assert rooms[:6] == [62, 62, 62, 62, 62, 61]
    alone = BuiltinEngine(tiny_path, dtype="float32", prefix_cache_bytes=0)
    by_id = {r.request_id: r for r in reported}
    for request in everything:
        solo = alone.generate([request])[0]
        got = by_id[request.request_id]
        assert got.output_ids == solo.output_ids, request.request_id
        assert got.output_versions == [0] * len(solo.output_ids) and got.finish_reason == "length"
    # carried rows are neither prefilled nor reused: the shared system prompt once (40), A, B, C and D (8 each);
    # the system prompt's KV served rows 0, 1 and the joining row 2
    assert (engine.prefilled_tokens, engine.reused_tokens) == (40 + 4 * 8, 3 * 40)


def test_joined_and_carried_rows_sample_from_the_distribution_they_report(tiny_path):
    """Temperature 1: every token's behaviour log-prob, in rows carried through two joins and in rows that joined,
    is the trainer's float32 log-prob of that token in its context."""
    engine = BuiltinEngine(tiny_path, dtype="float32")
    params = SamplingParams(max_new_tokens=8, stop_token_ids=[])
    first = [GenerationRequest(i, SYSTEM + obs, params) for i, obs in enumerate((A, B))]
    later = {2: [GenerationRequest(2, SYSTEM + C, params)], 4: [GenerationRequest(3, D + C, params)]}
    requests = {r.request_id: r for r in first + later[2] + later[4]}
    reported = []
    engine.generate(first, _joining(later, []), reported.append)
    assert sorted(r.request_id for r in reported) == [0, 1, 2, 3]
    sequences = [requests[r.request_id].prompt_ids + r.output_ids for r in reported]
    scores = score_sequences(load_model(tiny_path), sequences, Numerics())
    for result, lp in zip(reported, scores, strict=True):
        prompt = len(requests[result.request_id].prompt_ids)
        assert (lp[prompt:] - torch.tensor(result.output_logprobs)).abs().max() < 1e-5


def test_a_request_over_the_token_budget_or_of_another_sampling_key_waits_for_a_batch_of_its_own(tiny_path):
    """max_batch_tokens = 100: the running row holds 48 + 1 tokens after its first step, so a 48-token request
    joins (97) and a second one would not (145); a request at another temperature cannot share the sampler. Both
    wait, in this call, for batches of their own."""
    engine = BuiltinEngine(tiny_path, dtype="float32", max_batch_tokens=100)
    batches = []
    run_batch = engine._run_batch

    def recording(requests, *args):
        batches.append([r.request_id for r in requests])
        return run_batch(requests, *args)

    engine._run_batch = recording
    params = SamplingParams(max_new_tokens=6, stop_token_ids=[])
    colder = SamplingParams(max_new_tokens=6, stop_token_ids=[], temperature=0.5)
    later = {
        1: [
            GenerationRequest(1, SYSTEM + B, params),
            GenerationRequest(2, SYSTEM + C, colder),
            GenerationRequest(3, SYSTEM + D, params),
        ]
    }
    reported = []
    engine.generate([GenerationRequest(0, SYSTEM + A, params)], _joining(later, []), reported.append)
    assert batches == [[0], [2], [3]]  # 1 joined the first batch
    assert [r.request_id for r in reported] == [0, 1, 2, 3]
    assert all(len(r.output_ids) == 6 and r.finish_reason == "length" for r in reported)
    assert engine.joined_requests == 1


def test_a_pause_stops_the_running_rows_and_hands_back_the_waiting_ones_untouched(tiny_path):
    engine = BuiltinEngine(tiny_path, dtype="float32")
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[])
    waiting = GenerationRequest(1, SYSTEM + B, SamplingParams(max_new_tokens=12, stop_token_ids=[], temperature=0.5))

    def joiners(room):  # hands in a request for a later batch, then an update asks for a pause
        pause_from_another_thread(engine)
        return [waiting]

    reported = []
    engine.generate([GenerationRequest(0, SYSTEM + A, params)], joiners, reported.append)
    engine.resume()
    assert [(r.request_id, r.finish_reason) for r in reported] == [(0, "paused"), (1, "paused")]
    assert len(reported[0].output_ids) == 1 and reported[1].output_ids == []  # stopped at a token boundary


def test_without_on_result_there_is_nowhere_for_joined_results_to_go(tiny_path):
    engine = BuiltinEngine(tiny_path, dtype="float32")
    with pytest.raises(ValueError, match="on_result"):
        engine.generate([GenerationRequest(0, A, _greedy(2))], joiners=lambda room: [])
