"""The vLLM backend (`engine.backend=vllm`) against the trainer's float32 log-probs.

Runs where vLLM is installed: on this CPU machine `make test` installs vLLM's CPU build. The tiny model
here has the default shape (head size 32), which vLLM's CPU attention supports; the smaller shape of
the other tests (head size 16) it does not.
"""

import gc
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from conftest import small_config  # noqa: E402
from test_engine import _deltas as deltas  # noqa: E402
from test_engine import _requests as requests  # noqa: E402

from twofold.config import ConfigError, EngineConfig, ModelConfig  # noqa: E402
from twofold.engine.vllm import PublishedWeights, VLLMEngine  # noqa: E402
from twofold.envs import tokenizer_corpus  # noqa: E402
from twofold.logprobs import Numerics, score_sequences  # noqa: E402
from twofold.models import (  # noqa: E402
    ensure_tiny_model,
    full_weights,
    iter_full_weights,
    load_model,
    load_parameters,
    load_tokenizer,
    versioned_state,
)
from twofold.pipeline.export import export_run  # noqa: E402
from twofold.pipeline.loop import Pipeline  # noqa: E402
from twofold.pipeline.rundir import read_metrics  # noqa: E402

MEMORY = 0.1  # of CPU memory for weights + KV cache: the tiny model needs little


@pytest.fixture(scope="module")
def vllm_path(_cache):
    return ensure_tiny_model(ModelConfig(), tokenizer_corpus())


@pytest.fixture(scope="module")
def vllm_tokenizer(vllm_path):
    return load_tokenizer(vllm_path)


@dataclass
class AsyncRun:
    bfloat16_deltas: torch.Tensor  # |vLLM bfloat16 - trainer float32| per generated token, at version 0
    rows: list[dict]
    trained: torch.nn.Module  # the trainer's model after the last step
    export: Path


@pytest.fixture(scope="module")
def async_run(tmp_path_factory, vllm_path, vllm_tokenizer) -> AsyncRun:
    """A 3-step async run on a bfloat16 vLLM engine (the pipeline's default dtype), exported.

    One engine start serves two checks (each takes ~20 s on this machine): before the first step, the run's
    engine samples at version 0 with the weights of `vllm_path`, which the trainer scores in float32.
    `snapshot` gives exact old log-probs, so r_d isolates the engine's numerics."""
    shape = {
        f"model.{k}": getattr(ModelConfig(), k)
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
    }
    cfg = small_config(
        mode="async",
        **shape,
        **{
            "engine.backend": "vllm",
            "engine.gpu_memory_utilization": MEMORY,
            "oldlogits.source": "snapshot",
            "trainer.steps": 3,
            "advantage.estimator": "discounted",
        },
    )
    tmp = tmp_path_factory.mktemp("vllm-run")
    pipe = Pipeline(cfg, tmp / "run", model_path=vllm_path)
    assert isinstance(pipe.engine, VLLMEngine) and pipe.engine.llm.llm_engine.model_config.dtype == torch.bfloat16
    try:
        reqs = requests(vllm_tokenizer, 4)
        bfloat16_deltas = deltas(load_model(vllm_path), reqs, pipe.engine.generate(reqs), 1.0)
    except BaseException:
        pipe.close()  # the engine, before the next one starts
        raise
    pipe.run()
    trained = pipe.trainer.model
    del pipe
    gc.collect()
    rows = read_metrics(tmp / "run" / "metrics.jsonl")
    return AsyncRun(bfloat16_deltas, rows, trained, export_run(tmp / "run", tmp / "export"))


@pytest.fixture(scope="module")
def served_path(async_run) -> Path:
    """The folder the float32 engine serves: the run's export (so starting it is also the export's check)."""
    return async_run.export


@pytest.fixture(scope="module")
def engine(served_path):
    # One float32 engine for the module (an engine takes ~20 s to start), started after the run's engine
    # closed: one engine at a time, since closing a vLLM engine tears down process-wide state another would use.
    eng = VLLMEngine(served_path, EngineConfig(backend="vllm", dtype="float32", gpu_memory_utilization=MEMORY), seed=0)
    yield eng
    eng.close()
    gc.collect()


def perturbed(path, seed=0):
    model = load_model(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_vllm_serves_the_export_as_the_trainer_scores_it(async_run, engine, vllm_tokenizer):
    # the float32 engine, as it loaded the exported folder (before any test updates its weights): its tokens
    # score as the trained weights do
    reqs = requests(vllm_tokenizer, 4)
    assert deltas(async_run.trained, reqs, engine.generate(reqs), 1.0).max() < 1e-3


class TestOneFloat32Engine:
    """Behaviour log-probs, weight updates and pauses on one float32 engine. Each test leaves the engine at
    version 0 with the original weights, as it found it."""

    @pytest.mark.parametrize("temperature", [1.0, 0.7])
    def test_behavior_logprobs_match_trainer_float32(self, engine, served_path, vllm_tokenizer, temperature):
        # processed_logprobs: the tempered distribution vLLM sampled from, so the trainer must use the same T
        reqs = requests(vllm_tokenizer, 4, temperature=temperature)
        res = engine.generate(reqs)
        assert all(len(o.output_ids) == 12 and o.finish_reason == "length" for o in res)
        d = deltas(load_model(served_path), reqs, res, temperature)
        print(f"vLLM (float32, T={temperature}) vs trainer float32: mean |delta| {d.mean():.2e}, max {d.max():.2e}")
        assert d.max() < 1e-3
        # a trainer at another temperature disagrees by far more: the logprobs really are the tempered ones
        other = deltas(load_model(served_path), reqs, res, 1.0 if temperature != 1.0 else 0.5)
        assert other.mean() > 10 * max(d.mean(), 1e-6)

    def test_weight_update_changes_outputs_and_stamps_the_version(self, engine, served_path, vllm_tokenizer):
        # through vLLM's weight-transfer protocol (start, update, finish) on the path a CPU allows
        assert (engine.transfer, engine.weights_device) == ("host", "cpu")
        reqs = requests(vllm_tokenizer, 2)
        new = perturbed(served_path)
        engine.update_weights(iter(full_weights(new).items()), 1)  # one pass, as the pipeline hands them
        res = engine.generate(reqs)
        assert all(v == 1 for o in res for v in o.output_versions)
        assert deltas(new, reqs, res, 1.0).max() < 1e-3  # scored by the new weights...
        assert deltas(load_model(served_path), reqs, res, 1.0).mean() > 1e-2  # ...not the old ones
        engine.update_weights(full_weights(load_model(served_path)), 0)  # back, for the other tests

    def test_paused_request_continues_under_the_new_version(self, engine, served_path, vllm_tokenizer):
        req = requests(vllm_tokenizer, 1, max_new=16)[0]
        steps, orig = [0], engine.engine.step

        def step():  # pause() arrives after the third scheduler step (deterministic stand-in for a thread)
            steps[0] += 1
            if steps[0] == 3:
                engine._paused = True
            return orig()

        engine.engine.step = step
        try:
            first = engine.generate([req])[0]
        finally:
            engine.engine.step = orig
        assert first.finish_reason == "paused" and 0 < len(first.output_ids) < 16
        old_state = versioned_state(load_model(served_path))
        new = perturbed(served_path, seed=1)
        engine.update_weights(full_weights(new), 1)
        engine.resume()
        done = engine.generate([first.as_continuation(req)])[0]
        k = len(first.output_ids)
        assert done.finish_reason == "length" and len(done.output_ids) == 16
        assert done.output_ids[:k] == first.output_ids and done.output_versions == [0] * k + [1] * (16 - k)
        # each span scored by its own version's weights
        old = load_model(served_path)
        load_parameters(old, old_state)
        lp_old = score_sequences(old, [req.prompt_ids + done.output_ids], Numerics())[0][len(req.prompt_ids) :]
        lp_new = score_sequences(new, [req.prompt_ids + done.output_ids], Numerics())[0][len(req.prompt_ids) :]
        got = torch.tensor(done.output_logprobs)
        assert (got[:k] - lp_old[:k]).abs().max() < 1e-3 and (got[k:] - lp_new[k:]).abs().max() < 1e-3
        engine.update_weights(old_state, 0)


def test_published_weights_declare_what_the_send_pass_yields():
    """vLLM's ipc and nccl trainer engines read the shapes first, then send: one pass of the pipeline's
    one-at-a-time weights must serve both."""
    source = PublishedWeights()
    weights = {"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.ones(4)}
    source.publish(iter(weights.items()))
    meta = source.metadata()
    assert [(m.name, m.dtype, m.shape) for m in meta] == [("a", torch.bfloat16, (2, 3)), ("b", torch.float32, (4,))]
    assert [name for name, _ in source] == ["a", "b"]
    source.publish(iter(weights.items()))  # without metadata (host): the iterator itself, nothing held
    assert [name for name, _ in source] == ["a", "b"] and list(source) == []


def test_published_weights_take_a_streams_declared_shapes_without_holding_it(tiny_path):
    """What the pipeline publishes (`iter_full_weights`) declares its shapes: the senders' metadata is read from
    that declaration, and the weights are then gathered one at a time as the send pass asks, never held whole."""
    model = load_model(tiny_path)
    source = PublishedWeights()
    stream = iter_full_weights(model, dtype=torch.bfloat16)
    source.publish(stream)
    meta = source.metadata()
    assert source._weights is stream  # not materialised
    sent = list(source)
    assert [(m.name, m.dtype, m.shape) for m in meta] == [(n, t.dtype, tuple(t.shape)) for n, t in sent]


class _Recorder:
    """Stands in for vLLM's LLM and a weight sender where vLLM's sleep mode cannot run (its CPU build): records
    calls; a sender built to fail raises."""

    def __init__(self, calls: list, fail: bool = False):
        self.calls, self.fail = calls, fail

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def send_weights(self):
        self.calls.append("send")
        if self.fail:
            raise RuntimeError("send failed")


@pytest.mark.parametrize("fail", [False, True])
def test_a_sleeping_vllm_engine_wakes_weights_then_sends_then_wakes_its_kv_cache(fail):
    """The order of VLLMEngine's sleep and update (vLLM's sleep mode is CUDA-only, so LLM is a recorder here):
    level-2 sleep once; an update wakes the weights, sends, then wakes the KV cache, even when the send fails
    (vLLM's scheduler stays paused until every tag is back)."""
    calls: list = []
    engine = object.__new__(VLLMEngine)
    engine.llm, engine.sender = _Recorder(calls), _Recorder(calls, fail)
    engine.published, engine.transfer, engine.asleep, engine.version = PublishedWeights(), "host", False, 0
    engine.sleep()
    engine.sleep()
    woken = [("sleep", 2), ("wake_up", ["weights"]), "send", ("wake_up", ["kv_cache"])]
    if fail:
        with pytest.raises(RuntimeError, match="send failed"):
            engine.update_weights({}, 1)
        assert calls == woken
    else:
        engine.update_weights({}, 1)
        assert calls == [*woken, "reset_prefix_cache"] and engine.version == 1
    assert not engine.asleep


def test_vllm_sleep_on_its_cpu_build_is_refused_before_vllm_starts(tiny_path):
    """vLLM's sleep mode is CUDA/ROCm only (`is_sleep_mode_available`): the CPU build refuses engine.sleep with
    the field named, before any engine process starts."""
    with pytest.raises(ConfigError, match="engine.sleep.*needs a CUDA or ROCm GPU; this vLLM runs on cpu"):
        VLLMEngine(tiny_path, EngineConfig(backend="vllm"), sleeps=True)


def test_bfloat16_vllm_vs_trainer_float32_is_the_real_discrepancy(async_run):
    d = async_run.bfloat16_deltas
    print(f"vLLM bfloat16 vs trainer float32: mean |delta| {d.mean():.2e}, max {d.max():.2e}")
    assert d.mean() > 1e-5 and d.max() < 0.5


def test_short_async_run_with_vllm(async_run):
    rows = async_run.rows
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["version"] == 3
    assert rows[-1]["loss/grad_norm"] > 0
    print(f"snapshot: kl/discrepancy_k3 per step {[round(r['kl/discrepancy_k3'], 6) for r in rows]}")
    # exact old log-probs: r_d is bfloat16 vLLM vs float32 trainer only, small and real
    assert all(0 < r["kl/discrepancy_k3"] < 1e-3 for r in rows)
