"""Reliability: kill -9 and resume, fault isolation (env raising / hanging, NaN loss, non-finite
behaviour log-probs), and a run that cannot make progress stopping with a clear message."""

import json
import math
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_config
from google.protobuf.message import DecodeError
from wandb.proto.wandb_internal_pb2 import Record

from twofold.cli import main
from twofold.config import ConfigError, dump_config
from twofold.envs.frozenlake import FrozenLake
from twofold.pipeline.checkpoint import checkpoints, verify
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.rundir import read_metrics, summary
from twofold.trainer.trainer import TrainingHalted

# wall-clock measurements, and the process's resident size, differ between any two runs
VOLATILE = (
    "time/",
    "throughput/",
    "memory/rss_bytes",
    "memory/step_peak_rss_bytes",
    "memory/step_transient_bytes",
    "memory/process_baseline_bytes",
    "engine/",  # a resumed engine starts with an empty prefix cache: it prefills what it would have reused
)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _train_args(cfg_path, run_dir):
    """`twofold train`'s arguments, resuming when the run directory was started before (as `twofold compare` does)."""
    if (run_dir / "config.yaml").exists():
        return ["train", "--resume", str(run_dir)]
    return ["train", "--config", str(cfg_path), f"run.dir={run_dir}"]


def _train(cfg_path, run_dir):
    """`twofold train` in a process of its own (one a test can kill)."""
    return subprocess.Popen(
        [sys.executable, "-m", "twofold.cli", *_train_args(cfg_path, run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_resume_finish(cfg_path, run_dir, kills, horizon, rng):
    for _ in range(kills):
        proc = _train(cfg_path, run_dir)
        time.sleep(rng.uniform(1.0, horizon))
        proc.kill()  # SIGKILL: no handler, no final checkpoint
        proc.wait()
    assert main(_train_args(cfg_path, run_dir)) == 0  # the last resume, which nothing kills, runs in this process


@pytest.mark.parametrize("mode,kills,ranks", [("sync", 3, 1), ("async", 2, 1), ("sync", 2, 2)])
def test_sigkill_at_random_points_then_resume(tmp_path, tiny_path, mode, kills, ranks):
    # with 2 ranks the SIGKILL hits the launcher; its ranks exit with it (their parent sentinel), as on a lost machine
    steps = 6
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        dump_config(
            small_config(
                **{"mode": mode, "trainer.steps": steps, "run.checkpoint_every": 1, "trainer.world_size": ranks}
            )
        )
    )
    t0 = time.monotonic()
    proc = _train(cfg_path, tmp_path / "whole")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    horizon = time.monotonic() - t0

    killed = tmp_path / "killed"
    _kill_resume_finish(cfg_path, killed, kills, horizon, random.Random(f"{mode}-{ranks}-kills"))

    lines = (killed / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line is whole JSON: nothing left torn
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # every step exactly once
    assert summary(killed)["finished"]
    for path in checkpoints(killed):  # every kept checkpoint is whole and is the step it is named after
        assert verify(path) is None
        assert json.loads((path / "run_state.json").read_text())["step"] == int(path.name.split("_")[1])
    if mode == "sync":  # deterministic on CPU: the killed-and-resumed run is the uninterrupted one, bit for bit
        assert _comparable(rows) == _comparable(read_metrics(tmp_path / "whole" / "metrics.jsonl"))


def _running(pid) -> bool:
    """The process exists and is not a zombie (an orphan's exit may stay unreaped in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pids: list[str]) -> list[str]:
    return subprocess.run(["pgrep", "-P", ",".join(pids)], capture_output=True, text=True).stdout.split()


def _descendants(pid) -> list[str]:
    found, generation = [], [str(pid)]
    while generation:
        generation = _children(generation)
        found += generation
    return found


def test_launcher_killed_while_its_ranks_start_leaves_no_rank_training(tmp_path, tiny_path):
    # The ranks are forks of a fork server, not children of the launcher, so the kernel's parent-death signal
    # cannot name the launcher. Killed the moment the first rank exists (a grandchild: launcher -> server ->
    # rank), the ranks must not be left to train the whole run unobserved, beside the run resumed into the
    # same directory.
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_config(small_config(**{"trainer.steps": 6, "trainer.world_size": 2})))
    run_dir = tmp_path / "run"
    proc = _train(cfg_path, run_dir)
    ranks = []
    while not ranks and proc.poll() is None:
        children = _children([str(proc.pid)])
        ranks = _children(children) if children else []
        time.sleep(0.01)
    everyone = _descendants(proc.pid)
    proc.kill()
    proc.wait()
    assert ranks, "the launcher ended before it started its ranks"
    deadline = time.monotonic() + 60
    while any(map(_running, everyone)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_running, everyone))
    # a forked rank starts in milliseconds, so it may have written its pid file, and on busy cores (the thread
    # that ends it waits for the CPU) opened the metrics file, while the launcher lived; it must not have
    # trained a step
    metrics = run_dir / "metrics.jsonl"
    assert not (metrics.exists() and metrics.read_text().strip()) and not checkpoints(run_dir)


def test_a_run_being_written_refuses_a_second_writer_until_its_process_dies(tmp_path, tiny_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_config(small_config(**{"trainer.steps": 50})))
    run_dir = tmp_path / "run"
    proc = _train(cfg_path, run_dir)
    try:
        while not (run_dir / "metrics.jsonl").exists() and proc.poll() is None:
            time.sleep(0.1)
        with pytest.raises(ConfigError, match=rf"run.dir.*another twofold process \(pid {proc.pid}\)"):
            Pipeline(small_config(**{"trainer.steps": 51}), run_dir, resume=True, model_path=tiny_path)
    finally:
        proc.kill()  # SIGKILL: the kernel drops the lock with the process
        proc.wait()
    assert "steps: 50" in (run_dir / "config.yaml").read_text()  # the refused writer wrote nothing
    resumed = Pipeline(small_config(**{"trainer.steps": 1}), run_dir, resume=True, model_path=tiny_path)
    assert (run_dir / "run.lock").read_text() == str(os.getpid())
    # A second Pipeline in this same process (a notebook retrying while the first is still open) is told so.
    with pytest.raises(ConfigError, match=r"held by this process: an earlier Pipeline on it was not closed"):
        Pipeline(small_config(**{"trainer.steps": 1}), run_dir, resume=True, model_path=tiny_path)
    resumed.close()
    Pipeline(small_config(**{"trainer.steps": 1}), run_dir, resume=True, model_path=tiny_path).close()


def test_a_killed_grid_takes_its_cells_a_stopped_one_checkpoints_them_and_both_resume(tmp_path, tiny_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_config(small_config()))
    out, steps = tmp_path / "grid", 40  # ~0.25 s each
    argv = ["compare", "--config", str(cfg_path), "--sources", "behavior", "--seeds", "1", "--steps", str(steps)]
    argv += ["--out", str(out), "run.progress=false"]
    cell = out / "behavior-seed0"

    def grid_with_a_step_done():
        """The grid in a subprocess, once its cell has trained a step in this run; with the cell's pid."""
        before = len(read_metrics(cell / "metrics.jsonl"))
        proc = subprocess.Popen([sys.executable, "-m", "twofold.cli", *argv], stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and len(read_metrics(cell / "metrics.jsonl")) <= before:
            time.sleep(0.05)
        assert proc.poll() is None, "the grid ended before its cell trained a step"
        return proc, int((cell / "run.lock").read_text())

    proc, pid = grid_with_a_step_done()
    proc.kill()  # SIGKILL: no handler; the cell must die with the grid, not train on unobserved
    proc.wait()
    deadline = time.monotonic() + 2  # the kernel kills it at once; on its own it would train ~10 s more
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid)

    proc, pid = grid_with_a_step_done()
    proc.terminate()  # SIGTERM: passed on to the cell, which checkpoints and stops
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "grid stopped: 1 run(s) not finished (behavior-seed0)" in err
    assert summary(cell)["stopped_by_signal"] == 15 and not summary(cell)["finished"]
    assert not _running(pid)

    assert main(argv) == 0  # the same command finishes the grid
    assert [r["step"] for r in read_metrics(cell / "metrics.jsonl")] == list(range(1, steps + 1))


class RaisingLake(FrozenLake):
    """Every third episode's env raises on its first step."""

    created = 0

    def __init__(self, **kw):
        super().__init__(**kw)
        RaisingLake.created += 1
        self.broken = RaisingLake.created % 3 == 0

    def step(self, action_text):
        if self.broken:
            raise RuntimeError("tool backend unavailable")
        return super().step(action_text)


class HangingLake(RaisingLake):
    """Every third episode's env hangs (far beyond env.step_timeout_s) on its first step."""

    def step(self, action_text):
        if self.broken:
            time.sleep(3.0)
        return FrozenLake.step(self, action_text)


@pytest.fixture(autouse=True)
def _envs_counted_from_zero(monkeypatch):
    """Each test counts its envs from 0: the first one made is the one the tiny tokenizer's corpus steps (in the
    main thread, with no step timeout), and it is never a broken one, whatever other tests made before."""
    monkeypatch.setattr(RaisingLake, "created", 0)


class AlwaysRaisingLake(FrozenLake):
    def step(self, action_text):
        raise RuntimeError("down")


def _run(tmp_path, **overrides):
    p = Pipeline(small_config(**overrides), tmp_path / "run")
    p.run()
    return p, read_metrics(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_env_that_raises_fails_only_its_episode(tmp_path, tiny_path, mode):
    p, rows = _run(tmp_path, **{"env.name": f"{__name__}:RaisingLake", "mode": mode})
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["rollout/env_errors"] >= 1
    assert all(r["rollout/trajectories"] >= 2 for r in rows)  # the healthy episodes of each group still train


def test_env_that_hangs_times_out_and_the_run_goes_on(tmp_path, tiny_path):
    p, rows = _run(tmp_path, **{"env.name": f"{__name__}:HangingLake", "env.step_timeout_s": 0.3})
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["rollout/env_timeouts"] >= 1
    assert rows[-1]["rollout/env_errors"] == 0


def test_env_failing_every_episode_stops_with_a_clear_message(tmp_path, tiny_path):
    with pytest.raises(RuntimeError, match="every episode of the last"):
        _run(tmp_path, **{"env.name": f"{__name__}:AlwaysRaisingLake"})


def test_nan_loss_skips_the_optimizer_step_and_the_ewma_update(tmp_path, tiny_path, monkeypatch):
    import twofold.trainer.trainer as trainer_module

    real, calls = trainer_module.decoupled_ppo_loss, []

    def poisoned(*args, **kw):
        loss, metrics = real(*args, **kw)
        calls.append(1)
        return (loss * math.nan if len(calls) <= 2 else loss), metrics  # both minibatches of step 1

    monkeypatch.setattr(trainer_module, "decoupled_ppo_loss", poisoned)
    p, rows = _run(tmp_path, **{"oldlogits.source": "ewma", "trainer.max_consecutive_skips": 3})
    assert rows[0]["trainer/skipped_steps"] == 2 and rows[1]["trainer/skipped_steps"] == 2
    assert rows[0]["trainer/optimizer_steps"] == 0 and rows[1]["trainer/optimizer_steps"] == 2
    assert p.source.ewma.num_updates == 1 + 2  # the initial copy plus one per optimizer step actually taken
    assert all(torch.isfinite(q).all() for q in p.trainer.model.parameters())


def test_consecutive_nan_losses_halt_with_a_checkpoint(tmp_path, tiny_path, monkeypatch):
    import twofold.trainer.trainer as trainer_module

    real = trainer_module.decoupled_ppo_loss
    monkeypatch.setattr(
        trainer_module, "decoupled_ppo_loss", lambda *a, **k: (lambda lm: (lm[0] * math.nan, lm[1]))(real(*a, **k))
    )
    with pytest.raises(TrainingHalted, match="trainer.max_consecutive_skips=3"):
        _run(tmp_path, **{"trainer.max_consecutive_skips": 3, "trainer.steps": 4})
    # Step 1 (two skips) finished and was checkpointed when step 2's third skip halted the run.
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert sorted(q.name for q in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000001"]


def test_nonfinite_behavior_logprobs_drop_the_trajectory(tmp_path, tiny_path):
    p = Pipeline(small_config(), tmp_path / "run")
    real, hits = p.engine.generate, []

    def corrupt(requests, joiners=None, on_result=None):  # each result as the engine hands it to the rollout
        def corrupted(res):
            if res.finish_reason != "paused" and res.output_logprobs and len(hits) < 2:
                res.output_logprobs[-1] = math.nan
                hits.append(res.request_id)
            on_result(res)

        return real(requests, joiners, corrupted)

    p.engine.generate = corrupt
    p.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["rollout/nonfinite_dropped"] == 2
    # The dropped trajectories never reach the loss: every trained behaviour log-prob is finite.
    assert all(r["discrepancy/nonfinite_tokens"] == 0 for r in rows)


def test_resumed_dedicated_worker_starts_at_the_checkpoint_version(tmp_path, tiny_path):
    # The dedicated worker's model copy must hold the resumed weights and version, or the first segment
    # of the resumed version would be scored with the initial weights.
    Pipeline(
        small_config(mode="async", **{"oldlogits.source": "dedicated", "trainer.steps": 2}),
        tmp_path / "run",
        model_path=tiny_path,
    ).run()
    pipe = Pipeline(
        small_config(mode="async", **{"oldlogits.source": "dedicated", "trainer.steps": 4}),
        tmp_path / "run",
        resume=True,
        model_path=tiny_path,
    )
    assert pipe.trainer.version == 2 and pipe.source.version == 2
    for (name, p), q in zip(pipe.trainer.model.named_parameters(), pipe.source.worker.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    pipe.run()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_wandb_offline_logs_the_rows_the_config_and_the_summary_and_resume_continues_the_run(
    tmp_path, tiny_path, monkeypatch
):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    settings = {"run.wandb": {"project": "twofold-test", "mode": "offline"}, "run.tensorboard": False}
    Pipeline(small_config(**{**settings, "trainer.steps": 2}), run, model_path=tiny_path).run()
    run_id = (run / "wandb_id").read_text()
    Pipeline(small_config(**{**settings, "trainer.steps": 3}), run, resume=True, model_path=tiny_path).run()
    assert (run / "wandb_id").read_text() == run_id  # the same W&B run, continued
    logged = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logged) == 2  # one offline log per process, both of the one run id
    first, resumed = (finished_wandb_records(path) for path in logged)
    for records in (first, resumed):
        (header,) = [r.run for r in records if r.HasField("run")]
        assert header.project == "twofold-test" and header.run_id == run_id
        assert "oldlogits" in {u.key for u in header.config.update}
    # the rows each process logged: steps 1-2, then the resumed run's step 3, with the run's metrics
    for records, steps in ((first, [1, 2]), (resumed, [3])):
        history = [r.history for r in records if r.HasField("history")]
        assert [h.step.num for h in history] == steps
        assert all({"success/rate", "kl/staleness_k3"} <= {item_key(i) for i in h.item} for h in history)
    summary_keys = {item_key(i) for r in resumed if r.HasField("summary") for i in r.summary.update}
    assert {"finished", "stopped_by_signal"} <= summary_keys


def item_key(item) -> str:
    """A W&B history or summary item's key: `key`, or the path of a key with slashes (`nested_key`)."""
    return item.key or "/".join(item.nested_key)


def finished_wandb_records(path: Path, wait_s: float = 120.0) -> list:
    """The records of an offline run log once W&B's service process has written its last (the `exit` record):
    `wandb.finish()` can return before that process has written the log out."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = wandb_records(path)
        except (DecodeError, AssertionError):  # the file or a record still being written: read again
            records = []
        if any(r.HasField("exit") for r in records):
            return records
        if time.monotonic() > deadline:
            return wandb_records(path)  # as it is, or the reader's own error
        time.sleep(0.2)


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run log (what `wandb sync` uploads), which wandb's Python package has no
    reader for: a LevelDB-style log (a 7-byte file header, 32 KiB blocks of records framed as crc32 / length /
    type, one record split across blocks as FIRST, MIDDLE..., LAST) of `wandb_internal_pb2.Record` protobufs."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, parts, records = 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zeros: the end of what was written
            break
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records
