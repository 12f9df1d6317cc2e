"""Packed forwards (`trainer.pack_sequences`): rows packed into fewer rows give the padded rows' log-probs and
gradients, attention never crosses from one packed row into another, and the micro-batch budget counts
packed rows. Rows laid out as their prefix tree in one packed row, each shared prefix once, give them too."""

import logging

import pytest
import torch
from conftest import small_config
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DogeConfig,
    DogeForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    Lfm2Config,
    Lfm2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)

from twofold import prefix_tree as prefix_tree_module
from twofold.logprobs import (
    microbatches,
    pack_rows,
    packing_leak,
    pad_right,
    policy_logprobs,
    prefix_sharing_trial,
    token_logprobs,
)
from twofold.models import load_model, save_random_model
from twofold.oldlogits import BehaviorSource, SourceContext
from twofold.prefix_tree import (
    TREE_ATTENTION,
    Node,
    TreeAttention,
    prefix_sharing_refusal,
    prefix_tree,
    repeats_grouped_heads,
    tree_sdpa,
)
from twofold.rollout.trajectory import Batch, Trajectory
from twofold.trainer.trainer import PACKING_TOLERANCE, Trainer

SHAPE = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
CONFIG_SHAPE = dict(  # SHAPE in transformers' config names
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_rows_go_first_fit_decreasing_into_bins_of_the_width():
    # longest first: 5 -> bin 0 (room 1), 4 -> bin 1 (room 2), 3 -> bin 2 (fits neither), 2 -> bin 1 (room 0),
    # 1 -> bin 0 (room 0)
    assert pack_rows([5, 3, 2, 4, 1], 6) == [[0, 4], [3, 2], [1]]
    assert pack_rows([7, 2], 5) == [[0], [1]]  # longer than the width: alone
    assert pack_rows([], 4) == []


def test_the_microbatch_budget_counts_packed_rows_when_packing():
    lengths = [8, 4, 4, 3, 1]
    # padded: [8] 8, [8,4] 2x8=16, +4 -> 3x8=24 > 16; then [4] 4, [4,3] 8, [4,3,1] 3x4=12
    assert microbatches(lengths, 16) == [[0, 1], [2, 3, 4]]
    # packed: [8,4] -> bins [8],[4] 2x8=16, [8,4,4] -> [8],[4,4] 16, +3 -> 3 bins 24 > 16; then [3,1] -> 2x3=6
    assert microbatches(lengths, 16, packed=True) == [[0, 1, 2], [3, 4]]
    assert microbatches(lengths, 0, packed=True) == [[0, 1, 2, 3, 4]]


def _rows(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _each_way(model, ids, attn, wanted, *ways: dict):
    """(the input shapes the decoder saw, [(log-probs, gradients)]) of `policy_logprobs` called each way (keyword
    arguments), chunks of 8 tokens, backward through a weighted sum so every position's gradient counts."""
    seen, results = [], []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        for way in ways:
            model.zero_grad(set_to_none=True)
            lp = policy_logprobs(model, ids, attn, 1.0, 8, wanted, **way)
            (lp * torch.linspace(0.5, 1.5, lp.numel()).reshape(lp.shape)).sum().backward()
            results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    finally:
        hook.remove()
    return seen, results


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("llama", False)])
def test_packed_logprobs_and_gradients_equal_the_padded_ones(tmp_path, arch, tied):
    model = load_model(save_random_model(tmp_path / arch, arch=arch, tie_word_embeddings=tied, **SHAPE))
    ids, attn = pad_right(_rows(512, [23, 9, 14, 5, 8]), 0)  # width 23: [23], [14, 9], [8, 5] -> 3 rows, not 5
    wanted = attn.clone()
    wanted[:, :3] = 0  # a "prompt" without loss
    seen, ((padded, padded_grads), (packed, packed_grads)) = _each_way(model, ids, attn, wanted, {}, {"packed": True})
    assert seen == [torch.Size([5, 23]), torch.Size([3, 23])]
    assert torch.equal(padded == 0, packed == 0)  # the same positions carry log-probs
    assert (padded != 0).sum() == (23 - 3) + (9 - 3) + (14 - 3) + (5 - 3) + (8 - 3)
    assert torch.allclose(packed, padded, atol=2e-5, rtol=0)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=2e-5, rtol=1e-4), name


def test_rows_of_one_token_get_one_log_prob_each_and_it_is_zero(tmp_path):
    """Position 0 predicts nothing: a [B, 1] batch gives [B, 1] zeros, as every longer one gives its first column."""
    model = load_model(save_random_model(tmp_path / "m", **SHAPE))
    ids, attn = pad_right([[5], [7]], 0)
    assert torch.equal(policy_logprobs(model, ids, attn), torch.zeros(2, 1))


def test_the_prefix_tree_holds_each_shared_span_once_and_every_row_on_its_path():
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 6], [1, 2, 3, 4, 5], [7, 8], [1, 2, 3]]
    tree = prefix_tree(rows, min_shared=2)
    # sorted: r4 [1,2,3], r0 = r2 [1,2,3,4,5], r1 [1,2,3,6], r3 [7,8]. From r4, r0/r2/r1 share 3 tokens (>= 2) and
    # r3 none: node 0 = [1,2,3], where r4 ends. Below it (depth 3) r0 and r2 share 2 more (>= 2) and r1 parts at
    # once: node 1 = [4,5] (r0 and r2 end there), node 2 = [6]. Then r3 alone: node 3.
    assert tree.tokens == [1, 2, 3, 4, 5, 6, 7, 8]
    assert tree.positions == [0, 1, 2, 3, 4, 3, 0, 1]
    assert tree.nodes == [Node(0, 3, []), Node(3, 5, [0]), Node(5, 6, [0]), Node(6, 8, [])]
    assert tree.where == [[0, 1, 2, 3, 4], [0, 1, 2, 5], [0, 1, 2, 3, 4], [6, 7], [0, 1, 2]]
    # sharing fewer than min_shared tokens beyond the parent: each row whole
    assert prefix_tree([[1, 2, 9], [1, 2, 8]], min_shared=3).tokens == [1, 2, 8, 1, 2, 9]


def test_short_nodes_share_attention_calls_while_padding_stays_within_the_allowance():
    # rows [7]*20 + [1,2,3] / + [4,5] and [9]*30: nodes 0 = 7*20, 1 = [1,2,3] and 2 = [4,5] below it, 3 = 9*30.
    # Work counted as queries x keys. Longest first: 9*30 (30 x 30) opens a call; 7*20 (20 x 20) would pad it to
    # 2 x 30 x 30 = 1800 > 1.25 x (900 + 400): a call of its own; [1,2,3] (3 x 23 keys) would pad that to
    # 2 x 20 x 23 = 920 > 1.25 x (400 + 69): a third; [4,5] (2 x 22) joins it: 2 x 3 x 23 = 138 <= 1.25 x 113
    tree = prefix_tree([[7] * 20 + [1, 2, 3], [7] * 20 + [4, 5], [9] * 30], min_shared=8)
    calls = TreeAttention.of(tree, torch.device("cpu")).calls
    assert [c.span for c in calls] == [(25, 55), (0, 20), None]  # two nodes alone, by slices of the packed row
    assert calls[0].keys is None and calls[1].keys is None  # roots: their own span, causally
    assert calls[2].queries.tolist() == [[20, 21, 22], [23, 24, 23]]  # [4,5] padded with its first index
    assert calls[2].keys.shape == (2, 23)
    # [4,5]: 7*20 for its two queries and the padding one, its own causally (1 + 2)
    assert calls[2].mask[1, 0].sum() == 3 * 20 + (1 + 2)
    assert calls[2].valid.tolist() == [0, 1, 2, 3, 4]  # the padding query's output is dropped


def _tree_rows() -> list[list[int]]:
    """Nine rows over a 12-token system prompt: two groups sharing a question each (two levels below the root), a
    row repeating another, a row that ends where its group's question does, and a row that shares nothing."""
    system, question_a, question_b = _rows(512, [12, 9, 10], seed=3)
    rows = [system + question_a + tail for tail in _rows(512, [14, 3, 8])]
    rows += [system + question_b + tail for tail in _rows(512, [5, 11], seed=1)]
    return rows + [rows[0][:], system + question_a, _rows(512, [17], seed=2)[0], system + [7] * 9]


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("llama", False)])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_the_prefix_tree_gives_the_padded_logprobs_and_gradients(
    tmp_path, monkeypatch, arch, tied, checkpointing, batched
):
    """The decoder runs one packed row of the tree's tokens, not 9 padded rows, and every log-prob and gradient is
    the padded forward's, loss positions inside shared spans included, with gradient checkpointing too (each
    layer recomputed with the same tree), whether short nodes share attention calls (padded to each other) or
    every node has its own."""
    if not batched:
        monkeypatch.setattr(prefix_tree_module, "BATCHED_NODE_TOKENS", 0)
    model = load_model(save_random_model(tmp_path / arch, arch=arch, tie_word_embeddings=tied, **SHAPE))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = _tree_rows()
    tree = prefix_tree(rows, min_shared=8)
    # system 12 once; question a 9 and question b 10 once each (below the root); their tails 14 + 3 + 8 and 5 + 11;
    # the repeated row and the one ending at question a add nothing; the lone row 17; system + [7] * 9 adds 9
    assert len(tree.tokens) == 12 + 9 + 10 + (14 + 3 + 8) + (5 + 11) + 17 + 9
    ids, attn = pad_right(rows, 0)
    wanted = attn.clone()
    wanted[:, :6] = 0
    seen, ((padded, padded_grads), (shared, shared_grads)) = _each_way(
        model, ids, attn, wanted, {}, {"share_prefixes": True}
    )
    assert seen == [ids.shape, torch.Size([1, len(tree.tokens)])]
    assert model.config._attn_implementation == TREE_ATTENTION
    assert torch.equal(padded == 0, shared == 0)
    assert torch.allclose(shared, padded, atol=2e-5, rtol=0)
    for name, grad in padded_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=2e-5, rtol=1e-4), name


def test_a_model_on_the_tree_attention_gives_the_sdpa_logprobs_outside_a_tree(tmp_path):
    """The attention a sharing model switches to is transformers' sdpa for any call without a tree: a plain padded
    forward gives the same numbers before and after."""
    model = load_model(save_random_model(tmp_path / "m", **SHAPE))
    ids, attn = pad_right(_tree_rows(), 0)
    with torch.no_grad():
        before = policy_logprobs(model, ids, attn)
        policy_logprobs(model, ids, attn, share_prefixes=True)
        assert model.config._attn_implementation == TREE_ATTENTION
        assert torch.equal(policy_logprobs(model, ids, attn), before)


def test_prefixes_are_shared_only_with_whole_attention_static_positions_and_sdpa(tmp_path, caplog):
    ids, attn = pad_right([[1, 2, 3, 4], [1, 2, 5, 6]], 0)
    mistral = MistralForCausalLM(MistralConfig(**CONFIG_SHAPE, sliding_window=2))
    with pytest.raises(ValueError, match="sliding window"):
        policy_logprobs(mistral, ids, attn, share_prefixes=True)
    dynamic = LlamaForCausalLM(LlamaConfig(**CONFIG_SHAPE, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="dynamic RoPE"):
        policy_logprobs(dynamic, ids, attn, share_prefixes=True)
    eager = LlamaForCausalLM(LlamaConfig(**CONFIG_SHAPE))
    eager.set_attn_implementation("eager")
    assert "uses 'eager'" in prefix_sharing_refusal(eager.config)
    with caplog.at_level(logging.WARNING, logger="twofold.trainer.trainer"):
        trainer = Trainer(eager, small_config(**{"trainer.share_prefixes": True}))
    assert not trainer.numerics.share_prefixes and trainer.numerics.packed
    assert "trainer.share_prefixes" in caplog.text and "uses 'eager'" in caplog.text
    plain = load_model(save_random_model(tmp_path / "m", **SHAPE))
    assert Trainer(plain, small_config(**{"trainer.share_prefixes": True})).numerics.share_prefixes
    unpacked = small_config(**{"trainer.share_prefixes": True, "trainer.pack_sequences": False})
    assert not Trainer(plain, unpacked).numerics.share_prefixes  # a prefix tree is a packing


def _doge_trained_as():
    doge = DogeForCausalLM(DogeConfig(**CONFIG_SHAPE, pad_token_id=0))
    for name, p in doge.named_parameters():
        if name.endswith(".A"):  # its per-key bias: 0 at initialisation, not once trained
            torch.nn.init.normal_(p)
    return doge


@pytest.mark.parametrize(
    "make,reason",
    [
        # its decoder layers call attention without the forward's keyword arguments: the tree never arrives
        (lambda: StableLmForCausalLM(StableLmConfig(**CONFIG_SHAPE, pad_token_id=0)), "passes keyword arguments"),
        # transformers only warns that its attention implementation cannot be set, and keeps sdpa
        (
            lambda: FalconForCausalLM(
                FalconConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False)
            ),
            "implementation can be set",
        ),
        # it turns the mask it is given into a learned bias per key, which the tree does not add
        (_doge_trained_as, "mask or bias of the model's own"),
    ],
)
def test_models_that_would_share_prefixes_wrongly_are_refused_at_start(make, reason, caplog):
    """Each passes the config's refusal; one forward over a small tree finds what the tree's attention cannot
    compute for it, and the trainer packs its rows whole, naming the field."""
    torch.manual_seed(0)
    model = make()
    assert prefix_sharing_refusal(model.config) is None
    assert reason in prefix_sharing_trial(model, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="twofold.trainer.trainer"):
        trainer = Trainer(model, small_config(**{"trainer.share_prefixes": True}))
    assert not trainer.numerics.share_prefixes
    if trainer.numerics.packed:  # Falcon's packed rows already leak (its mask ignores position ids): nothing to share
        assert "trainer.share_prefixes" in caplog.text and reason in caplog.text


def test_grouped_heads_are_repeated_only_under_a_mask_on_cuda_and_give_the_same_attention():
    """CUDA's masked kernels read no grouped KV heads (`enable_gqa` would fall back to the math kernel), so there
    the heads are copied out; the copy changes no value (on CPU both ways run)."""
    assert repeats_grouped_heads(torch.device("cuda", 0), masked=True)
    assert not repeats_grouped_heads(torch.device("cuda", 0), masked=False)
    assert not repeats_grouped_heads(torch.device("cpu"), masked=True)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 8, generator=g)  # 6 query heads over 2 KV heads
    k, v = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[..., 0] = True
    in_place = tree_sdpa(q, k, v, mask, 0.0, None, repeat_heads=False)
    repeated = tree_sdpa(q, k, v, mask, 0.0, None, repeat_heads=True)
    by_hand = torch.softmax((q @ k.repeat_interleave(3, 1).transpose(-1, -2)) / 8**0.5 + (~mask) * -1e9, -1)
    assert torch.allclose(in_place, repeated, atol=1e-6)
    assert torch.allclose(repeated, by_hand @ v.repeat_interleave(3, 1), atol=1e-5)


def test_values_narrower_than_keys_share_prefixes_exactly():
    """DeepSeek-V3's multi-head latent attention: 16-wide queries and keys, 8-wide values; short nodes share
    calls, whose outputs take the values' width."""
    torch.manual_seed(0)
    config = DeepseekV3Config(
        **{**CONFIG_SHAPE, "num_key_value_heads": 4},
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        first_k_dense_replace=1,
        pad_token_id=0,
    )
    model = DeepseekV3ForCausalLM(config).eval()
    assert prefix_sharing_trial(model, torch.device("cpu")) is None
    ids, attn = pad_right(_tree_rows(), 0)
    with torch.no_grad():
        padded = policy_logprobs(model, ids, attn)
        shared = policy_logprobs(model, ids, attn, share_prefixes=True)
    assert torch.allclose(shared, padded, atol=2e-5, rtol=0)


def test_attention_stays_inside_each_packed_row(tmp_path):
    model = load_model(save_random_model(tmp_path / "m", **SHAPE))
    rows = _rows(512, [12, 7, 5])  # width 12: [12], [7, 5]: rows 1 and 2 share a packed row
    ids, attn = pad_right(rows, 0)
    with torch.no_grad():
        before = token_logprobs(model, ids, attn, packed=True)
        rows[1] = _rows(512, [7], seed=1)[0]  # the row packed before row 2 changes
        ids, attn = pad_right(rows, 0)
        after = token_logprobs(model, ids, attn, packed=True)
    assert torch.equal(after[2], before[2])  # row 2 saw none of it
    assert not torch.equal(after[1], before[1])


def test_a_model_whose_layers_cross_packed_rows_trains_on_padded_rows(tmp_path, caplog):
    """LFM2's short convolutions carry state from one packed row into the next (transformers keeps rows apart
    for them only through `seq_idx`, which packing by position ids does not give): the trainer measures that,
    says so naming the field, and trains (and has its sources score) with padded rows; an attention-only
    model's leak is exactly 0, and it packs."""
    torch.manual_seed(0)
    lfm2 = Lfm2ForCausalLM(Lfm2Config(**CONFIG_SHAPE, layer_types=["conv", "full_attention"]))
    assert packing_leak(lfm2, torch.device("cpu")) > PACKING_TOLERANCE
    with caplog.at_level(logging.WARNING, logger="twofold.trainer.trainer"):
        trainer = Trainer(lfm2, small_config(**{"trainer.pack_sequences": True}))
    assert not trainer.numerics.packed
    assert "trainer.pack_sequences" in caplog.text and "lets packed rows see each other" in caplog.text
    qwen2 = load_model(save_random_model(tmp_path / "m", **SHAPE))
    assert packing_leak(qwen2, torch.device("cpu")) == 0.0
    assert Trainer(qwen2, small_config(**{"trainer.pack_sequences": True})).numerics.packed


def _batch(lengths: list[int], prompt: int = 3) -> Batch:
    """Rows of `lengths` in groups of two, each group's first `prompt` tokens its shared prompt (no loss)."""
    trajectories = []
    for i, (tokens, n) in enumerate(zip(_rows(512, lengths, seed=3), lengths, strict=True)):
        t = Trajectory(uid=i, group_id=i // 2, level_seed=0)
        t.append(_rows(512, [prompt], seed=10 + i // 2)[0], agent=False)
        t.append(tokens[prompt:], agent=True, logprobs=[-1.0] * (n - prompt), versions=[0] * (n - prompt))
        t.turn_rewards.append(float(i % 3))
        trajectories.append(t)
    return Batch.from_trajectories(trajectories, pad_id=0)


def test_a_packed_train_step_takes_the_padded_step(tmp_path):
    path = save_random_model(tmp_path / "m", **SHAPE)
    steps = {}
    for packed in (False, True):
        cfg = small_config(
            **{
                "model.path": str(path),
                "trainer.pack_sequences": packed,
                "trainer.share_prefixes": False,  # packing alone (the next test shares prefixes)
                "trainer.max_tokens_per_microbatch": 64,
            }
        )
        trainer = Trainer(load_model(path), cfg)
        ctx = SourceContext(pad_id=0, async_mode=False, max_staleness=0, numerics=trainer.numerics)
        batch = _batch([16, 16, 8, 8, 8, 8, 16, 8])
        # 64 tokens: padded, 4 rows x 16 then 2 x 8; packed, [16], [16], [8, 8], [8, 8]: 4 rows x 16 in one
        micro = trainer.my_microbatches(batch.select(list(range(6))))
        metrics = trainer.train_step(batch, BehaviorSource(ctx))
        steps[packed] = (len(micro), metrics, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    (padded_micro, padded, padded_weights), (packed_micro, packed, packed_weights) = steps[False], steps[True]
    assert (padded_micro, packed_micro) == (2, 1)
    assert packed["loss/value"] == pytest.approx(padded["loss/value"], rel=1e-4, abs=1e-6)
    assert packed["loss/grad_norm"] == pytest.approx(padded["loss/grad_norm"], rel=1e-4)
    for name, weight in padded_weights.items():
        assert torch.allclose(packed_weights[name], weight, atol=1e-6), name


def test_a_train_step_sharing_prefixes_takes_the_padded_step(tmp_path):
    """Groups of two rows share a 10-token prompt: the step over their prefix tree (one micro-batch, each prompt
    once) moves the weights as the padded step does."""
    path = save_random_model(tmp_path / "m", **SHAPE)
    steps = {}
    for share in (False, True):
        cfg = small_config(
            **{"model.path": str(path), "trainer.pack_sequences": share, "trainer.share_prefixes": share}
        )
        trainer = Trainer(load_model(path), cfg)
        assert trainer.numerics.share_prefixes == share
        ctx = SourceContext(pad_id=0, async_mode=False, max_staleness=0, numerics=trainer.numerics)
        metrics = trainer.train_step(_batch([16, 20, 12, 18, 30, 11], prompt=10), BehaviorSource(ctx))
        steps[share] = (metrics, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    (padded, padded_weights), (shared, shared_weights) = steps[False], steps[True]
    assert shared["loss/value"] == pytest.approx(padded["loss/value"], rel=1e-4, abs=1e-6)
    assert shared["loss/grad_norm"] == pytest.approx(padded["loss/grad_norm"], rel=1e-4)
    # Adam divides each gradient by its own size, so an entry whose gradient is near 0 turns float rounding into
    # a visible step: 1% of one update at lr 1e-3 (a real difference would move weights by whole updates)
    for name, weight in padded_weights.items():
        assert torch.allclose(shared_weights[name], weight, atol=1e-5), name


def test_sharing_prefixes_puts_rows_that_open_alike_in_one_micro_batch():
    lengths = [5, 4, 5, 4]
    tokens = [[1, 1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 1, 2], [2, 2, 2, 3]]
    # longest first: [0, 2] then [1, 3] either way here; sorted by tokens: 0, 2 (they open with 1) then 1, 3
    assert microbatches(lengths, 10, tokens=tokens) == [[0, 2], [1, 3]]
    assert microbatches([5, 5, 4, 4], 10, tokens=[[1] * 5, [2] * 5, [1] * 4, [2] * 4]) == [[2, 0], [3, 1]]
    assert microbatches([5, 5, 4, 4], 10) == [[0, 1], [2, 3]]


def test_a_transformers_without_packed_masks_is_measured_and_trains_on_padded_rows(tmp_path, monkeypatch):
    """A transformers that does not read restarting position ids as new sequences builds one causal mask over
    the packed row: attention crosses rows, the start-up measurement sees it, and the trainer pads."""
    import transformers.masking_utils

    qwen2 = load_model(save_random_model(tmp_path / "m", **SHAPE))
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert packing_leak(qwen2, torch.device("cpu")) > PACKING_TOLERANCE
    assert not Trainer(qwen2, small_config(**{"trainer.pack_sequences": True})).numerics.packed
