"""Any Hugging Face causal LM by path: random 20-50M-parameter models with a 32k vocabulary, built here in
two architectures (Qwen2 with a tied head, Llama with an untied one), trained a few async steps."""

import pytest
from conftest import small_config

from twofold.envs import tokenizer_corpus
from twofold.models import load_model, save_random_model
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.rundir import read_metrics

SHAPES = {
    "qwen2-tied": dict(arch="qwen2", hidden_size=512, num_heads=8, num_kv_heads=4, tie_word_embeddings=True),
    "llama-untied": dict(arch="llama", hidden_size=384, num_heads=6, num_kv_heads=2, tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def random_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_random_model(
        path, vocab_size=32000, num_layers=4, intermediate_size=1024, corpus=tokenizer_corpus(), **SHAPES[request.param]
    )
    return request.param, path


def test_model_shape(random_model):
    name, path = random_model
    model = load_model(path)
    params = sum(p.numel() for p in model.parameters())
    assert 20e6 <= params <= 50e6, params
    assert model.config.vocab_size == 32000
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == SHAPES[name]["tie_word_embeddings"]


# each architecture once and each source once (a step's cost here is the 32k-vocabulary head, not the source)
SOURCE = {"qwen2-tied": "snapshot", "llama-untied": "ewma"}


def test_a_few_async_steps(tmp_path, random_model):
    name, path = random_model
    source = SOURCE[name]
    cfg = small_config(
        mode="async",
        **{
            "model.path": str(path),
            "model.warmstart": False,
            "oldlogits.source": source,
            "trainer.steps": 2,
            "trainer.max_tokens_per_microbatch": 512,
            "trainer.logprob_chunk_size": 128,
            "advantage.estimator": "discounted",
            "run.tensorboard": False,
        },
    )
    Pipeline(cfg, tmp_path / "run").run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["version"] == 2
    assert rows[-1]["loss/grad_norm"] > 0 and rows[-1]["rollout/agent_tokens"] > 0
