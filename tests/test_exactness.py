"""The three exact sources agree with a brute-force reference on a run whose rollouts span versions."""

import os
import time

import pytest
import torch

from twofold.config import config_from_dict
from twofold.engine.base import GenerationRequest, SamplingParams
from twofold.engine.builtin import BuiltinEngine
from twofold.logprobs import Numerics, score_sequences
from twofold.models import full_weights, load_model, load_parameters, model_bytes, versioned_state
from twofold.oldlogits import CapturedLogprobs, SourceContext, capture, make_source
from twofold.oldlogits.snapshot import LOCK_FILE, DirectoryLock
from twofold.rollout.trajectory import Batch, Trajectory


@pytest.fixture(scope="module")
def recording(tiny_path, tokenizer):
    return record(BuiltinEngine(tiny_path, dtype="bfloat16", tokenizer=tokenizer, seed=3), tiny_path, tokenizer)


def policy(model):
    """A fresh policy model: `model` is a model directory, or a factory (a LoRA policy, for example)."""
    return model() if callable(model) else load_model(model)


def record(engine, tiny_path, tokenizer):
    """Three trajectories; partial outputs continue across two weight updates (versions 0, 1, 2).

    Each update moves the parameters that train (all of them, or the LoRA adapters); the engine gets
    the full weights, the recording keeps each version's `versioned_state`."""
    model = policy(tiny_path)
    states = {0: versioned_state(model)}
    events = []
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in ("P F F\nF H G", "F P\nG H", "P F\nF F\nF G")]
    requests = {i: GenerationRequest(i, p, SamplingParams(max_new_tokens=4)) for i, p in enumerate(prompts)}
    for i, p in enumerate(prompts):
        events.append(("append", i, p, False, None, None))

    def generate(ids, extra):
        for i in ids:  # a request stopped after `extra` more tokens stands for one paused at an update
            r = requests[i]
            r.params = SamplingParams(max_new_tokens=len(r.output_ids) + extra)
            out = engine.generate([r])[0]
            n = len(r.output_ids)
            events.append(("append", i, out.output_ids[n:], True, out.output_logprobs[n:], out.output_versions[n:]))
            requests[i] = out.as_continuation(r)

    def update(version):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
        states[version] = versioned_state(model)
        engine.update_weights(full_weights(model), version)
        events.append(("update", version))

    torch.manual_seed(0)
    generate([0, 1, 2], 4)
    events.append(("end", 2))
    update(1)
    generate([0, 1], 3)  # trajectories 0 and 1 now span versions 0 and 1
    obs = tokenizer.encode("\nF F P", add_special_tokens=False)  # an observation between turns of trajectory 0
    events.append(("append", 0, obs, False, None, None))
    requests[0] = GenerationRequest(
        0, requests[0].prompt_ids + requests[0].output_ids + obs, SamplingParams(max_new_tokens=3)
    )
    generate([0], 3)
    events.append(("end", 1))
    update(2)
    generate([0], 4)  # trajectory 0 spans versions 0, 1 and 2
    events.append(("end", 0))
    return events, states


def replay(
    kind,
    recording,
    tiny_path,
    budget="",
    logprob_worker=None,
    on_budget="wait",
    batch_rows=None,
    snapshot_directory=None,
    after_event=lambda source: None,
):
    events, states = recording
    cfg = config_from_dict({"oldlogits": {"snapshot_budget": budget, "on_budget": on_budget}})
    model = policy(tiny_path)
    load_parameters(model, states[0])
    ctx = SourceContext(pad_id=0, async_mode=True, max_staleness=2, snapshot_directory=snapshot_directory)
    source = make_source(cfg, ctx, model, kind=kind, logprob_worker=logprob_worker)
    trajs = [Trajectory(uid=i, group_id=0, level_seed=0) for i in range(3)]
    version, peak = 0, 0
    for ev in events:
        if ev[0] == "append":
            _, i, ids, agent, lps, vers = ev
            known = trajs[i].agent_versions()
            trajs[i].append(ids, agent=agent, logprobs=lps, versions=vers)
            for v in sorted(set(vers or []) - known):
                source.on_new_version(trajs[i], v)
        elif ev[0] == "end":
            source.on_trajectory_end(trajs[ev[1]])
        else:  # the pipeline's update order: before_update with W_v, new weights, on_publish
            source.before_update(model, version, trajs)
            load_parameters(model, states[ev[1]])
            version = ev[1]
            source.on_publish(model, version, trajs)
        if kind == "snapshot":
            peak = max(peak, source.store.bytes)
        after_event(source)
    batch = Batch.from_trajectories([trajs[i] for i in batch_rows or range(len(trajs))], pad_id=0)
    in_batch = {t.uid for t in batch.trajectories}
    source.prepare(batch, model, version, [t for t in trajs if t.uid not in in_batch])
    old = source.old_logprobs(batch, ctx.score_batch(model, batch), version)
    source.close()
    return batch, old, source, peak


def brute_force(batch, states, tiny_path):
    """Every token scored by a full forward of its own version's weights."""
    ref = torch.zeros_like(batch.behavior_logprobs)
    model = policy(tiny_path)
    for v, state in states.items():
        load_parameters(model, state)
        lps = score_sequences(model, [t.token_ids for t in batch.trajectories], Numerics())
        for i, lp in enumerate(lps):
            sel = batch.versions[i, : len(lp)] == v
            ref[i, : len(lp)][sel] = lp[sel]
    return ref


def test_recording_spans_versions(recording):
    events, _ = recording
    versions = {v for e in events if e[0] == "append" and e[3] for v in e[5]}
    assert versions == {0, 1, 2}


def assert_exact_sources_agree(recording, tiny_path, logprob_worker=None):
    """snapshot, dedicated and interrupt each match the brute-force old log-probs within 1e-6."""
    results = {
        k: replay(k, recording, tiny_path, logprob_worker=logprob_worker)
        for k in ("snapshot", "dedicated", "interrupt")
    }
    batch = results["snapshot"][0]
    ref = brute_force(batch, recording[1], tiny_path)
    mask = batch.loss_mask > 0
    assert {int(v) for v in batch.versions[mask]} == {0, 1, 2}
    for kind, (_, old, _, _) in results.items():
        err = (old - ref)[mask].abs().max().item()
        print(f"{kind}: max |old - brute force| = {err:.2e}")
        assert err < 1e-6, kind
    return batch, ref, mask


def test_three_exact_sources_agree_with_brute_force(recording, tiny_path):
    batch, ref, mask = assert_exact_sources_agree(recording, tiny_path)
    # recompute uses the current weights (version 2) for every token: wrong on stale tokens
    model = load_model(tiny_path)
    load_parameters(model, recording[1][2])
    store = CapturedLogprobs()
    capture(SourceContext(0, True, 2).scorer(model), store, batch.trajectories, None)
    recompute, _ = store.gather(batch)
    stale = mask & (batch.versions < 2)
    gap = (recompute - ref)[stale].abs()
    print(f"recompute vs exact on stale tokens: mean |delta| {gap.mean():.3e}, max {gap.max():.3e}")
    assert gap.mean() > 1e-3
    assert (recompute - ref)[mask & (batch.versions == 2)].abs().max() < 1e-6


def test_snapshot_budget_of_one_model_stays_exact_and_bounded(recording, tiny_path):
    one = model_bytes(load_model(tiny_path))
    batch, old, source, peak = replay("snapshot", recording, tiny_path, budget=str(one))
    ref = brute_force(batch, recording[1], tiny_path)
    mask = batch.loss_mask > 0
    assert (old - ref)[mask].abs().max() < 1e-6
    assert peak <= one
    assert source.budget_captures >= 1  # the second version did not fit: captured while resident


def test_snapshot_budget_with_ewma_fallback_scores_only_what_did_not_fit(recording, tiny_path):
    """One-model budget, on_budget=ewma: version 0 is kept; version 1 does not fit (trajectory 0 still needs 0).

    Its tokens go to the EWMA proximal policy. Nothing stepped the optimizer, so the EWMA is still W_0 and
    those tokens are scored by W_0; versions 0 and 2 stay exact and nothing was captured in a pause.
    """
    one = model_bytes(load_model(tiny_path))
    batch, old, source, peak = replay("snapshot", recording, tiny_path, budget=str(one), on_budget="ewma")
    states = recording[1]
    exact = brute_force(batch, states, tiny_path)
    by_w0 = brute_force(batch, dict.fromkeys(states, states[0]), tiny_path)
    mask = batch.loss_mask > 0
    v1 = mask & (batch.versions == 1)
    assert v1.any() and (old - exact)[mask & ~v1].abs().max() < 1e-6
    assert (old - by_w0)[v1].abs().max() < 1e-5
    assert (old - exact)[v1].abs().mean() > 1e-3
    assert source.fallback_tokens == int(v1.sum()) and source.budget_captures == 0
    assert peak <= one


def test_snapshot_store_frees_versions_once_their_tokens_are_scored(recording, tiny_path):
    """Trajectory 0, left out of the batch, still refers to versions 0 and 1; the engine has moved past both
    (it samples with 2), so the step's start scores its tokens of 0 and 1 from the snapshots and frees them."""
    _, _, source, peak = replay("snapshot", recording, tiny_path, batch_rows=[1, 2])
    assert peak == 2 * source.snapshot_bytes  # both held until a step started
    assert source.store.snapshots == {} and source.store.bytes == 0
    pending = Batch.from_trajectories([source_trajectory(recording, 0)], pad_id=0)
    early = (pending.loss_mask > 0) & (pending.versions < 2)
    assert source.in_flight_tokens == int(early.sum()) > 0
    captured, missing = source.captured.gather(pending)
    ref = brute_force(pending, recording[1], tiny_path)
    assert (captured - ref)[early].abs().max() < 1e-6
    assert torch.equal(missing, (pending.loss_mask > 0) & (pending.versions == 2))  # its version-2 tokens: later
    _, _, source, _ = replay("snapshot", recording, tiny_path)
    assert source.store.snapshots == {} and source.store.bytes == 0  # scored in prepare, freed before training
    assert source.in_flight_tokens == 0  # nothing was in flight


def test_snapshots_on_disk_are_exact_resident_only_while_scored_and_removed(recording, tiny_path, tmp_path):
    """`oldlogits.snapshot_device=disk`: versions 0 and 1 are files, both held until the step starts (as in
    memory, the test above); no byte of them counts as resident; the old log-probs match brute force within the
    same 1e-6; closing the source removes its directory. A store opening beside other directories removes those
    no live store holds: one whose lock file nobody holds (a killed run's), and one without a lock file older
    than the grace period; it leaves one whose lock is held and one just made."""
    root = tmp_path / "snapshots"
    abandoned, held, old, young = (root / name for name in ("rank0-a", "rank1-b", "rank0-c", "rank0-d"))
    for d in (abandoned, held, old, young):
        d.mkdir(parents=True)
        (d / "v0.pt").write_bytes(b"left")
    (abandoned / LOCK_FILE).touch()
    holder = DirectoryLock(held)
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    seen = []

    def look(source):
        files = sorted(p.name for p in source.store.directory.iterdir() if p.name != LOCK_FILE)
        seen.append((files, source.store.bytes, source.store.resident_bytes))

    batch, old_lps, source, peak = replay("snapshot", recording, tiny_path, snapshot_directory=root, after_event=look)
    assert peak == 2 * source.snapshot_bytes
    assert (["v0.pt", "v1.pt"], 2 * source.snapshot_bytes, 0) in seen
    assert all(resident == 0 for _, _, resident in seen)
    ref = brute_force(batch, recording[1], tiny_path)
    mask = batch.loss_mask > 0
    assert {int(v) for v in batch.versions[mask]} == {0, 1, 2}
    assert (old_lps - ref)[mask].abs().max() < 1e-6
    assert not source.store.directory.exists()
    assert sorted(d.name for d in root.iterdir()) == ["rank0-d", "rank1-b"]  # the held one and the young one
    holder.release()


def source_trajectory(recording, uid):
    """Trajectory `uid` of the recording, rebuilt from its events."""
    t = Trajectory(uid=uid, group_id=0, level_seed=0)
    for ev in recording[0]:
        if ev[0] == "append" and ev[1] == uid:
            t.append(ev[2], agent=ev[3], logprobs=ev[4], versions=ev[5])
    return t


def test_captured_values_are_kept_only_for_the_batch_and_the_trajectories_in_flight():
    """A rank other than 0 never hears that a group was dropped: `retain` at each step's start forgets it."""
    store = CapturedLogprobs()
    trajectories = []
    for uid in range(3):
        t = Trajectory(uid=uid, group_id=0, level_seed=0)
        t.append([5, 6], agent=False)
        t.append([7, 8], agent=True, logprobs=[-1.0, -1.0], versions=[0, 0])
        store.write(uid, torch.tensor([2, 3]), torch.tensor([-0.5, -0.25]) * (uid + 1))
        trajectories.append(t)
    store.retain({0, 2})
    assert [len(store.missing(t)) for t in trajectories] == [0, 2, 0]  # trajectory 1's values are gone
    values, missing = store.gather(Batch.from_trajectories(trajectories, pad_id=0))
    assert values[2, 2:].tolist() == [-1.5, -0.75] and missing[1].tolist() == [False, False, True, True]
