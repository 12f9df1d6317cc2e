"""Real-hardware readiness on one process: chunked log-probs, token-budget micro-batches, gradient
checkpointing, the learning-rate warm-up, devices and mixed precision. GPU-marked tests skip without CUDA."""

import copy
import random

import pytest
import torch
from conftest import small_config

from twofold.config import ConfigError, TrainerConfig, load_config
from twofold.logprobs import Numerics, microbatches, pad_right, score_sequences, token_logprobs
from twofold.models import load_model
from twofold.oldlogits import BehaviorSource, SourceContext
from twofold.rollout.trajectory import Batch, Trajectory
from twofold.trainer.advantages import token_advantages
from twofold.trainer.trainer import Trainer, linear_warmup

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_sequences(lengths, vocab=400, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def test_chunked_logprobs_equal_the_full_computation_gradients_included(tiny_path):
    seqs = random_sequences([70, 41, 9])
    ids, attn = pad_right(seqs, 0)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (0, 7, 32):  # 0: the whole sequence in one head call
        model = load_model(tiny_path).train()
        lp = token_logprobs(model, ids, attn, temperature=0.7, chunk_size=chunk)
        ((lp * weights).sum() / attn.sum()).backward()  # a token-mean loss, as the trainer's
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    full, full_grads = results[0]
    for lp, grads in results[1:]:
        assert (lp - full).abs().max() < 1e-6
        for n, g in grads.items():
            assert (g - full_grads[n]).abs().max() < 1e-6, n


def test_the_head_sees_only_real_tokens_a_chunk_at_a_time(tiny_path):
    # rows of 70, 41 and 9 tokens predict 69 + 40 + 8 = 117 real tokens; padded they would be 3 x 69 = 207
    ids, attn = pad_right(random_sequences([70, 41, 9]), 0)
    model = load_model(tiny_path)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: calls.append(args[0].shape[:-1].numel()))
    token_logprobs(model, ids, attn, chunk_size=50)
    assert calls == [50, 50, 17]
    calls.clear()
    token_logprobs(model, ids, attn, chunk_size=0)
    assert calls == [117]


def test_the_head_runs_only_on_wanted_positions_with_the_same_values_there(tiny_path):
    # wanted: the last 30, 10 and 3 tokens of the rows (a loss mask on replies) -> 30 + 10 + 3 = 43 head rows
    ids, attn = pad_right(random_sequences([70, 41, 9]), 0)
    wanted = torch.zeros_like(attn)
    for row, (n, k) in enumerate([(70, 30), (41, 10), (9, 3)]):
        wanted[row, n - k : n] = 1
    model = load_model(tiny_path)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: calls.append(args[0].shape[:-1].numel()))
    full = token_logprobs(model, ids, attn, chunk_size=20)
    calls.clear()
    some = token_logprobs(model, ids, attn, chunk_size=20, wanted=wanted)
    assert calls == [20, 20, 3]
    on = wanted.bool()
    assert (some[on] - full[on]).abs().max() < 1e-6 and not some[~on].any()


def test_microbatches_pack_longest_first_under_the_budget():
    lengths = [10, 50, 30, 20, 40]
    assert microbatches(lengths, 0) == [[1, 4, 2, 3, 0]]  # one group, longest first
    # 100 tokens: [50, 40] -> 2 x 50 = 100; [30, 20, 10] -> 3 x 30 = 90
    assert microbatches(lengths, 100) == [[1, 4], [2, 3, 0]]
    assert microbatches(lengths, 45) == [[1], [4], [2], [3, 0]]  # a row over the budget goes alone


def seven_trajectory_batch(model, tokenizer, seed=0):
    """7 trajectories of distinct lengths (2 groups + 1), mu = the model's own log-probs plus noise."""
    rng = random.Random(seed)
    trajs = []
    for i in range(7):
        t = Trajectory(uid=i, group_id=i // 2, level_seed=0)
        t.append([rng.randrange(400) for _ in range(5 + 3 * i)], agent=False)
        reply = [rng.randrange(400) for _ in range(4 + 7 * i)]
        t.append(reply, agent=True, logprobs=[0.0] * len(reply), versions=[0] * len(reply), turn=0)
        t.turn_rewards.append(float(rng.random()))
        trajs.append(t)
    lps = score_sequences(model, [t.token_ids for t in trajs], Numerics())
    noise = torch.Generator().manual_seed(seed)
    for t, lp in zip(trajs, lps, strict=True):
        t.behavior_logprobs = [
            float(v) if m else 0.0
            for v, m in zip(lp + 0.1 * torch.randn(len(lp), generator=noise), t.loss_mask, strict=True)
        ]
    return Batch.from_trajectories(trajs, pad_id=0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_minibatch_split_1_2_or_7_ways_gives_the_same_gradients(tiny_path, tokenizer, aggregation):
    base = load_model(tiny_path)
    batch = seven_trajectory_batch(base, tokenizer)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    longest = max(lengths)
    budgets = {1: 0, 2: 4 * longest, 7: min(lengths)}
    grads, losses = {}, {}
    for ways, budget in budgets.items():
        assert len(microbatches(lengths, budget)) == ways
        cfg = small_config(
            **{
                "trainer.max_tokens_per_microbatch": budget,
                "loss.aggregation": aggregation,
                "advantage.estimator": "grpo",
            }
        )
        trainer = Trainer(copy.deepcopy(base), cfg)
        adv = token_advantages(batch, "grpo", False, 1.0)
        losses[ways], _ = trainer.accumulate_gradients(batch, adv, BehaviorSource(SourceContext(0, True, 2)))
        grads[ways] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    for ways in (2, 7):
        assert losses[ways] == pytest.approx(losses[1], abs=1e-6)
        for n, g in grads[ways].items():
            assert (g - grads[1][n]).abs().max() < 1e-6, (ways, n)
    assert any(g.abs().max() > 0 for g in grads[1].values())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_path, tokenizer):
    base = load_model(tiny_path)
    batch = seven_trajectory_batch(base, tokenizer, seed=1)
    adv = token_advantages(batch, "grpo", False, 1.0)
    grads = []
    for on in (False, True):
        trainer = Trainer(copy.deepcopy(base), small_config(**{"trainer.gradient_checkpointing": on}))
        assert trainer.model.is_gradient_checkpointing == on
        trainer.accumulate_gradients(batch, adv, BehaviorSource(SourceContext(0, True, 2)))
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    for n, g in grads[1].items():
        assert (g - grads[0][n]).abs().max() < 1e-6, n


def test_checkpointing_is_on_by_default_and_skipped_where_a_model_has_none(tiny_path):
    assert TrainerConfig().gradient_checkpointing  # small_config turns it off for speed: the default is on
    on = small_config(**{"trainer.gradient_checkpointing": True})
    assert Trainer(load_model(tiny_path), on).model.is_gradient_checkpointing
    plain = Trainer(torch.nn.Linear(3, 2), on)  # no transformers checkpointing: trains without it
    assert not hasattr(plain.model, "is_gradient_checkpointing")


def test_the_fused_optimizer_takes_the_steps_of_the_default_loop(tiny_path, tokenizer):
    base = load_model(tiny_path)
    batch = seven_trajectory_batch(base, tokenizer, seed=3)
    source = BehaviorSource(SourceContext(0, True, 2))
    weights = []
    for fused in (False, True):
        cfg = small_config(**{"trainer.fused_optimizer": fused, "trainer.weight_decay": 0.1})
        trainer = Trainer(copy.deepcopy(base), cfg)
        assert bool(trainer.optimizer.defaults["fused"]) == fused
        for _ in range(2):  # two train steps of two minibatches: four AdamW updates, moments carried
            trainer.train_step(batch, source)
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    moved = max((weights[0][n] - p.detach()).abs().max().item() for n, p in base.named_parameters())
    assert moved > 1e-3  # the steps moved the weights by about lr each
    for n, w in weights[1].items():
        assert (w - weights[0][n]).abs().max() < 1e-6, n


def test_linear_warmup_factors():
    assert [linear_warmup(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert linear_warmup(0, 0) == 1.0  # no warm-up: lr from the first step


def test_warmup_sets_each_optimizer_steps_lr_and_survives_a_restore(tiny_path, tokenizer):
    base = load_model(tiny_path)
    batch = seven_trajectory_batch(base, tokenizer, seed=2)
    source = BehaviorSource(SourceContext(0, True, 2))
    # one minibatch, one epoch: one optimizer step per train step
    cfg = small_config(**{"trainer.lr": 1e-3, "trainer.lr_warmup_steps": 4, "trainer.num_minibatches": 1})
    trainer = Trainer(copy.deepcopy(base), cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert trainer.train_step(batch, source)["trainer/lr"] == pytest.approx(0.25e-3)
    # Adam's first step moves a weight by lr * g / (|g| + eps): the warmed lr wherever the gradient is not tiny
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    assert moved == pytest.approx(0.25e-3, rel=1e-3)
    assert trainer.train_step(batch, source)["trainer/lr"] == pytest.approx(0.5e-3)
    restored = Trainer(copy.deepcopy(base), cfg)
    restored.model.load_state_dict(trainer.model.state_dict())
    restored.optimizer.load_state_dict(trainer.optimizer.state_dict())  # the step count travels in its state
    assert restored.optimizer_steps() == 2
    lrs = [restored.train_step(batch, source)["trainer/lr"] for _ in range(3)]
    assert lrs == pytest.approx([0.75e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("field", ["trainer.device", "engine.device", "oldlogits.device", "oldlogits.snapshot_device"])
def test_a_device_that_is_not_here_is_a_named_error(field):
    with pytest.raises(ConfigError, match=field) as e:
        load_config(None, [f"{field}=tpu:0"])
    assert "auto, cpu, cuda or cuda:N" in str(e.value)
    assert ("or disk" in str(e.value)) == (field == "oldlogits.snapshot_device")  # the one field that takes it
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=f"{field}.*no CUDA device"):
            load_config(None, [f"{field}=cuda:1"])


# --------------------------------------------------------------------------- on a GPU


@gpu
def test_parts_live_on_their_configured_devices(tmp_path, tiny_path):
    from twofold.pipeline.loop import Pipeline

    cfg = small_config(
        mode="async",
        **{
            "trainer.device": "cuda",
            "engine.device": "cuda",
            "trainer.dtype": "bfloat16",
            "oldlogits.source": "snapshot",
            "trainer.steps": 2,
        },
    )
    pipe = Pipeline(cfg, tmp_path / "run", model_path=tiny_path)
    pipe.run()
    assert next(pipe.trainer.model.parameters()).device.type == "cuda"
    assert next(pipe.engine.model.parameters()).device.type == "cuda"
    assert pipe.source.ctx.snapshot_device.type == "cpu"
    assert all(t.is_pinned() for s in pipe.source.store.snapshots.values() for t in s.values())


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sync_mode_first_minibatch_has_unit_staleness_on_gpu(tmp_path, tiny_path, dtype):
    from twofold.pipeline.loop import Pipeline
    from twofold.pipeline.rundir import read_metrics

    cfg = small_config(
        mode="sync",
        **{
            "trainer.device": "cuda",
            "engine.device": "cuda",
            "trainer.dtype": dtype,
            "oldlogits.source": "snapshot",
            "trainer.num_minibatches": 1,
        },
    )
    Pipeline(cfg, tmp_path / "run", model_path=tiny_path).run()
    for r in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        assert r["ppo/staleness_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
