"""LoRA (peft): only the adapters train, versions are adapters only, engines get merged weights, and the
exact sources stay exact."""

import pytest
import torch
from conftest import small_config
from test_exactness import assert_exact_sources_agree, record, replay
from test_oldlogits import make_batch

from twofold import models
from twofold.config import LoraConfig, ModelConfig
from twofold.engine.base import GenerationRequest, SamplingParams
from twofold.engine.builtin import BuiltinEngine
from twofold.logprobs import Numerics, score_sequences
from twofold.models import (
    full_weights,
    iter_full_weights,
    load_model,
    load_parameters,
    load_policy,
    model_bytes,
    versioned_state,
)
from twofold.oldlogits import BehaviorSource, DedicatedSource, SourceContext
from twofold.trainer.trainer import Trainer

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


def lora_policy(path):
    return load_policy(path, ModelConfig(lora=LoraConfig(**LORA)))


def moved_adapters(model, scale=0.05, seed=1):
    """LoRA starts with B = 0 (no change); give every adapter weight a random value so the delta is real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def test_only_the_adapters_train(tiny_path, tokenizer):
    cfg = small_config(
        **{"model.lora": LORA, "trainer.lr": 1e-2, "loss.discrepancy_action": "none", "loss.catastrophic": None}
    )
    trainer = Trainer(lora_policy(tiny_path), cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step(make_batch(tokenizer), BehaviorSource(SourceContext(0, True, 2)))
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == set(versioned_state(trainer.model)) and all("lora_" in n for n in trainable)


def test_full_weights_merge_the_adapters_under_hugging_face_names(tiny_path, tokenizer):
    plain = load_model(tiny_path)
    lora = moved_adapters(lora_policy(tiny_path))
    merged = full_weights(lora)
    assert set(merged) == {n for n, _ in plain.named_parameters()}
    load_parameters(plain, merged)
    seqs = [tokenizer.encode("P F F\nF H G <answer>Down</answer>", add_special_tokens=False)]
    a, b = score_sequences(lora, seqs, Numerics())[0], score_sequences(plain, seqs, Numerics())[0]
    assert (a - b).abs().max() < 1e-5
    assert (a - score_sequences(load_model(tiny_path), seqs, Numerics())[0]).abs().max() > 1e-3  # adapters matter


@pytest.mark.parametrize("lora", [True, False])
def test_a_weight_stream_declares_what_it_yields_before_gathering_anything(tiny_path, monkeypatch, lora):
    """`WeightStream.metadata` (what vLLM's senders announce first) names every weight the stream then yields, in
    its order (the model's own), with its dtype and whole shape, and runs no gather or merge to know them; the
    yielded tensors are copies, never the trainer's own."""
    model = moved_adapters(lora_policy(tiny_path)) if lora else load_model(tiny_path)
    gathers = []
    monkeypatch.setattr(models, "full_tensor", lambda t: gathers.append(1) or t)
    stream = iter_full_weights(model, dtype=torch.bfloat16)
    declared = stream.metadata()
    assert gathers == []
    yielded = list(stream)
    assert declared == [(name, torch.bfloat16, tuple(t.shape)) for name, t in yielded]
    base = model.get_base_model() if lora else model  # in the model's own order (vLLM reloads layer by layer)
    own_order = [n.replace(".base_layer.", ".") for n, _ in base.named_parameters() if "lora_" not in n]
    assert [name for name, _ in yielded] == own_order
    assert all(t.dtype == torch.bfloat16 for _, t in yielded) and gathers
    own = {t.untyped_storage().data_ptr() for t in model.parameters()}
    fp32 = list(iter_full_weights(model, dtype=torch.float32))  # no cast: the copy must be explicit
    assert not own & {t.untyped_storage().data_ptr() for _, t in fp32}


def test_engine_samples_from_the_merged_policy(tiny_path, tokenizer):
    lora = moved_adapters(lora_policy(tiny_path))
    engine = BuiltinEngine(tiny_path, dtype="float32", tokenizer=tokenizer, seed=0)
    engine.update_weights(full_weights(lora), 1)
    prompt = tokenizer.encode("P F\nF G", add_special_tokens=False)
    out = engine.generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=12))])[0]
    lp = score_sequences(lora, [prompt + out.output_ids], Numerics())[0][len(prompt) :]
    assert (lp - torch.tensor(out.output_logprobs)).abs().max() < 1e-5
    assert out.output_versions == [1] * len(out.output_ids)


def test_a_snapshot_is_the_adapters_alone(tiny_path):
    from twofold.oldlogits import SnapshotSource

    lora = lora_policy(tiny_path)
    source = SnapshotSource(SourceContext(0, True, 2), lora, budget_bytes=None)
    adapters = sum(p.numel() * 4 for n, p in lora.named_parameters() if "lora_" in n)
    assert source.snapshot_bytes == adapters
    assert adapters * 20 < model_bytes(load_model(tiny_path))  # far smaller than a model


def test_the_dedicated_copy_shares_the_frozen_base_and_holds_its_own_adapters(tiny_path):
    lora = moved_adapters(lora_policy(tiny_path))
    source = DedicatedSource(SourceContext(0, True, 2), lora)
    try:
        copy = source.worker.model
        base = {n: p for n, p in lora.named_parameters() if not p.requires_grad}
        adapters = {n: p for n, p in lora.named_parameters() if p.requires_grad}
        mine = dict(copy.named_parameters())
        assert all(mine[n] is p for n, p in base.items())  # the trainer's tensors, not copies
        assert all(mine[n] is not p and torch.equal(mine[n], p) for n, p in adapters.items())
        assert source.extra_bytes() == sum(p.numel() * 4 for p in adapters.values())
        # a version loaded into the copy moves its adapters only; the trainer's stay where they are
        before = {n: p.clone() for n, p in adapters.items()}
        source.worker.load({n: torch.zeros_like(p) for n, p in adapters.items()}, 1)
        assert all(not mine[n].any() for n in adapters) and all(torch.equal(before[n], adapters[n]) for n in adapters)
    finally:
        source.close()


@pytest.fixture(scope="module")
def lora_recording(tiny_path, tokenizer):
    make = lambda: lora_policy(tiny_path)  # noqa: E731
    return record(BuiltinEngine(tiny_path, dtype="bfloat16", tokenizer=tokenizer, seed=3), make, tokenizer), make


def test_exact_sources_agree_with_brute_force_under_lora(lora_recording):
    recording, make = lora_recording
    batch, ref, mask = assert_exact_sources_agree(recording, make)
    states = recording[1]
    assert all(all("lora_" in n for n in state) for state in states.values())  # versions differ in adapters only
    _, _, source, peak = replay("snapshot", recording, make)
    assert peak == 2 * source.snapshot_bytes  # two adapter sets held, never a model
