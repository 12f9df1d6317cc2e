"""The Ray runtime on a local cluster that this module starts and stops: 2 engine replicas, 2 env
workers, the trainer (and the dedicated old-logit worker) as actors, the tiny model."""

import time

import pytest

ray = pytest.importorskip("ray")

from conftest import small_config  # noqa: E402
from test_exactness import assert_exact_sources_agree, record  # noqa: E402
from test_pipeline import DOCUMENTED  # noqa: E402

from twofold.config import ConfigError, EngineConfig, ModelConfig  # noqa: E402
from twofold.pipeline.checkpoint import checkpoints  # noqa: E402
from twofold.pipeline.ray_runtime import (  # noqa: E402
    EngineReplica,
    OldLogitActor,
    RayEngine,
    RayLogprobWorker,
    RaySession,
)
from twofold.pipeline.rundir import read_metrics, summary  # noqa: E402
from twofold.pipeline.train import train  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    # Logical CPUs: the actors' requests must fit; the 2 real cores are shared by all of them. Ray starts its
    # workers at niceness 15 (`worker_niceness`), so beside the other test worker's processes (niceness 0) the
    # actors would wait whenever those compute: the same niceness as everything else in the suite.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_worker_niceness", "0")
    ray.init(num_cpus=8, include_dashboard=False, namespace="twofold", log_to_driver=False)
    yield
    ray.shutdown()
    mp.undo()


def ray_config(tmp_path, **overrides):
    return small_config(**{"runtime.backend": "ray", "mode": "async", "run.dir": str(tmp_path / "run"), **overrides})


# One engine replica and one env worker where several are not what a test is about: each actor is a process
# to start, and on 2 cores that is most of a Ray test's time.
ONE_EACH = {"runtime.ray.engine_replicas": 1, "runtime.ray.env_workers": 1}


@pytest.mark.parametrize("source", ["snapshot", "dedicated", "interrupt"])
def test_short_async_run_under_ray(cluster, tmp_path, tiny_path, source):
    # snapshot: a budget of one snapshot (the model is 428,288 bytes in float32); it must hold in the trainer actor.
    # interrupt pauses and resumes both replicas; dedicated's point is its own actor, so one replica does.
    # Two env workers once (snapshot), one elsewhere: each actor is a process to start.
    budget = {"oldlogits.snapshot_budget": "500KB"} if source == "snapshot" else {}
    replicas = 1 if source == "dedicated" else 2
    cfg = ray_config(
        tmp_path,
        **{
            "oldlogits.source": source,
            "trainer.steps": 3,
            "env.step_latency_ms": 5.0,
            "advantage.estimator": "discounted",
            "runtime.ray.engine_replicas": replicas,
            "runtime.ray.env_workers": 2 if source == "snapshot" else 1,
            **budget,
        },
    )
    run_dir, last = train(cfg)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert last["version"] == 3 and last["loss/grad_norm"] > 0
    for key in DOCUMENTED:  # the embedded runtime's metrics, all of them
        assert key in last, key
    assert all(r["version/staleness_max"] <= cfg.max_staleness for r in rows)
    # every replica served requests; nothing failed
    assert all(last[f"ray/engine{i}_requests"] > 0 for i in range(replicas))
    assert last["ray/engine_replica_failures"] == 0 and last["ray/env_worker_failures"] == 0
    assert summary(run_dir)["finished"] and checkpoints(run_dir)
    if source == "dedicated":
        assert last["dedicated/segments"] > 0
    if source == "snapshot":
        assert max(r["snapshot/peak_bytes"] for r in rows) <= 500_000
        # the store holds one version through each update (older versions' in-flight tokens are scored at
        # prepare), so a one-snapshot budget never makes it capture with rollouts paused
        assert sum(r["snapshot/budget_captures"] for r in rows) == 0


def test_exact_sources_agree_under_ray(cluster, tiny_path, tokenizer):
    """The exactness check on a recording made by two engine replicas (weights through the object store,
    pauses continued on another replica), the dedicated worker running in its own actor."""
    replicas = [EngineReplica.remote(EngineConfig(dtype="bfloat16"), str(tiny_path), 3 + i, 1) for i in range(2)]
    actor = OldLogitActor.remote(str(tiny_path), ModelConfig(), 1)  # starts while the replicas record
    # timeouts bound a hung actor, not speed: on a loaded machine (two suites at once) a batch can take minutes
    engine = RayEngine(replicas, timeout_s=600)
    recording = record(engine, tiny_path, tokenizer)
    assert min(engine.requests) > 0  # both replicas generated part of it
    assert_exact_sources_agree(
        recording, tiny_path, logprob_worker=lambda state, ctx: RayLogprobWorker(actor, state, ctx, 600)
    )
    for a in [*replicas, actor]:
        ray.kill(a)


def wait_for_step(run_dir, step, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(read_metrics(path)) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def wait_for_live_episode(env_worker, timeout=240):
    """Until the env worker holds an episode between its reset and its end (tool latency keeps each for turns)."""
    deadline = time.monotonic() + timeout
    while ray.get(env_worker.live_episodes.remote(), timeout=timeout) == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"no live episode on the env worker in {timeout}s")
        time.sleep(0.01)


def pid_when_back(actor, timeout=120):
    """The pid of an actor Ray is restarting, once it answers (a loaded machine restarts it slowly)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(actor.pid.remote(), timeout=timeout)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_killed_env_worker_and_engine_replica_are_survived(cluster, tmp_path, tiny_path):
    """Ray restarts both; the runtime notices and carries on: env-0 is killed after step 1 once it holds a live
    episode (async rollouts may be waiting on the trainer when the step lands), engine-0 after step 2."""
    cfg = ray_config(tmp_path, **{"oldlogits.source": "snapshot", "trainer.steps": 4, "env.step_latency_ms": 150.0})
    with RaySession(cfg, tmp_path / "run", tiny_path) as session:
        victims = {role: session.actor(role) for role in ("env-0", "engine-0")}
        pids = {role: ray.get(actor.pid.remote()) for role, actor in victims.items()}
        ref = session.trainer.run.remote()
        for step, role in enumerate(victims, start=1):
            wait_for_step(tmp_path / "run", step)
            if role.startswith("env"):
                wait_for_live_episode(victims[role])
            ray.kill(victims[role], no_restart=False)
        last = ray.get(ref, timeout=300)
        for role, actor in victims.items():
            assert pid_when_back(actor) != pids[role], role  # a new process
    assert last["step"] == 4 and summary(tmp_path / "run")["finished"]
    # the dead env worker's episodes failed (counted), the others finished
    assert last["rollout/env_errors"] >= 1 and last["ray/env_worker_failures"] >= 1
    # the dead replica's share was retried on its restarted self, with the current weights
    assert last["ray/engine_replica_failures"] >= 1 and last["ray/engine_retried_requests"] >= 1


def test_config_error_in_the_trainer_actor_stays_a_config_error(cluster, tmp_path):
    cfg = ray_config(tmp_path, **{"oldlogits.source": "snapshot", "oldlogits.snapshot_budget": "1KB", **ONE_EACH})
    with pytest.raises(ConfigError, match="oldlogits.snapshot_budget"):
        train(cfg)


def test_two_trainer_ranks_under_ray(cluster, tmp_path, tiny_path):
    """trainer.world_size=2: two trainer actors in a placement group form the process group (FSDP2, gloo)."""
    cfg = ray_config(
        tmp_path, **{"oldlogits.source": "snapshot", "trainer.world_size": 2, "trainer.steps": 2, **ONE_EACH}
    )
    with RaySession(cfg, tmp_path / "run", tiny_path) as session:
        assert session.actor("trainer-1") is not None
        last = session.run()
    assert last["step"] == 2 and summary(tmp_path / "run")["finished"]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def kill_after_checkpoint(cfg, run_dir, tiny_path, role, step):
    """Start a (resumed) session, kill `role` once step `step` is checkpointed, return the run's failure."""
    resume = (run_dir / "config.yaml").exists()
    with RaySession(cfg, run_dir, tiny_path, resume=resume) as session:
        ref = session.trainer.run.remote()
        wait_for_step(run_dir, step)
        deadline = time.monotonic() + 120
        while not any(p.name == f"step_{step:06d}" for p in checkpoints(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        ray.kill(session.actor(role), no_restart=True)
        with pytest.raises((ray.exceptions.RayActorError, RuntimeError)) as failure:
            ray.get(ref, timeout=300)
    assert not summary(run_dir)  # not finished
    return failure.value


def test_dead_oldlogit_or_trainer_actor_ends_the_run_and_it_resumes(cluster, tmp_path, tiny_path):
    """Neither restarts (their state is the run's): the run ends with the actor's error, and `--resume` goes on
    from the last checkpoint. The old-logit actor dies after step 1; the resumed run loses its trainer after
    step 2 (two steps before the end, so that the kill lands before the run ends); the second resume finishes,
    every step logged once."""
    cfg = ray_config(
        tmp_path,
        **{
            "oldlogits.source": "dedicated",
            "trainer.steps": 4,
            "env.step_latency_ms": 100.0,
            "run.checkpoint_every": 1,
            **ONE_EACH,
        },
    )
    run_dir = tmp_path / "run"
    failure = kill_after_checkpoint(cfg, run_dir, tiny_path, "oldlogit", 1)
    assert "old-logit worker failed" in str(failure)  # the trainer saw its worker die and said so
    kill_after_checkpoint(cfg, run_dir, tiny_path, "trainer", 2)
    _, last = train(cfg, run_dir, resume=True)
    assert last["step"] == 4
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
