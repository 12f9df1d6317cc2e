import pytest
import torch
from conftest import small_config

from twofold import metrics as M
from twofold.engine.builtin import BuiltinEngine
from twofold.metrics import declared
from twofold.pipeline import loop
from twofold.pipeline.checkpoint import checkpoints, verify
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.rundir import read_metrics

DOCUMENTED = [
    "step",
    "version",
    "reward/mean",
    "success/rate",
    "rollout/format_ok_rate",
    "rollout/multi_version_frac",
    "time/step",
    "time/generation",
    "time/old_logits",
    "time/training",
    "time/weight_sync",
    "time/idle",
    "throughput/samples_per_s",
    "memory/oldlogit_extra_bytes",
    "memory/oldlogit_peak_bytes",
    "discrepancy/mask_frac",
    "discrepancy/trunc_frac",
    "discrepancy/catastrophic_seqs",
    "discrepancy/nonfinite_tokens",
    "ppo/clip_frac_low",
    "ppo/clip_frac_high",
    "ppo/dual_clip_frac",
    "ppo/active_token_ratio",
    "kl/discrepancy_k1",
    "kl/discrepancy_k3",
    "kl/staleness_k1",
    "kl/staleness_k3",
    "kl/total_k1",
    "kl/total_k3",
    "is/ess",
    "version/staleness_mean",
    "version/staleness_max",
    "loss/value",
    "loss/grad_norm",
]


def run(tmp_path, tiny_path, **overrides):
    cfg = small_config(**overrides)
    pipe = Pipeline(cfg, tmp_path / "run", model_path=tiny_path)
    pipe.run()
    return read_metrics(tmp_path / "run" / "metrics.jsonl"), pipe


@pytest.mark.parametrize(
    "source", ["snapshot", "dedicated", "interrupt", "ewma", "recompute", "behavior", "linear", "loglinear"]
)
def test_short_async_run_for_each_source(tmp_path, tiny_path, source):
    # Discounted per-turn returns: non-zero advantages even when every episode fails, so weights move.
    rows, pipe = run(
        tmp_path,
        tiny_path,
        mode="async",
        **{"oldlogits.source": source, "env.step_latency_ms": 5.0, "advantage.estimator": "discounted"},
    )
    assert rows[-1]["loss/grad_norm"] > 0
    assert [r["step"] for r in rows] == [1, 2]
    for key in DOCUMENTED:
        assert key in rows[-1], key
    assert [k for k in rows[-1] if declared(k) is None] == []  # every logged name is in twofold.metrics
    assert rows[-1]["version"] == 2
    assert (tmp_path / "run" / "config.yaml").exists() and list((tmp_path / "run" / "tb").iterdir())
    assert checkpoints(tmp_path / "run") and verify(checkpoints(tmp_path / "run")[-1]) is None


@pytest.mark.parametrize(
    "source,dtype",
    [
        ("snapshot", "float32"),
        ("dedicated", "float32"),
        ("recompute", "float32"),
        ("ewma", "float32"),
        ("snapshot", "bfloat16"),
        ("ewma", "bfloat16"),
    ],
)
def test_sync_mode_old_equals_trainer_logprobs(tmp_path, tiny_path, source, dtype):
    # One minibatch, one epoch: the loss is taken at the very weights that scored the old log-probs, with
    # the same numerics (bfloat16 autocast included).
    rows, _ = run(
        tmp_path,
        tiny_path,
        mode="sync",
        **{"oldlogits.source": source, "trainer.num_minibatches": 1, "trainer.dtype": dtype},
    )
    for r in rows:
        assert r["ppo/staleness_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert abs(r["kl/staleness_k1"]) < 1e-6 and r["ppo/clip_frac_high"] == 0 and r["ppo/clip_frac_low"] == 0
        assert r["version/staleness_max"] == 0


def test_versions_stay_within_window(tmp_path, tiny_path):
    rows, _ = run(
        tmp_path,
        tiny_path,
        mode="async",
        max_staleness=1,
        **{
            "trainer.steps": 4,
            "oldlogits.source": "snapshot",
            "rollout.stale_policy": "drop",
            "env.step_latency_ms": 20.0,
        },
    )
    assert all(r["version/staleness_max"] <= 1 for r in rows)


def test_groups_started_only_for_the_step_in_training_are_never_stale(tmp_path, tiny_path):
    """`rollout.start_ahead=0` under max_staleness 2: a step's groups start only once the version that trains
    them is published, so every trained token is of the trainer's version (lag 0) and nothing is dropped as
    stale, though the window would allow a lag of 2."""
    rows, _ = run(
        tmp_path,
        tiny_path,
        mode="async",
        max_staleness=2,
        **{"rollout.start_ahead": 0, "trainer.steps": 3, "oldlogits.source": "snapshot", "env.step_latency_ms": 5.0},
    )
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["version/staleness_max"] == 0 and r["rollout/multi_version_frac"] == 0 for r in rows)
    assert rows[-1]["rollout/stale_dropped_groups"] == 0


def test_snapshots_on_disk_hold_no_memory_and_leave_nothing_behind(tmp_path, tiny_path):
    """`oldlogits.snapshot_device=disk`: each step holds a version (in files under the run directory), none of it
    counted as resident old-logit state, and the run removes its snapshot files, and their folder, when it ends."""
    rows, pipe = run(
        tmp_path,
        tiny_path,
        mode="async",
        **{"trainer.steps": 3, "oldlogits.source": "snapshot", "oldlogits.snapshot_device": "disk"},
    )
    version_bytes = rows[0]["snapshot/version_bytes"]
    assert version_bytes > 0 and all(r["snapshot/peak_bytes"] == version_bytes for r in rows)
    assert all(r["memory/oldlogit_extra_bytes"] == 0 for r in rows)
    assert pipe.source.store.directory.parent == tmp_path / "run" / "snapshots"
    assert not (tmp_path / "run" / "snapshots").exists()


def test_audit_logs_approximation_error(tmp_path, tiny_path):
    # The untrained model loses every episode alike, so group-relative advantages are all zero and the
    # weights would never move; per-turn discounted returns differ by turn and do move them.
    rows, _ = run(
        tmp_path,
        tiny_path,
        mode="async",
        **{
            "oldlogits.source": "recompute",
            "oldlogits.audit": True,
            "trainer.steps": 3,
            "env.step_latency_ms": 20.0,
            "advantage.estimator": "discounted",
        },
    )
    assert all("audit/abs_err_mean" in r for r in rows)
    assert [k for r in rows for k in r if declared(k) is None] == []
    assert rows[0]["audit/abs_err_max"] < 1e-5  # step 1: nothing is stale yet
    stale = [r for r in rows if r["version/staleness_max"] > 0]
    assert stale, "the run should have trained on stale tokens"
    # recompute uses the current weights, not those of each token's version: it must show an error
    # (a regression: it once overwrote the trajectories' exact values the audit reads).
    assert all(r["audit/abs_err_max"] > 1e-4 for r in stale)


def test_snapshot_budget_below_one_model_is_a_named_error(tmp_path, tiny_path):
    from twofold.config import ConfigError

    with pytest.raises(ConfigError, match="oldlogits.snapshot_budget.*cannot hold one snapshot"):
        Pipeline(small_config(**{"oldlogits.source": "snapshot", "oldlogits.snapshot_budget": "10KB"}), tmp_path / "r")


def test_memory_metrics_name_where_the_bytes_go(tmp_path, tiny_path):
    rows, pipe = run(tmp_path, tiny_path, mode="sync", **{"trainer.steps": 1, "oldlogits.source": "snapshot"})
    row = rows[-1]
    params = sum(p.numel() for p in pipe.trainer.model.parameters())
    tensors = len(list(pipe.trainer.model.parameters()))
    assert row["memory/trainer_parameter_bytes"] == 4 * params  # float32 master weights
    assert row["memory/trainer_gradient_bytes"] == 4 * params  # every parameter trains
    assert row["memory/optimizer_state_bytes"] == 2 * 4 * params + 4 * tensors  # AdamW moments + a step count each
    engine = sum(p.numel() * p.element_size() for p in pipe.engine.model.parameters())
    assert row["memory/engine_weight_bytes"] == engine and engine < 4 * params  # the bfloat16 engine's own copy
    assert row["memory/step_peak_rss_bytes"] >= row["memory/rss_bytes"] > 0
    named = sum(
        row[k]
        for k in (
            "memory/trainer_parameter_bytes",
            "memory/trainer_gradient_bytes",
            "memory/optimizer_state_bytes",
            "memory/engine_weight_bytes",
            "memory/engine_prefix_cache_bytes",
            "memory/oldlogit_extra_bytes",
            "memory/process_baseline_bytes",
        )
    )
    assert 0 < row["memory/process_baseline_bytes"] < row["memory/rss_bytes"]  # the interpreter and libraries
    # the peak minus the named parts, or 0 where the baseline held something the run has since freed (on a tiny
    # model the difference is a fraction of a MiB of allocator noise)
    assert row["memory/step_transient_bytes"] == max(row["memory/step_peak_rss_bytes"] - named, 0.0)
    plan = (tmp_path / "run" / loop.MEMORY_PLAN_FILE).read_text()  # the plan it started with, kept with the run
    assert plan.startswith("memory plan: ") and f"{row['memory/trainer_parameter_bytes']:,.0f}" in plan


def test_an_engine_that_sleeps_between_sync_steps_trains_the_same_run(tmp_path, tiny_path, monkeypatch):
    """engine.sleep=true: the engine sleeps once per step, after its batch is generated, and wakes with the next
    weights; every metric but time, throughput and memory equals the run whose engine stayed awake, and the
    step's transient memory is its peak less the parts held through the step (the engine's weights are not)."""
    slept = []
    real = BuiltinEngine.sleep
    monkeypatch.setattr(BuiltinEngine, "sleep", lambda engine: slept.append(engine.version) or real(engine))
    sync = {"trainer.steps": 2, "oldlogits.source": "snapshot"}
    awake, _ = run(tmp_path / "awake", tiny_path, mode="sync", **sync, **{"engine.sleep": False})
    assert slept == []
    asleep, pipe = run(tmp_path / "asleep", tiny_path, mode="sync", **sync, **{"engine.sleep": True})
    assert pipe.engine_sleeps and slept == [0, 1] and not pipe.engine.asleep
    varying = ("time/", "throughput/", "memory/")
    for a, b in zip(awake, asleep, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(varying)} == {
            k: v for k, v in b.items() if not k.startswith(varying)
        }
    row = asleep[-1]
    assert row["memory/engine_weight_bytes"] > 0
    held = sum(
        row[k]
        for k in (
            "memory/trainer_parameter_bytes",
            "memory/trainer_gradient_bytes",
            "memory/optimizer_state_bytes",
            "memory/oldlogit_extra_bytes",
            "memory/process_baseline_bytes",
        )
    )
    assert row["memory/step_transient_bytes"] == max(row["memory/step_peak_rss_bytes"] - held, 0.0)


@pytest.mark.parametrize(("trim", "calls"), [(True, 1 + 2 * 3), (False, 1)])
def test_free_heap_pages_go_back_at_each_step(tmp_path, tiny_path, monkeypatch, trim, calls):
    """Once when the pipeline starts (whatever resolving the model freed), then, with `run.trim_heap_each_step`,
    at each step's start, once its batch is collected (sync mode: generation ran in between) and before its first
    optimizer step: 2 sync steps of 4 optimizer steps each give 1 + 2 x 3 trims (one per optimizer step would give
    1 + 2 x 4)."""
    made = []
    real = loop.trim_heap
    monkeypatch.setattr(loop, "trim_heap", lambda *bound: made.append(bound) or real(*bound))
    rows, _ = run(
        tmp_path,
        tiny_path,
        mode="sync",
        **{
            "trainer.steps": 2,
            "trainer.num_minibatches": 4,
            "rollout.groups_per_step": 4,
            "run.trim_heap_each_step": trim,
        },
    )
    assert [r["trainer/optimizer_steps"] for r in rows] == [4.0, 4.0]
    assert len(made) == calls
    assert made[0] == () and all(bound == (loop.TRIM_MIN_FREE_BYTES,) for bound in made[1:])  # per step: bounded


def _trial(threads, timed, settle=1):
    """Warm-up, then one block per `timed` (tokens, wall): `settle` untimed steps of 5 s, then two timed steps of
    that (tokens, wall) each, so the block's rate is tokens / wall; returns the verdict and each block's split."""
    threads.observe(tokens=100.0, wall=9.0)
    ran, verdict = [], None
    for tokens, wall in timed:
        ran.append(threads.split)
        for _ in range(settle):
            assert threads.observe(tokens=100.0, wall=5.0) is None and threads.split == ran[-1]  # within its block
        assert threads.observe(tokens=tokens, wall=wall) is None and threads.split == ran[-1]
        verdict = threads.observe(tokens=tokens, wall=wall)
    return verdict, ran


def test_cpu_threads_keep_the_split_once_its_gain_is_bounded_above_five_percent():
    threads = loop.CpuThreads(5, settle_steps=1)
    assert (threads.rollout(), threads.trainer()) == (5, 5)  # a run starts sharing every thread
    # pairs of blocks, shared-split then split-shared: the shared timed steps 1.0 s, the split ones 0.8, 0.75, 0.85
    verdict, ran = _trial(threads, [(100, 1.0), (100, 0.8), (100, 0.75), (100, 1.0), (100, 1.0), (100, 0.85)])
    assert ran == [False, True, True, False, False, True]
    # d = log(1/0.8), log(1/0.75), log(1/0.85) = 0.2231, 0.2877, 0.1625: mean 0.2244, sd 0.0626, t(2) 2.920, so
    # the lower bound 0.2244 - 2.920 * 0.0626 / sqrt(3) = 0.1189 > log 1.05 = 0.0488: kept after the third pair
    assert threads.keep_split is True and (threads.rollout(), threads.trainer()) == (2, 3)
    assert "half of 5" in verdict and "1.25x" in verdict and "1.13-1.39x over 3 pairs of blocks" in verdict
    assert _trial(threads, [(100, 50.0), (100, 0.1)])[1] == [True, True]  # the verdict stands whatever follows
    assert threads.observe(tokens=100.0, wall=1.0) is None


def test_cpu_threads_stay_shared_once_the_split_is_bounded_below_five_percent():
    threads = loop.CpuThreads(2, settle_steps=1)
    verdict, _ = _trial(threads, [(100, 1.0), (100, 1.2), (100, 1.3), (100, 1.0), (100, 1.0), (100, 1.25)])
    # d = log(1/1.2), log(1/1.3), log(1/1.25): mean -0.2226, upper bound -0.2226 + 2.920 * 0.0400 / sqrt(3) = -0.1551
    assert threads.keep_split is False and (threads.rollout(), threads.trainer()) == (2, 2)
    assert "all of 2" in verdict and "0.748-0.856x" in verdict and "bounded below 1.05x" in verdict


def test_cpu_threads_weigh_tokens_a_second_not_seconds():
    threads = loop.CpuThreads(2, settle_steps=1)  # the split's steps are slower, with more tokens: 150 / 1.2 = 125/s
    _trial(threads, [(100, 1.0), (150, 1.2), (150, 1.2), (100, 1.0), (100, 1.0), (150, 1.2)])
    assert threads.keep_split is True  # d = log 1.25 three times: both bounds log 1.25


@pytest.mark.parametrize(
    "faster, slower, kept, mean, bounds",
    [
        # d = log(1/0.6), log(1/1.4), ... (+0.511, -0.336): after 8 pairs mean 0.0872 -/+ 1.895 * 0.4529 / sqrt(8),
        # -0.216 .. 0.391, across log 1.05 = 0.0488; the mean, 1.09x, is above it: the split
        (0.6, 1.4, True, "1.09x", "0.806-1.48x"),
        # d = log(1/0.7), log(1/1.6) (+0.357, -0.470): mean -0.0567, bounds -0.353 .. 0.240; 0.945x, below: all
        (0.7, 1.6, False, "0.945x", "0.703-1.27x"),
    ],
)
def test_cpu_threads_a_trial_the_bound_leaves_undecided_is_decided_by_its_mean(faster, slower, kept, mean, bounds):
    threads = loop.CpuThreads(2, settle_steps=1)
    timed = []  # the split's timed steps alternate `faster` and `slower` s against 1.0 s shared
    for pair in range(8):
        split = (100, faster if pair % 2 == 0 else slower)
        timed += [(100, 1.0), split] if pair % 2 == 0 else [split, (100, 1.0)]
    verdict, _ = _trial(threads, timed[:-1])
    assert verdict is None and threads.keep_split is None  # after 3-7 pairs the bounds straddle log 1.05
    verdict = [threads.observe(tokens=100.0, wall=wall) for wall in (5.0, 1.0, 1.0)][-1]
    assert threads.keep_split is kept and ("half of 2" if kept else "all of 2") in verdict
    assert f"half ran {mean}" in verdict and f"{bounds} over 8 pairs" in verdict and "the mean" in verdict


def test_cpu_threads_time_a_block_only_after_its_staleness_window_and_sum_its_timed_steps():
    """W = 2: a block is 4 steps, the first 2 (trained on rollouts of the block before) untimed; the last 2 are timed
    together, tokens over seconds (not the mean of their two rates)."""
    threads = loop.CpuThreads(2, settle_steps=2)
    threads.observe(tokens=100.0, wall=9.0)  # the warm-up
    ran = []
    for pair in range(3):
        for split in (False, True) if pair % 2 == 0 else (True, False):
            # settling steps far faster in the shared blocks: counted, they would decide the other way
            settle_wall, timed = (0.01, [(100, 1.0), (100, 3.0)]) if not split else (5.0, [(100, 0.5), (100, 0.5)])
            for tokens, wall in [(100, settle_wall)] * 2 + timed:
                ran.append(threads.split)
                verdict = threads.observe(tokens=tokens, wall=wall)
    # shared: 200 tokens / 4.0 s = 50 a second (the mean of its two rates, 66.7, would give 3x); split: 200 / 1.0 =
    # 200. d = log 4 in each pair, sd 0: both bounds 4x, above 1.05x, after 3 pairs = 24 trial steps
    assert ran == [False] * 4 + [True] * 8 + [False] * 8 + [True] * 4
    assert threads.keep_split is True and threads.steps == 25
    assert "half ran 4x" in verdict and "4-4x over 3 pairs of blocks" in verdict
    assert "2 steps timed in each after 2 let settle" in verdict


@pytest.mark.parametrize("settle, max_pairs", [(0, 8), (2, 8), (4, 5), (8, 3), (30, 3)])
def test_cpu_threads_a_wide_staleness_window_means_fewer_pairs_never_under_three(settle, max_pairs):
    # blocks of settle + 2 steps; pairs fit in 64 trial steps: 64 // 4 = 16 -> 8 (the cap), 64 // 8 = 8,
    # 64 // 12 = 5, 64 // 20 = 3, 64 // 64 = 1 -> 3 (the floor)
    assert loop.CpuThreads(2, settle_steps=settle).max_pairs == max_pairs


def test_cpu_threads_the_mean_decides_at_the_last_pair_a_wide_window_allows():
    threads = loop.CpuThreads(2, settle_steps=4)  # 5 pairs at most
    timed = [[(100, 1.0), (100, 0.6)], [(100, 1.4), (100, 1.0)]] * 2 + [[(100, 1.0), (100, 0.6)]]
    verdict, _ = _trial(threads, [block for pair in timed for block in pair], settle=4)
    # d = log(1/0.6), log(1/1.4), ... (+0.511, -0.336, +0.511, -0.336, +0.511): mean 0.1719, sd 0.4641, t(4) 2.132,
    # bounds 0.1719 -/+ 0.4425 = -0.271 .. 0.614, across log 1.05; the mean, 1.19x, is above it: the split
    assert threads.keep_split is True and threads.steps == 1 + 5 * 2 * 6
    assert "half ran 1.19x" in verdict and "0.763-1.85x over 5 pairs of blocks" in verdict
    assert "straddle 1.05x after 5 pairs" in verdict


def test_cpu_threads_of_one_thread_run_no_trial():
    one = loop.CpuThreads(1, settle_steps=1)
    verdict, ran = _trial(one, [(100, 1.0)] * 6)
    assert verdict is None and ran == [False] * 6 and one.keep_split is None
    assert (one.rollout(), one.trainer()) == (1, 1)


def test_cpu_threads_lend_the_trainers_half_to_the_rollout_while_the_trainer_waits():
    threads = loop.CpuThreads(4, settle_steps=1)
    threads.split = True
    assert (threads.rollout(), threads.trainer()) == (2, 2)
    threads.trainer_waiting = True  # the trainer computes nothing: generation may use all 4
    assert (threads.rollout(), threads.trainer()) == (4, 2)
    threads.split = False
    assert (threads.rollout(), threads.trainer()) == (4, 4)  # shared, waiting or not


def test_an_async_run_lends_the_rollout_every_thread_while_the_trainer_waits(tmp_path, tiny_path, monkeypatch):
    """With the split on from the first step, the engine's forwards run on both of 2 threads while the trainer waits
    for rollouts (the first step waits for every rollout of its batch); without the loan every one ran on 1."""
    made = []
    init = loop.CpuThreads.__init__

    def split_from_the_start(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.split = True
        made.append(self)

    monkeypatch.setattr(loop.CpuThreads, "__init__", split_from_the_start)
    monkeypatch.setattr(loop.CpuThreads, "observe", lambda self, tokens, wall: None)
    seen = []  # (the trainer waits, this forward's threads), per engine forward
    forward = BuiltinEngine._forward

    def spy(self, *args, **kwargs):
        seen.append((made[0].trainer_waiting, torch.get_num_threads()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BuiltinEngine, "_forward", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(tmp_path, tiny_path, mode="async")
    finally:
        torch.set_num_threads(before)
    assert (True, 2) in seen, seen
    assert {n for _, n in seen} <= {1, 2}


def test_an_async_run_gives_the_rollout_thread_its_share_and_restores_the_trainers(tmp_path, tiny_path, monkeypatch):
    """With the split on, the engine's forwards in the rollout thread run on the rollout's share of the threads;
    each step's row says whether it ran split; after the run the calling thread has its own count back."""
    monkeypatch.setattr(loop.CpuThreads, "observe", lambda self, tokens, wall: setattr(self, "split", not self.split))
    monkeypatch.setattr(loop.CpuThreads, "rollout", lambda self: 1)
    seen = []
    generate = BuiltinEngine.generate

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(BuiltinEngine, "generate", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows, _ = run(tmp_path, tiny_path, mode="async")
        assert seen and set(seen) == {1}
        # step 1 ran with all threads, its observation split them for step 2 (the trainer on 1 of 2)
        assert [r[M.CPU_THREADS_SPLIT] for r in rows] == [0.0, 1.0]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
