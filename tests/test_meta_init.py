"""The sharded trainer built on the meta device and filled from rank 0 (issue #35, item 6), and its bfloat16
all-gather option, on 2 local CPU ranks (gloo): the same weights, buffers, tied head, log-probs and training
step as one process that loads the model whole, with no rank but 0 ever loading it."""

import itertools

import pytest
import torch
from conftest import small_config
from test_scale import random_sequences, seven_trajectory_batch
from torch.distributed.fsdp import FSDPModule

from twofold import sharding
from twofold.distributed import close_ranks, init_ranks, local_tensor, spawn_ranks
from twofold.logprobs import pad_right, token_logprobs
from twofold.models import gathered_state, load_model, load_policy, model_bytes
from twofold.oldlogits import EWMASource, SourceContext
from twofold.oldlogits.base import with_parameters
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


def sharded_units(policy):
    return [m for m in sharding.sharded_root(policy).modules() if isinstance(m, FSDPModule)]


def shifted_trained(policy):
    """Every trained parameter plus 0.05 (LoRA's B adapters start at zero): this rank's shards of another version
    of the policy."""
    return {n: local_tensor(p).detach() + 0.05 for n, p in policy.named_parameters() if p.requires_grad}


def one_step(trainer, tiny_path):
    """A step of 2 optimizer steps with pi_old from a PPO-EWMA average (beta 0.5): the second minibatch's pi_old
    is the average of the weights before and after the first, scored between that minibatch's forward and its
    backward through the trainer's own model (a sharded one with its shards swapped in place)."""
    batch = seven_trajectory_batch(load_model(tiny_path), None)  # built from the unsharded model
    ctx = SourceContext(0, True, 2, numerics=trainer.numerics, ranks=trainer.ranks)
    source = EWMASource(ctx, trainer.model, beta=0.5, tau=0.0, auto_reset=False)
    return trainer.train_step(batch, source, after_optimizer_step=lambda: source.after_optimizer_step(trainer.model))


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
        shifted = shifted_trained(policy)
        root = sharding.sharded_root(policy)
        root.set_reshard_after_forward(False)  # every unit keeps its weights gathered after a forward, the version's
        for unit in sharded_units(policy):  # too; and each is gathered as the swap starts
            unit.unshard()
        swapped_logprobs = with_parameters(policy, shifted, lambda m: token_logprobs(m, ids, attn))
        logprobs_after_swap = token_logprobs(policy, ids, attn)
        root.set_reshard_after_forward(True)
        for unit in sharded_units(policy):
            unit.reshard()
    result = {
        **seen,
        "tied": head is embedding,
        "local_bytes": model_bytes(policy),
        "trained": sorted(n for n, p in policy.named_parameters() if p.requires_grad),
        "params": gathered_state(policy, keep=ranks.is_main, trained_only=False),
        "params_after_swap": gathered_state(policy, keep=ranks.is_main, trained_only=False),
        "buffers": {n: b.clone() for n, b in policy.named_buffers()},
        "logprobs": logprobs,
        "swapped_logprobs": swapped_logprobs,
        "logprobs_after_swap": logprobs_after_swap,
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
        one_shifted = with_parameters(one.model, shifted_trained(one.model), lambda m: token_logprobs(m, ids, attn))
    one_params = gathered_state(one.model, trained_only=False)
    one_buffers = dict(one.model.named_buffers())
    one_metrics = one_step(one, tiny_path)
    one_stepped = gathered_state(one.model, trained_only=False)

    spawn_ranks(_meta_init, 2, tiny_path, lora, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    two = ranks[0]
    # the policy was built on meta; the whole model was read by rank 0 alone, once
    assert [r["meta_when_sharded"] for r in ranks] == [[True], [True]]
    assert [r["loaded_whole"] for r in ranks] == [1, 0]
    # each parameter is split on its first dimension; odd sizes leave one rank a row more
    assert all(0.45 < r["local_bytes"] / model_bytes(one.model) < 0.55 for r in ranks)
    assert all(r["tied"] for r in ranks)
    assert [r["trained"] for r in ranks] == [sorted(n for n, p in one.model.named_parameters() if p.requires_grad)] * 2
    assert set(two["params"]) == set(one_params)
    for name, p in one_params.items():  # sent, not recomputed: bit for bit
        assert torch.equal(two["params"][name], p), name
        assert torch.equal(two["params_after_swap"][name], p), name  # its own weights back, bit for bit
    for r in ranks:  # inv_freq, which the meta device leaves empty
        assert set(r["buffers"]) == set(one_buffers)
        assert all(torch.equal(r["buffers"][n], b) for n, b in one_buffers.items())
    # Log-probs to 1e-6: the same ops on the same gathered weights, with 1 thread per rank against 2 here
    assert (two["logprobs"] - one_logprobs).abs().max() < 1e-6
    # another version's shards swapped in score as one process with that version standing in
    assert (two["swapped_logprobs"] - one_shifted).abs().max() < 1e-6
    assert torch.equal(two["logprobs_after_swap"], two["logprobs"])  # nothing of the version stays gathered
    assert (one_shifted - one_logprobs).abs().max() > 1e-2  # the other version scores otherwise
    # the step with pi_old from the EWMA (scored between forward and backward, shards swapped on the ranks):
    # as test_distributed's two-rank step (gradients summed over ranks in another order)
    assert two["metrics"]["loss/value"] == pytest.approx(one_metrics["loss/value"], abs=1e-5)
    assert two["metrics"]["loss/grad_norm"] == pytest.approx(one_metrics["loss/grad_norm"], abs=1e-5)
    # pi_old cancels out of the loss while nothing is clipped (r_s x r_d = pi_theta / mu); the staleness KL
    # reads it: 0 had the second minibatch been scored with the current weights instead of the average
    assert one_metrics["kl/staleness_k1"] > 1e-4  # full 6.3e-3, LoRA 2.2e-4 (its adapters move less)
    assert two["metrics"]["kl/staleness_k1"] == pytest.approx(one_metrics["kl/staleness_k1"], abs=1e-6)
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
        swapped_logprobs = with_parameters(policy, shifted_trained(policy), lambda m: token_logprobs(m, ids, attn))
    one_step(trainer, tiny_path)
    result = {
        "gathered": [str(d) for d in gathered],
        "master": sorted({str(p.dtype) for p in policy.parameters()}),
        "adam": sorted({str(v.dtype) for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"}),
        "logprobs": logprobs,
        "swapped_logprobs": swapped_logprobs,
    }
    if ranks.is_main:
        torch.save(result, out)
    close_ranks(ranks)


def test_bfloat16_all_gathers_compute_with_bfloat16_weights_over_float32_masters(tmp_path, tiny_path):
    """`trainer.fsdp_param_dtype=bfloat16`: the weights a forward sees are bfloat16 (gloo all-gathers them so),
    the log-probs are a whole model's with its parameters rounded to bfloat16 (buffers float32), not the float32
    model's; the sharded masters and AdamW's moments stay float32; another version swapped in is gathered so too."""
    spawn_ranks(_bf16_gather, 2, tiny_path, tmp_path / "bf16.pt")
    two = torch.load(tmp_path / "bf16.pt", weights_only=True)
    ids, attn = scored_ids()
    model = load_model(tiny_path)
    with torch.no_grad():
        float32 = token_logprobs(model, ids, attn)
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        rounded = token_logprobs(model, ids, attn)
        model = load_model(tiny_path)
        for p in model.parameters():  # another version: every weight plus 0.05, gathered in bfloat16
            p.data = (p.data + 0.05).to(torch.bfloat16)
        shifted = token_logprobs(model, ids, attn)
    assert set(two["gathered"]) == {"torch.bfloat16"}
    assert two["master"] == two["adam"] == ["torch.float32"]
    assert (two["logprobs"] - rounded).abs().max() < 1e-6
    assert (two["logprobs"] - float32).abs().max() > 1e-3  # bfloat16 weights do change the numbers
    assert (two["swapped_logprobs"] - shifted).abs().max() < 1e-6  # another version swapped in gathers so too


def test_the_all_gather_dtype_is_float32_or_bfloat16_and_reductions_stay_float32():
    policy = sharding.mixed_precision(torch.bfloat16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert step_config(False).trainer.fsdp_param_dtype == "float32"
    with pytest.raises(Exception, match="trainer.fsdp_param_dtype"):
        step_config(False, **{"trainer.fsdp_param_dtype": "float16"})
