"""The sharded trainer on 2 local CPU ranks (gloo): the same step as one rank, half the old-logit state per
rank, exact old logits, distributed checkpoints that reshard, and losing a rank."""

import gc
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file
from test_async_exactness import BruteForce, watch
from test_scale import seven_trajectory_batch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from twofold.cli import main
from twofold.config import dump_config
from twofold.distributed import close_ranks, init_ranks, spawn_ranks, threads_per_rank
from twofold.models import gathered_state, iter_full_weights, load_model, versioned_state
from twofold.oldlogits import BehaviorSource, SourceContext
from twofold.pipeline.checkpoint import checkpoints, verify
from twofold.pipeline.export import export_run
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.rundir import read_metrics, summary
from twofold.pipeline.train import rank_tracebacks
from twofold.trainer.trainer import Trainer

TWO = {"trainer.world_size": 2, "run.tensorboard": False}


def spawn(fn, *args):
    spawn_ranks(fn, 2, *args)


def _write_threads(rank, world, address, port, out_dir):
    (out_dir / f"threads{rank}").write_text(str(torch.get_num_threads()))


def test_each_rank_takes_its_share_of_the_cores(tmp_path):
    """A new process would start with a thread per core (or OMP_NUM_THREADS); N ranks on N cores would then run
    N^2. Each rank runs the launcher's thread count, which `threads_per_rank` sets to its share."""
    before = torch.get_num_threads()
    with threads_per_rank(2):
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
    assert torch.get_num_threads() == before
    # a count no process starts with (neither a thread per core nor the suite's OMP_NUM_THREADS), so that only
    # the launcher's can explain it
    launcher = (os.cpu_count() or 1) + int(os.environ.get("OMP_NUM_THREADS", "1")) + 1
    torch.set_num_threads(launcher)
    try:
        spawn(_write_threads, tmp_path)
    finally:
        torch.set_num_threads(before)
    assert [int((tmp_path / f"threads{r}").read_text()) for r in range(2)] == [launcher, launcher]


# --------------------------------------------------------------------------- one step, one rank or two


def step_config():
    return small_config(
        **{
            "trainer.num_minibatches": 2,
            "trainer.lr": 1e-2,
            "trainer.max_tokens_per_microbatch": 200,
            "loss.aggregation": "seq-mean-token-mean",
            "trainer.gradient_checkpointing": True,  # the default (small_config's is off): recomputed under FSDP2
        }
    )


def take_step(model, cfg, ranks, tokenizer_path):
    batch = seven_trajectory_batch(load_model(tokenizer_path), None)  # built from the unsharded model
    trainer = Trainer(model, cfg, ranks=ranks)
    metrics = trainer.train_step(batch, BehaviorSource(SourceContext(0, True, 2, ranks=ranks)))
    return metrics, gathered_state(trainer.model, keep=ranks.is_main, trained_only=False)


def _two_rank_step(rank, world, address, port, tiny_path, out):
    ranks = init_ranks(rank, world, address, port, torch.device("cpu"))
    torch.set_num_threads(1)
    model = load_model(tiny_path)
    metrics, params = take_step(model, step_config(), ranks, tiny_path)
    sharded = weakref.ref(model)
    del model
    gc.collect()
    if ranks.is_main:
        torch.save({"metrics": metrics, "params": params, "freed": sharded() is None}, out)
    close_ranks(ranks)


def test_two_ranks_take_the_step_one_rank_takes(tmp_path, tiny_path):
    """Rows split over 2 ranks (and into micro-batches of 200 tokens), gradients summed by FSDP2: the same loss,
    grad norm (to 1e-5) and parameters after both optimizer steps (to 5e-5) as one process."""
    from twofold.distributed import Ranks

    one, params = take_step(load_model(tiny_path), step_config(), Ranks(), tiny_path)
    spawn(_two_rank_step, tiny_path, tmp_path / "two.pt")
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert two["metrics"]["loss/value"] == pytest.approx(one["loss/value"], abs=1e-5)
    assert two["metrics"]["loss/grad_norm"] == pytest.approx(one["loss/grad_norm"], abs=1e-5)
    assert two["metrics"]["trainer/optimizer_steps"] == one["trainer/optimizer_steps"] == 2
    assert set(two["params"]) == set(params)
    # Parameters to 5e-5, not 1e-5: Adam divides by sqrt(v), so an element whose gradient is near zero moves by
    # up to lr x its rounding error, and the two-rank sum rounds in another order (seen: 1.1e-5 under load).
    # 5e-5 is 0.25% of the most two steps at lr 1e-2 can move an element.
    for name, p in params.items():
        assert (two["params"][name] - p).abs().max() < 5e-5, name
    assert two["freed"]  # a sharded policy dies with its last reference (its FSDP root is not kept elsewhere)
    moved = max(
        (p - q).abs().max()
        for p, q in zip(params.values(), versioned_state(load_model(tiny_path)).values(), strict=True)
    )
    assert moved > 1e-3  # the step really moved the weights


# --------------------------------------------------------------------------- a publication that fails


def _failed_sends(rank, world, address, port, tiny_path, out):
    """Rank 0's publication fails four ways while every rank gathers the weights (the pipeline's
    `_hand_weights_to_engine`): the engine before taking any weight, after 3, and after taking all of them
    (vLLM's `finish_weight_update`), and the stream's own copy of its first gathered weight (to a device that
    does not exist). After each, both ranks meet in an all-reduce: no rank is left inside a gather."""
    ranks = init_ranks(rank, world, address, port, torch.device("cpu"))
    torch.set_num_threads(1)
    trainer = Trainer.from_pretrained(tiny_path, small_config(), ranks=ranks)
    met = []
    for fail_after in (0, 3, None, "copy"):
        stream = iter_full_weights(trainer.model, keep=ranks.is_main)
        if ranks.is_main and fail_after == "copy":
            stream.device = "no-such-device"
            try:
                next(iter(stream))
            except RuntimeError:
                stream.finish()
        elif ranks.is_main:
            try:
                for taken, _ in enumerate(stream if fail_after != 0 else (), start=1):
                    if taken == fail_after:
                        raise RuntimeError("send failed")
                raise RuntimeError("finish failed")
            except RuntimeError:
                stream.finish()
        else:
            stream.finish()
        met.append(ranks.all_reduce(1.0))
    if ranks.is_main:
        out.write_text(json.dumps(met))
    close_ranks(ranks)


def test_a_send_that_fails_partway_leaves_no_rank_inside_a_gather(tmp_path, tiny_path):
    out = tmp_path / "met.json"
    ctx = spawn_ranks(_failed_sends, 2, tiny_path, out, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank is still waiting in a gather")
    assert json.loads(out.read_text()) == [2.0, 2.0, 2.0, 2.0]


# --------------------------------------------------------------------------- old-logit state per rank


@pytest.mark.parametrize(
    "source,key", [("snapshot", "snapshot/version_bytes"), ("ewma", "memory/oldlogit_extra_bytes")]
)
def test_old_logit_state_per_rank_is_half(tmp_path, tiny_path, source, key):
    from twofold.pipeline.train import train

    sizes = {}
    for n in (1, 2):
        cfg = small_config(
            mode="async",
            **{
                "oldlogits.source": source,
                "trainer.world_size": n,
                "run.tensorboard": False,
                "model.path": str(tiny_path),
            },
        )
        run_dir, _ = train(cfg, tmp_path / f"n{n}")
        sizes[n] = read_metrics(run_dir / "metrics.jsonl")[-1][key]
    # ewma: the average alone, sharded or not (a sharded rank scores with it swapped into its own shards,
    # keeping no proxy model); each parameter is split on its first dimension, odd sizes leave one rank a row more
    assert 0.45 < sizes[2] / sizes[1] < 0.55, sizes


# --------------------------------------------------------------------------- exactness with two ranks


LORA = {
    "model.lora.r": 4,
    "model.lora.alpha": 8.0,
    "model.lora.target_modules": ["q_proj", "v_proj"],
    "trainer.lr": 1e-2,
}


def _two_rank_exactness(rank, world, address, port, tiny_path, run_dir, source, out):
    ranks = init_ranks(rank, world, address, port, torch.device("cpu"))
    torch.set_num_threads(1)
    source, _, lora = source.partition("-")
    cfg = small_config(
        mode="async",
        max_staleness=2,
        **{
            **(LORA if lora else {}),
            "oldlogits.source": source,
            "trainer.steps": 3,
            "env.step_latency_ms": 30.0,
            "env.step_latency_sigma": 1.0,
            "env.max_turns": 4,
            "rollout.groups_per_step": 3,
            "engine.dtype": "float32",
            **TWO,
            "advantage.estimator": "discounted",
            "run.checkpoint_every": 0,
        },
    )
    pipe = Pipeline(cfg, run_dir, model_path=tiny_path, ranks=ranks)
    if ranks.is_main:  # rank 0 checks its own micro-batches against every version's whole weights
        brute = BruteForce(pipe, tiny_path, initial=versioned_state(load_model(tiny_path)), from_engine=True)
        seen = watch(pipe, brute)
    pipe.run()
    if ranks.is_main:
        first, last = brute.states[min(brute.states)], brute.states[max(brute.states)]
        moved = max(float((first[k] - last[k]).abs().max()) for k in first)
        out.write_text(json.dumps({"max_err": brute.max_err, "tokens": brute.checked_tokens, "moved": moved, **seen}))
    close_ranks(ranks)


@pytest.mark.parametrize("source", ["snapshot", "snapshot-lora", "dedicated", "interrupt"])
def test_exact_sources_with_two_ranks_match_brute_force(tmp_path, tiny_path, source):
    """Rank 0's old log-probs against every version's whole weights, token by token (the engine's, gathered and
    under LoRA merged, in float32). snapshot-lora: each held version is adapters swapped into the ranks' own
    shards over the one frozen base."""
    out = tmp_path / "exact.json"
    spawn(_two_rank_exactness, tiny_path, tmp_path / "run", source, out)
    result = json.loads(out.read_text())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert result["tokens"] > 0 and result["max_err"] < 2e-6, result
    assert result["moved"] > 1e-3, result  # the versions told apart differ (under LoRA: the merged adapters)
    assert max(r["version/staleness_max"] for r in rows) >= 1  # tokens of older versions were trained


# --------------------------------------------------------------------------- distributed checkpoints


def cli(*args):
    """`twofold train` in a process of its own: (exit status, stderr)."""
    command = [sys.executable, "-m", "twofold.cli", "train", *args]
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc.returncode, proc.stderr


def test_resume_on_a_different_number_of_ranks(tmp_path, tiny_path, caplog):
    # 2 -> 2 is test_reliability's two-rank SIGKILL test, which resumes each kill on the same two ranks. The first
    # two legs run `main` in this process (its ranks fork from a warm server): the command a user types, without a
    # fresh interpreter's imports. The last runs in a process of its own, whose rank 0 logs to the stderr read
    # here (a fork server started by an earlier test writes wherever that test's stderr went).
    caplog.set_level(logging.INFO)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        dump_config(
            small_config(
                mode="async", **{"oldlogits.source": "ewma", **TWO, "model.path": str(tiny_path), "trainer.steps": 2}
            )
        )
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), f"run.dir={run}"]) == 0
    assert main(["train", "--resume", str(run), "trainer.world_size=1", "trainer.steps=3"]) == 0  # 2 -> 1
    assert f"resumed from {run}/checkpoints/step_000002 at step 2" in caplog.text
    code, err = cli("--resume", str(run), "trainer.world_size=2", "trainer.steps=4")  # 1 -> 2
    assert code == 0, err[-2000:]
    assert f"resumed from {run}/checkpoints/step_000003 at step 3" in err
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["version"] for r in rows] == [1, 2, 3, 4]
    assert all(verify(p) is None for p in checkpoints(run))
    # The newest checkpoint, written by two ranks, exports whole: the exported weights are those DCP's own
    # converter reads from the shards.
    latest = checkpoints(run)[-1]
    assert len(list(latest.glob("*.distcp"))) == 2
    exported = load_file(export_run(run, tmp_path / "export") / "model.safetensors")
    dcp_to_torch_save(latest, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)["model"]
    assert set(exported) <= set(whole) and set(whole) - set(exported) <= {"lm_head.weight"}  # tied to the embedding
    assert all(torch.equal(tensor, whole[name]) for name, tensor in exported.items())


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_path):
    cfg = small_config(**{"trainer.steps": 3, "run.keep_checkpoints": 2, "run.tensorboard": False})
    Pipeline(cfg, tmp_path / "run", model_path=tiny_path).run()
    latest = checkpoints(tmp_path / "run")[-1]
    shard = next(p for p in latest.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a write cut short
    assert "distcp" in verify(latest)
    resumed = Pipeline(
        small_config(**{"trainer.steps": 4, "run.tensorboard": False}),
        tmp_path / "run",
        resume=True,
        model_path=tiny_path,
    )
    assert resumed.step == 2  # step 3's checkpoint was damaged: step 2's was loaded
    resumed.run()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['TWOFOLD_PWNED']}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, tiny_path, monkeypatch):
    cfg = small_config(**{"trainer.steps": 1, "run.tensorboard": False})
    Pipeline(cfg, tmp_path / "run", model_path=tiny_path).run()
    good = checkpoints(tmp_path / "run")[-1]
    evil = good.with_name("step_000009")
    evil.mkdir()
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("TWOFOLD_PWNED", str(pwned))
    (evil / ".metadata").write_bytes(pickle.dumps(_Boom()))
    for name in ("run_state.json", "manifest.json"):
        (evil / name).write_bytes((good / name).read_bytes())
    manifest = {
        ".metadata": [
            (evil / ".metadata").stat().st_size,
            __import__("hashlib").sha256((evil / ".metadata").read_bytes()).hexdigest(),
        ]
    }
    (evil / "manifest.json").write_text(json.dumps(manifest))
    assert "refused" in verify(evil)
    resumed = Pipeline(
        small_config(**{"trainer.steps": 2, "run.tensorboard": False}),
        tmp_path / "run",
        resume=True,
        model_path=tiny_path,
    )
    assert resumed.step == 1 and not pwned.exists()
    resumed.close()


def _ranks_of(run):
    return {k: int((run / f"rank{k}.pid").read_text()) for k in (0, 1)}


def wait_for_steps(run, n, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(read_metrics(run / "metrics.jsonl")) >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"{run} did not reach step {n}")


def test_losing_a_rank_ends_the_run_with_a_clear_message_and_it_resumes(tmp_path, tiny_path, capsys):
    # `main` runs the launcher on this (the main) thread, as the command would; a thread kills rank 1 mid-run
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        dump_config(
            small_config(
                mode="async", **{**TWO, "model.path": str(tiny_path), "trainer.steps": 6, "env.step_latency_ms": 20.0}
            )
        )
    )
    run = tmp_path / "run"

    def kill_rank_1():
        wait_for_steps(run, 2)
        os.kill(_ranks_of(run)[1], signal.SIGKILL)

    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(kill_rank_1)
        code = main(["train", "--config", str(cfg), f"run.dir={run}"])
        killed.result()  # the kill happened (else its error), before the run could finish on its own
    err = capsys.readouterr().err
    assert code == 1
    assert "trainer rank 1" in err and "died (killed by SIGKILL)" in err and f"--resume {run}" in err
    assert checkpoints(run) and not summary(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_every_failed_rank_s_traceback_is_reported_not_only_the_first_seen(tmp_path):
    # torch.multiprocessing writes a pickled traceback file only for a rank that raised; rank 1 here exited
    # without raising (no file). A peer's "Connection closed" must not hide the rank that caused it.
    files = [tmp_path / f"rank{r}.pickle" for r in range(3)]
    files[0].write_bytes(pickle.dumps("Traceback ...\nValueError: the cause"))
    files[2].write_bytes(pickle.dumps("Traceback ...\nRuntimeError: Connection closed by peer"))
    assert rank_tracebacks([str(f) for f in files]) == {
        0: "Traceback ...\nValueError: the cause",
        2: "Traceback ...\nRuntimeError: Connection closed by peer",
    }
