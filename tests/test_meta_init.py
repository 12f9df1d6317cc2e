"""The sharded trainer built on the meta device and filled from rank 0 (issue #35, item 6), and its bfloat16
all-gather option, on 2 local CPU ranks (gloo): the same weights, buffers, tied head, log-probs and training
step as one process that loads the model whole, with no rank but 0 ever loading it."""

import itertools

import pytest
import torch
from conftest import small_config
from test_scale import random_sequences, seven_trajectory_batch

from twofold import sharding
from twofold.distributed import close_ranks, init_ranks, spawn_ranks
from twofold.logprobs import pad_right, token_logprobs
from twofold.models import gathered_state, load_model, load_policy, model_bytes
from twofold.oldlogits import BehaviorSource, SourceContext
from twofold.sharding import sharded_copy
from twofold.trainer.trainer import Trainer

LORA = {"model.lora.r": 4, "model.lora.alpha": 8.0, "model.lora.target_modules": ["q_proj", "v_proj"]}


def step_config(lora: bool, **overrides):
    return small_config(
        **{
            "trainer.num_minibatches": 2,
            "trainer.lr": 1e-2,
            "trainer.max_tokens_per_microbatch": 200,
            "loss.aggregation": "seq-mean-token-mean",
            **(LORA if lora else {}),
            **overrides,
        }
    )


def scored_ids():
    return pad_right(random_sequences([30, 17, 9]), 0)


def head_and_embedding(policy):
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    return base.get_output_embeddings().weight, base.get_input_embeddings().weight


def one_step(trainer, tiny_path, ranks=None):
    batch = seven_trajectory_batch(load_model(tiny_path), None)  # built from the unsharded model
    source = BehaviorSource(SourceContext(0, True, 2, ranks=trainer.ranks))
    return trainer.train_step(batch, source)


# --------------------------------------------------------------------------- meta init equals loading whole


def _meta_init(rank, world, address, port, tiny_path, lora, out):
    ranks = init_ranks(rank, world, address, port, torch.device("cpu"))
    torch.set_num_threads(1)
    seen = {"meta_when_sharded": [], "loaded_whole": 0}
    shard_on, load_whole = sharding.shard_on, sharding.load_policy

    def spy_shard_on(policy, mesh, param_dtype=torch.float32):
        seen["meta_when_sharded"].append(all(t.is_meta for t in itertools.chain(policy.parameters(), policy.buffers())))
        return shard_on(policy, mesh, param_dtype)

    def spy_load(*args, **kwargs):
        seen["loaded_whole"] += 1
        return load_whole(*args, **kwargs)

    sharding.shard_on, sharding.load_policy = spy_shard_on, spy_load  # this rank's process only
    torch.manual_seed(0)  # LoRA adapters are drawn from it, as one process draws them
    trainer = Trainer.from_pretrained(tiny_path, step_config(lora), ranks=ranks)
    policy = trainer.model
    head, embedding = head_and_embedding(policy)
    ids, attn = scored_ids()
    with torch.no_grad():
        logprobs = token_logprobs(policy, ids, attn)
        copy = sharded_copy(policy)
        copy_logprobs = token_logprobs(copy, ids, attn)
    result = {
        **seen,
        "tied": head is embedding,
        "local_bytes": model_bytes(policy),
        "trained": sorted(n for n, p in policy.named_parameters() if p.requires_grad),
        "params": gathered_state(policy, keep=ranks.is_main, trained_only=False),
        "copy_params": gathered_state(copy, keep=ranks.is_main, trained_only=False),
        "buffers": {n: b.clone() for n, b in policy.named_buffers()},
        "logprobs": logprobs,
        "copy_logprobs": copy_logprobs,
        "metrics": one_step(trainer, tiny_path),
        "stepped": gathered_state(policy, keep=ranks.is_main, trained_only=False),
    }
    torch.save(result, out / f"rank{rank}.pt")
    close_ranks(ranks)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_policy_built_on_meta_and_filled_from_rank_0_is_the_policy_loaded_whole(tmp_path, tiny_path, lora):
    """Every rank shards a policy that is all meta, only rank 0 loads the model, and each rank ends up holding
    half of it: yet the gathered weights (LoRA adapters drawn under the same seed), the rotary buffers, the tied
    head, the log-probs and a training step equal one process that loaded the model whole."""
    cfg = step_config(lora)
    torch.manual_seed(0)
    one = Trainer(load_policy(tiny_path, cfg.model), cfg)
    ids, attn = scored_ids()
    with torch.no_grad():
        one_logprobs = token_logprobs(one.model, ids, attn)
    one_params = gathered_state(one.model, trained_only=False)
    one_buffers = dict(one.model.named_buffers())
    one_metrics = one_step(one, tiny_path)
    one_stepped = gathered_state(one.model, trained_only=False)

    spawn_ranks(_meta_init, 2, tiny_path, lora, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    two = ranks[0]
    # [policy, its sharded copy]: both built on meta; the whole model was read by rank 0 alone, once
    assert [r["meta_when_sharded"] for r in ranks] == [[True, True], [True, True]]
    assert [r["loaded_whole"] for r in ranks] == [1, 0]
    # each parameter is split on its first dimension; odd sizes leave one rank a row more
    assert all(0.45 < r["local_bytes"] / model_bytes(one.model) < 0.55 for r in ranks)
    assert all(r["tied"] for r in ranks)
    assert [r["trained"] for r in ranks] == [sorted(n for n, p in one.model.named_parameters() if p.requires_grad)] * 2
    assert set(two["params"]) == set(one_params)
    for name, p in one_params.items():  # sent, not recomputed: bit for bit
        assert torch.equal(two["params"][name], p), name
        assert torch.equal(two["copy_params"][name], p), name
    for r in ranks:  # inv_freq, which the meta device leaves empty
        assert set(r["buffers"]) == set(one_buffers)
        assert all(torch.equal(r["buffers"][n], b) for n, b in one_buffers.items())
    # Log-probs to 1e-6: the same ops on the same gathered weights, with 1 thread per rank against 2 here
    assert (two["logprobs"] - one_logprobs).abs().max() < 1e-6
    assert torch.equal(two["copy_logprobs"], two["logprobs"])  # the copy scores as the policy does
    # the step: as test_distributed's two-rank step (gradients summed over ranks in another order)
    assert two["metrics"]["loss/value"] == pytest.approx(one_metrics["loss/value"], abs=1e-5)
    assert two["metrics"]["loss/grad_norm"] == pytest.approx(one_metrics["loss/grad_norm"], abs=1e-5)
    assert two["metrics"]["trainer/optimizer_steps"] == one_metrics["trainer/optimizer_steps"] == 2
    moved = 0.0
    for name, p in one_stepped.items():
        assert (two["stepped"][name] - p).abs().max() < 5e-5, name
        moved = max(moved, float((p - one_params[name]).abs().max()))
    assert moved > 1e-3  # the step really moved the weights


# --------------------------------------------------------------------------- bfloat16 all-gathers


def _bf16_gather(rank, world, address, port, tiny_path, out):
    ranks = init_ranks(rank, world, address, port, torch.device("cpu"))
    torch.set_num_threads(1)
    trainer = Trainer.from_pretrained(
        tiny_path, step_config(False, **{"trainer.fsdp_param_dtype": "bfloat16"}), ranks=ranks
    )
    policy = trainer.model
    gathered = []
    layer = sharding.decoder_layers(policy)[0]
    layer.self_attn.q_proj.register_forward_pre_hook(lambda module, args: gathered.append(module.weight.dtype))
    ids, attn = scored_ids()
    with torch.no_grad():
        logprobs = token_logprobs(policy, ids, attn)
        copy_logprobs = token_logprobs(sharded_copy(policy, torch.bfloat16), ids, attn)
    one_step(trainer, tiny_path)
    result = {
        "gathered": [str(d) for d in gathered],
        "master": sorted({str(p.dtype) for p in policy.parameters()}),
        "adam": sorted({str(v.dtype) for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"}),
        "logprobs": logprobs,
        "copy_logprobs": copy_logprobs,
    }
    if ranks.is_main:
        torch.save(result, out)
    close_ranks(ranks)


def test_bfloat16_all_gathers_compute_with_bfloat16_weights_over_float32_masters(tmp_path, tiny_path):
    """`trainer.fsdp_param_dtype=bfloat16`: the weights a forward sees are bfloat16 (gloo all-gathers them so),
    the log-probs are a whole model's with its parameters rounded to bfloat16 (buffers float32), not the float32
    model's; the sharded masters and AdamW's moments stay float32; a sharded copy gathers as the trainer does."""
    spawn_ranks(_bf16_gather, 2, tiny_path, tmp_path / "bf16.pt")
    two = torch.load(tmp_path / "bf16.pt", weights_only=True)
    ids, attn = scored_ids()
    model = load_model(tiny_path)
    with torch.no_grad():
        float32 = token_logprobs(model, ids, attn)
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        rounded = token_logprobs(model, ids, attn)
    assert set(two["gathered"]) == {"torch.bfloat16"}
    assert two["master"] == two["adam"] == ["torch.float32"]
    assert (two["logprobs"] - rounded).abs().max() < 1e-6
    assert (two["logprobs"] - float32).abs().max() > 1e-3  # bfloat16 weights do change the numbers
    assert torch.equal(two["copy_logprobs"], two["logprobs"])


def test_the_all_gather_dtype_is_float32_or_bfloat16_and_reductions_stay_float32():
    policy = sharding.mixed_precision(torch.bfloat16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert step_config(False).trainer.fsdp_param_dtype == "float32"
    with pytest.raises(Exception, match="trainer.fsdp_param_dtype"):
        step_config(False, **{"trainer.fsdp_param_dtype": "float16"})
