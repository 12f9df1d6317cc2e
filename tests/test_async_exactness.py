"""The exact sources under real async timing: env latency with a long tail, weights that move, several seeds,
continuous batching on (episodes back from their env step join running batches).

Every step, the old log-probs a source hands the trainer are compared with a brute-force reference:
each agent token scored by a full forward of its own version's weights, kept at every publish. The
long-tailed latency makes trajectories end after the weights they last sampled with were replaced
(the event order that once killed the dedicated worker); at each version one episode's final env step is
also held until the next publish, so that order happens on a fast, quiet machine too, and the test checks
that it did.
"""

import threading
import time

import pytest
import torch
from conftest import small_config

from twofold.engine.base import weight_items
from twofold.logprobs import Numerics, score_sequences
from twofold.models import load_model, load_parameters, load_policy, versioned_state
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.rundir import read_metrics


class BruteForce:
    """Keeps every published version's weights and scores a batch token by token with them."""

    def __init__(self, pipe: Pipeline, model_path, initial=None, from_engine=False):
        """Versions are recorded from the trainer at each publish (float32), or, `from_engine`, from the weights
        the engine gets (a sharded trainer's are gathered there; the engine must then run float32).
        `initial`: the starting weights when the trainer's model is sharded (its own are shards)."""
        self.states = {pipe.trainer.version: initial or versioned_state(pipe.trainer.model)}
        self.model = load_model(model_path)
        self.pad_id = pipe.ctx.pad_id
        self.max_err = 0.0
        self.checked_tokens = 0
        if from_engine:
            engine_update = pipe.engine.update_weights

            def update_weights(weights, version):
                state = {k: v.clone() for k, v in weight_items(weights)}  # the stream, kept
                self.states[version] = state
                engine_update(state, version)

            pipe.engine.update_weights = update_weights
            return
        publish = pipe._publish

        def record_after_publish():
            publish()
            self.states[pipe.trainer.version] = versioned_state(pipe.trainer.model)

        pipe._publish = record_after_publish

    def reference(self, trajectories, width):
        """Each token's log-prob under the weights of the version that sampled it: every trajectory holding a
        token of a version is scored whole under that version's weights."""
        ref = torch.zeros(len(trajectories), width)
        for version, state in self.states.items():
            rows = [i for i, t in enumerate(trajectories) if version in t.agent_versions()]
            if not rows:
                continue
            load_parameters(self.model, state)
            scored = score_sequences(self.model, [trajectories[i].token_ids for i in rows], Numerics(), self.pad_id)
            for i, lp in zip(rows, scored, strict=True):
                sel = torch.tensor(trajectories[i].versions) == version
                ref[i, : len(lp)][sel] = lp[sel]
        return ref

    def check(self, batch, old):
        ref = self.reference(batch.trajectories, old.shape[1])
        mask = batch.loss_mask > 0
        self.max_err = max(self.max_err, float((old - ref)[mask].abs().max()))
        self.checked_tokens += int(mask.sum())


def watch(pipe: Pipeline, brute: BruteForce) -> dict:
    """Check the old log-probs of every minibatch; count trajectories that end after their last version was replaced."""
    seen = {"ended_after_publish": 0}
    old_logprobs = pipe.source.old_logprobs

    def checked_old_logprobs(batch, current, version):
        old = old_logprobs(batch, current, version)
        brute.check(batch, old)
        return old

    pipe.source.old_logprobs = checked_old_logprobs
    on_end = pipe._on_trajectory_end

    def on_trajectory_end(traj):
        versions = traj.agent_versions()
        seen["ended_after_publish"] += bool(versions) and max(versions) < pipe.engine.version
        on_end(traj)

    pipe._on_trajectory_end = on_trajectory_end
    pipe.worker.on_trajectory_end = on_trajectory_end
    return seen


def hold_one_final_step_per_version(pipe: Pipeline, below: int) -> None:
    """The first episode to finish at each engine version below `below` returns from its final env step only
    once the weights are replaced (a slow last tool call): it ends after a publish, whatever the timing. It
    runs in the env executor, so the rollout loop and the other episodes go on meanwhile."""
    env_step, held, lock = pipe.worker._env_step, set(), threading.Lock()

    def final_step_held(ep, text):
        out = env_step(ep, text)
        version = pipe.engine.version
        with lock:
            hold = out[2] and version < below and version not in held
            if hold:
                held.add(version)
        deadline = time.monotonic() + 30  # a publish comes within a step; never hang the test on a bug
        while hold and pipe.engine.version == version and time.monotonic() < deadline:
            time.sleep(0.005)
        return out

    pipe.worker._env_step = final_step_held


# 4 async steps of multi-turn episodes under random env latency: tokens of several versions in every batch
LATENCY_RUN = {
    "trainer.steps": 4,
    "env.step_latency_ms": 30.0,
    "env.step_latency_sigma": 1.0,
    "env.max_turns": 4,
    "rollout.groups_per_step": 3,
    "advantage.estimator": "discounted",
    "run.checkpoint_every": 0,
    "run.tensorboard": False,
}


@pytest.mark.parametrize(
    "source,snapshot_device",
    [("snapshot", "auto"), ("snapshot", "disk"), ("dedicated", "auto"), ("interrupt", "auto")],
)
def test_exact_sources_under_env_latency_match_brute_force(tmp_path, tiny_path, source, snapshot_device):
    """`snapshot_device=disk`: the held versions are files read back memory-mapped; the same bound holds."""
    ended_after_publish = joined = in_flight = 0
    for seed in (0, 1, 2):
        cfg = small_config(
            mode="async",
            seed=seed,
            max_staleness=2,
            **{"oldlogits.source": source, "oldlogits.snapshot_device": snapshot_device, **LATENCY_RUN},
        )
        pipe = Pipeline(cfg, tmp_path / f"{source}-{seed}", model_path=tiny_path)
        brute = BruteForce(pipe, tiny_path)
        seen = watch(pipe, brute)
        # versions 0-2: each is followed by a publish while step 4 still needs trajectories
        hold_one_final_step_per_version(pipe, below=cfg.trainer.steps - 1)
        pipe.run()
        rows = read_metrics(tmp_path / f"{source}-{seed}" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3, 4], f"{source} seed {seed} did not survive every step"
        assert brute.checked_tokens > 0
        assert brute.max_err < 2e-6, f"{source} seed {seed}: max |old - brute force| = {brute.max_err:.2e}"
        assert rows[-1]["version/staleness_max"] >= 1  # weights moved under the rollouts
        ended_after_publish += seen["ended_after_publish"]
        joined += rows[-1]["engine/joined_requests"]
        if source == "snapshot":  # versions the engine moved past are scored in flight: one version held at most
            in_flight += rows[-1]["snapshot/in_flight_tokens"]
            assert max(r["snapshot/peak_bytes"] for r in rows) == rows[-1]["snapshot/version_bytes"]
            assert (pipe.source.store.directory is not None) == (snapshot_device == "disk")  # files, or tensors
    assert ended_after_publish > 0, "no trajectory ended after a publish: the test lost its point"
    assert source != "snapshot" or in_flight > 0, "no in-flight token of a past version was scored early"
    assert joined > 0, "no request joined a running batch: continuous batching went unchecked"


def test_dedicated_under_lora_shares_the_frozen_base_and_stays_exact_under_async(tmp_path, tiny_path):
    """The dedicated worker's copy scores on its own thread with the trainer's frozen base tensors while the
    trainer trains its adapters beside it: still the brute-force old log-probs, while the adapters move."""
    lora = {"model.lora.r": 4, "model.lora.alpha": 8.0, "model.lora.target_modules": ["q_proj", "v_proj"]}
    cfg = small_config(
        mode="async",
        max_staleness=2,
        **{"oldlogits.source": "dedicated", **LATENCY_RUN, "trainer.lr": 1e-2, **lora},
    )
    pipe = Pipeline(cfg, tmp_path / "run", model_path=tiny_path)
    brute = BruteForce(pipe, tiny_path)
    brute.model = load_policy(tiny_path, cfg.model)  # versions are adapters: they load into a LoRA policy
    watch(pipe, brute)
    base = {n: p for n, p in pipe.trainer.model.named_parameters() if not p.requires_grad}
    copy = dict(pipe.source.worker.model.named_parameters())
    assert base and all(copy[n] is p for n, p in base.items())
    pipe.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["version/staleness_max"] >= 1
    assert brute.checked_tokens > 0 and brute.max_err < 2e-6, f"max |old - brute force| = {brute.max_err:.2e}"
    first, last = brute.states[min(brute.states)], brute.states[max(brute.states)]
    assert max(float((first[k] - last[k]).abs().max()) for k in first) > 1e-3  # the adapters moved
