"""The vLLM backend (`engine.backend=vllm`) against the trainer's float32 log-probs.

Runs where vLLM is installed: on this CPU machine `make test` installs vLLM's CPU build. The tiny model
here has the default shape (head size 32), which vLLM's CPU attention supports; the smaller shape of
the other tests (head size 16) it does not.
"""

import gc

import pytest
import torch

pytest.importorskip("vllm")

from conftest import small_config  # noqa: E402
from test_engine import _deltas as deltas  # noqa: E402
from test_engine import _requests as requests  # noqa: E402

from twofold.config import EngineConfig, ModelConfig  # noqa: E402
from twofold.engine.vllm import PublishedWeights, VLLMEngine  # noqa: E402
from twofold.envs import tokenizer_corpus  # noqa: E402
from twofold.logprobs import Numerics, score_sequences  # noqa: E402
from twofold.models import (  # noqa: E402
    ensure_tiny_model,
    full_weights,
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


@pytest.fixture(scope="class")
def engine(vllm_path):
    # Shared by the tests of one class (an engine takes ~20 s to start), closed when the class ends: one
    # engine at a time, since closing a vLLM engine tears down process-wide state that another would use.
    eng = VLLMEngine(vllm_path, EngineConfig(backend="vllm", dtype="float32", gpu_memory_utilization=MEMORY), seed=0)
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


class TestOneFloat32Engine:
    """Behaviour log-probs, weight updates and pauses on one float32 engine. Each test leaves the engine at
    version 0 with the original weights, as it found it."""

    @pytest.mark.parametrize("temperature", [1.0, 0.7])
    def test_behavior_logprobs_match_trainer_float32(self, engine, vllm_path, vllm_tokenizer, temperature):
        # processed_logprobs: the tempered distribution vLLM sampled from, so the trainer must use the same T
        reqs = requests(vllm_tokenizer, 4, temperature=temperature)
        res = engine.generate(reqs)
        assert all(len(o.output_ids) == 12 and o.finish_reason == "length" for o in res)
        d = deltas(load_model(vllm_path), reqs, res, temperature)
        print(f"vLLM (float32, T={temperature}) vs trainer float32: mean |delta| {d.mean():.2e}, max {d.max():.2e}")
        assert d.max() < 1e-3
        # a trainer at another temperature disagrees by far more: the logprobs really are the tempered ones
        other = deltas(load_model(vllm_path), reqs, res, 1.0 if temperature != 1.0 else 0.5)
        assert other.mean() > 10 * max(d.mean(), 1e-6)

    def test_weight_update_changes_outputs_and_stamps_the_version(self, engine, vllm_path, vllm_tokenizer):
        # through vLLM's weight-transfer protocol (start, update, finish) on the path a CPU allows
        assert (engine.transfer, engine.weights_device) == ("host", "cpu")
        reqs = requests(vllm_tokenizer, 2)
        new = perturbed(vllm_path)
        engine.update_weights(iter(full_weights(new).items()), 1)  # one pass, as the pipeline hands them
        res = engine.generate(reqs)
        assert all(v == 1 for o in res for v in o.output_versions)
        assert deltas(new, reqs, res, 1.0).max() < 1e-3  # scored by the new weights...
        assert deltas(load_model(vllm_path), reqs, res, 1.0).mean() > 1e-2  # ...not the old ones
        engine.update_weights(full_weights(load_model(vllm_path)), 0)  # back, for the other tests

    def test_paused_request_continues_under_the_new_version(self, engine, vllm_path, vllm_tokenizer):
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
        old_state = versioned_state(load_model(vllm_path))
        new = perturbed(vllm_path, seed=1)
        engine.update_weights(full_weights(new), 1)
        engine.resume()
        done = engine.generate([first.as_continuation(req)])[0]
        k = len(first.output_ids)
        assert done.finish_reason == "length" and len(done.output_ids) == 16
        assert done.output_ids[:k] == first.output_ids and done.output_versions == [0] * k + [1] * (16 - k)
        # each span scored by its own version's weights
        old = load_model(vllm_path)
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


def test_bfloat16_vllm_vs_trainer_float32_is_the_real_discrepancy(vllm_path, vllm_tokenizer):
    eng = VLLMEngine(vllm_path, EngineConfig(backend="vllm", dtype="bfloat16", gpu_memory_utilization=MEMORY), seed=0)
    try:
        reqs = requests(vllm_tokenizer, 4)
        d = deltas(load_model(vllm_path), reqs, eng.generate(reqs), 1.0)
    finally:
        eng.close()
    print(f"vLLM bfloat16 vs trainer float32: mean |delta| {d.mean():.2e}, max {d.max():.2e}")
    assert d.mean() > 1e-5 and d.max() < 0.5


def test_short_async_run_with_vllm_and_vllm_serves_its_export(tmp_path, vllm_path, vllm_tokenizer):
    # snapshot: exact old log-probs isolate the engine's numerics (the sources' code does not touch the engine)
    source = "snapshot"
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
            "oldlogits.source": source,
            "trainer.steps": 3,
            "advantage.estimator": "discounted",
        },
    )
    pipe = Pipeline(cfg, tmp_path / "run", model_path=vllm_path)
    pipe.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["version"] == 3
    assert rows[-1]["loss/grad_norm"] > 0
    print(f"{source}: kl/discrepancy_k3 per step {[round(r['kl/discrepancy_k3'], 6) for r in rows]}")
    if source == "snapshot":  # exact old log-probs: r_d is bfloat16 vLLM vs float32 trainer only, small and real
        assert all(0 < r["kl/discrepancy_k3"] < 1e-3 for r in rows)
    trained = pipe.trainer.model
    del pipe
    gc.collect()
    # the exported folder is what vLLM serves: its tokens score as the trained weights score them
    out = export_run(tmp_path / "run", tmp_path / "export")
    eng = VLLMEngine(out, EngineConfig(backend="vllm", dtype="float32", gpu_memory_utilization=MEMORY), seed=0)
    try:
        reqs = requests(vllm_tokenizer, 4)
        d = deltas(trained, reqs, eng.generate(reqs), 1.0)
    finally:
        eng.close()
    assert d.max() < 1e-3
