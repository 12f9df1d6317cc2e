import types

import pytest
import torch
from conftest import pause_from_another_thread
from transformers import Gemma3Config, Gemma3ForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from twofold.engine import builtin
from twofold.engine.base import GenerationRequest, SamplingParams
from twofold.engine.builtin import (
    CPU_SDPA,
    BuiltinEngine,
    hold_weights_in_float32_,
    inverse_cdf_sample,
    lacks_native_low_precision_matmul,
    sample_from_logits,
    use_cpu_attention_,
)
from twofold.logprobs import Numerics, score_sequences
from twofold.models import full_weights, iter_full_weights, load_model, load_tokenizer


def _requests(tokenizer, n, max_new=12, **kw):
    prompt = tokenizer.encode("P F F\nF H F\nF F G", add_special_tokens=False)
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=[], **kw)
    return [GenerationRequest(i, prompt[: len(prompt) - i], params) for i in range(n)]


def _deltas(model, reqs, results, temperature=None):
    """|behaviour log-prob - trainer float32 log-prob| on every generated token (at the requests' temperature)."""
    seqs = [r.prompt_ids + o.output_ids for r, o in zip(reqs, results, strict=True)]
    lps = score_sequences(model, seqs, Numerics(temperature=temperature or reqs[0].params.temperature))
    return torch.cat(
        [
            (lp[len(r.prompt_ids) :] - torch.tensor(o.output_logprobs)).abs()
            for lp, r, o in zip(lps, reqs, results, strict=True)
        ]
    )


def test_sampler_logprob_is_log_softmax_of_filtered_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    # temperature 2 -> [1, .5, 0, -.5]; top-k 2 keeps the first two: p = softmax([1, .5])
    tok, lp = sample_from_logits(logits, SamplingParams(temperature=2.0, top_k=2), torch.Generator().manual_seed(0))
    expected = torch.log_softmax(torch.tensor([1.0, 0.5]), -1)
    assert int(tok) in (0, 1)
    assert lp.item() == pytest.approx(expected[int(tok)].item(), abs=1e-6)
    # top-p 0.5 on softmax([2,1,0,-1]) = [.64, .24, .09, .03]: only token 0 survives -> log-prob 0
    tok, lp = sample_from_logits(logits, SamplingParams(top_p=0.5), torch.Generator().manual_seed(0))
    assert int(tok) == 0 and lp.item() == pytest.approx(0.0, abs=1e-6)


def test_inverse_cdf_sample_draws_each_token_with_its_probability_and_never_a_zero_one():
    """20,000 rows of p = [0.5, 0.3, 0.2, 0]: each frequency within 4 standard errors (at most sqrt(.25/20000) =
    0.0035, so 0.015) of p, token 3 never; unnormalised [2, 0, 2] gives 0 and 2 half each and never 1; a row whose
    mass is all on the last token draws it (the end of the cumulative sum)."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).expand(20_000, 4)
    tokens = inverse_cdf_sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).double() / 20_000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64), atol=0.015)
    assert freq[3] == 0
    halves = inverse_cdf_sample(torch.tensor([[2.0, 0.0, 2.0]]).expand(20_000, 3), torch.Generator().manual_seed(1))
    assert (halves != 1).all() and abs((halves == 0).double().mean().item() - 0.5) < 0.015
    assert inverse_cdf_sample(torch.tensor([[0.0, 0.0, 1.0]]).expand(100, 3)).eq(2).all()
    with pytest.raises(ValueError, match=r"rows \[1, 2\] have no finite positive probability mass"):
        inverse_cdf_sample(torch.tensor([[0.5, 0.5], [float("nan"), 1.0], [0.0, 0.0]]))


def test_float32_engine_matches_trainer_logprobs(tiny_path, tokenizer):
    engine = BuiltinEngine(tiny_path, dtype="float32", tokenizer=tokenizer)
    reqs = _requests(tokenizer, 4, temperature=0.7)
    res = engine.generate(reqs)
    d = _deltas(load_model(tiny_path), reqs, res)
    print(f"float32 engine vs trainer: mean |delta| {d.mean():.2e}, max {d.max():.2e}")
    assert d.max() < 1e-5
    assert all(v == 0 for o in res for v in o.output_versions)


def test_bfloat16_engine_differs_from_trainer(tiny_path, tokenizer):
    engine = BuiltinEngine(tiny_path, dtype="bfloat16", tokenizer=tokenizer)
    reqs = _requests(tokenizer, 4)
    d = _deltas(load_model(tiny_path), reqs, engine.generate(reqs))
    print(f"bfloat16 engine vs trainer: mean |delta| {d.mean():.2e}, max {d.max():.2e}")
    assert d.mean() > 1e-5 and d.max() < 0.5


def test_float32_accumulation_keeps_bf16_numerics_but_summation_order(tiny_path):
    """The CPU fast path rounds the same bf16 inputs and outputs; only float32 partial sums are added in
    another order, so outputs move by at most an ulp and the gap to the trainer stays the same."""
    # Hand-checkable: 256 + 1 + 1 summed in float32 is 258, which bf16 holds exactly (ulp 2 at 256);
    # bf16 running sums would round 256 + 1 back to 256 (tie to even) twice and give 256.
    lin = torch.nn.Linear(3, 1, bias=False).to(torch.bfloat16)
    lin.weight.data.fill_(1.0)
    hold_weights_in_float32_(lin, torch.bfloat16)
    out = lin(torch.tensor([[256.0, 1.0, 1.0]], dtype=torch.bfloat16))
    assert lin.weight.dtype == torch.float32 and out.dtype == torch.bfloat16 and out.item() == 258.0

    trainer = load_model(tiny_path)
    native, fast = load_model(tiny_path, torch.bfloat16), load_model(tiny_path, torch.bfloat16)
    hold_weights_in_float32_(fast, torch.bfloat16)
    use_cpu_attention_(fast)
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, a, b = (m(input_ids=ids).logits.float().log_softmax(-1) for m in (trainer, native, fast))
    kl = [(ref.exp() * (ref - x)).sum(-1).mean().item() for x in (a, b)]
    assert kl[0] > 0 and kl[1] == pytest.approx(kl[0], rel=0.1)
    assert (a - b).abs().max() < 0.05  # a few bf16 ulps of a logit of size ~5


def _linear_converting_weights(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The path the engine took before holding weights in float32: bf16 weights converted on every call."""
    bias = None if self.bias is None else self.bias.float()
    return torch.nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def test_weights_held_in_float32_give_the_numbers_of_converting_them_per_call(tiny_path):
    """Tolerance 0: both paths hand the same float32 GEMM the same operands (the float32 copy of a bf16 value is
    exact, whether made once at load or on every call), so the logits agree bit for bit."""
    converting = load_model(tiny_path, torch.bfloat16)
    for module in converting.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(_linear_converting_weights, module)
    held = load_model(tiny_path, torch.bfloat16)
    hold_weights_in_float32_(held, torch.bfloat16)
    assert held.lm_head.weight is held.model.embed_tokens.weight  # still tied: one float32 tensor
    assert held.lm_head.weight.dtype == torch.float32 and held.model.norm.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = converting(input_ids=ids).logits, held(input_ids=ids).logits
    assert after.dtype == torch.bfloat16 and torch.equal(before, after)


def _weight_bytes_held(model: torch.nn.Module, wide: bool) -> int:
    """4 bytes for a Linear or Embedding weight held in float32 (`wide`), 2 for everything else (bf16)."""
    wide_modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
    held = {id(p) for m in wide_modules for p in m.parameters()}
    return sum(p.numel() * (4 if wide and id(p) in held else 2) for p in model.parameters())


def test_weights_streamed_to_the_engine_load_as_a_dict_does_and_a_missing_one_is_named(tiny_path):
    """What the pipeline hands the engine (`iter_full_weights`: one parameter at a time, already bf16, on the
    engine's device) loads to the same bits as the float32 dict rounded on load; a weight missing from an
    update is named, not left at the old version."""
    model = load_model(tiny_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    from_dict, streamed = BuiltinEngine(tiny_path, dtype="bfloat16"), BuiltinEngine(tiny_path, dtype="bfloat16")
    before = {n: p.clone() for n, p in streamed.model.named_parameters()}
    from_dict.update_weights(full_weights(model), 1)
    streamed.update_weights(iter_full_weights(model, dtype=torch.bfloat16, device=streamed.weights_device), 1)
    loaded = dict(streamed.model.named_parameters())
    for name, p in from_dict.model.named_parameters():
        assert torch.equal(p, loaded[name]), name
        assert not torch.equal(p, before[name]), name  # every weight moved to the new version
    partial = full_weights(model)
    del partial["model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        streamed.update_weights(partial, 2)


@pytest.mark.parametrize("held_in_float32", [True, False])
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_update_weights_then_generate_matches_an_engine_built_from_those_weights(
    tiny_path, tmp_path, monkeypatch, quantization, held_in_float32
):
    """update_weights rounds the new float32 weights to bf16 (then int8 and back) into whatever storage the engine
    holds, as loading them from disk does: the same tokens and bit-identical log-probs from the same RNG state.
    Both storages on any CPU: the float32 one is what a CPU without native bf16 matmul gets."""
    monkeypatch.setattr(builtin, "lacks_native_low_precision_matmul", lambda device, dtype: held_in_float32)
    model = load_model(tiny_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(tmp_path)
    updated = BuiltinEngine(tiny_path, dtype="bfloat16", quantization=quantization)
    updated.update_weights(full_weights(model), 1)
    fresh = BuiltinEngine(tmp_path, dtype="bfloat16", quantization=quantization)
    fresh.version = 1
    reqs = _requests(load_tokenizer(tiny_path), 3)
    a, b = updated.generate(reqs), fresh.generate(reqs)
    assert [(o.output_ids, o.output_logprobs, o.output_versions) for o in a] == [
        (o.output_ids, o.output_logprobs, o.output_versions) for o in b
    ]
    assert updated.resident_weight_bytes() == _weight_bytes_held(model, held_in_float32)


@pytest.mark.parametrize("held_in_float32", [True, False])
def test_a_sleeping_engine_holds_no_weights_and_generates_as_before_once_it_takes_new_ones(
    tiny_path, monkeypatch, held_in_float32
):
    """`sleep` frees every parameter's tensor and the prefix cache; `update_weights` allocates them again, in their
    shapes: the same tokens and bit-identical log-probs, stamped with the new version, as an engine that stayed
    awake through the same update."""
    monkeypatch.setattr(builtin, "lacks_native_low_precision_matmul", lambda device, dtype: held_in_float32)
    model = load_model(tiny_path)
    reqs = _requests(load_tokenizer(tiny_path), 3)
    awake, sleeper = (BuiltinEngine(tiny_path, dtype="bfloat16", seed=5) for _ in range(2))
    shapes = [p.shape for p in sleeper.model.parameters()]
    awake.generate(reqs)
    ran = reqs[0].prompt_ids + sleeper.generate(reqs)[0].output_ids  # its KV is in the prefix cache
    held = sleeper.prefix_cache.longest_prefix(0, ran)[1]
    sleeper.sleep()
    assert held >= 16 and sleeper.prefix_cache.longest_prefix(0, ran)[1] == 0
    assert sleeper.asleep and sleeper.resident_weight_bytes() == 0
    assert all(p.untyped_storage().nbytes() == 0 for p in sleeper.model.parameters())
    for engine in (awake, sleeper):
        engine.update_weights(full_weights(model), 1)
    assert not sleeper.asleep and sleeper.resident_weight_bytes() == _weight_bytes_held(model, held_in_float32)
    assert [p.shape for p in sleeper.model.parameters()] == shapes
    a, b = awake.generate(reqs), sleeper.generate(reqs)
    assert [(o.output_ids, o.output_logprobs, o.output_versions) for o in b] == [
        (o.output_ids, o.output_logprobs, o.output_versions) for o in a
    ]
    assert {v for o in b for v in o.output_versions} == {1}


def test_an_engine_with_weights_mapped_from_their_file_sleeps_and_refuses_to_generate_asleep(tiny_path, tmp_path):
    """A checkpoint already in the engine's dtype loads memory-mapped on the CPU (storage that cannot be resized):
    it sleeps all the same, a second sleep changes nothing, generating while asleep is refused, and the next
    weights bring it back."""
    model = load_model(tiny_path).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    engine = BuiltinEngine(tmp_path, dtype="bfloat16", seed=5)
    assert not all(p.untyped_storage().resizable() for p in engine.model.parameters())  # mapped from the file
    reqs = _requests(load_tokenizer(tiny_path), 2)
    before = engine.generate(reqs)
    engine.sleep()
    engine.sleep()
    assert engine.resident_weight_bytes() == 0
    with pytest.raises(RuntimeError, match="the engine sleeps until `update_weights`"):
        engine.generate(reqs)
    engine.update_weights(full_weights(model), 0)
    engine.generator.manual_seed(5)
    after = engine.generate(reqs)
    assert [(o.output_ids, o.output_logprobs) for o in after] == [(o.output_ids, o.output_logprobs) for o in before]


def test_cpu_attention_sums_in_float32_and_rounds_only_its_output():
    """Hand-checkable: one query on keys [0, 0] (equal scores, weights 1/2 each) and values 256 and 258 gives 257,
    which bf16 cannot hold (ulp 2 at 256): the output is 257 rounded to even, 256, in bf16."""
    q = torch.zeros(1, 1, 1, 2, dtype=torch.bfloat16)
    k = torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)
    v = torch.tensor([[[[256.0, 0.0], [258.0, 0.0]]]], dtype=torch.bfloat16)
    out, _ = builtin._cpu_sdpa(types.SimpleNamespace(is_causal=False), q, k, v, None, scaling=1.0)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1, 1, 2) and out[0, 0, 0, 0].item() == 256.0


@pytest.mark.parametrize(
    "case",
    [
        "decode with a padding mask",
        "prefill with a mask",
        "causal prefill, no mask",
        "static-cache prefill",
        "additive position bias",
    ],
)
def test_cpu_attention_reads_grouped_kv_heads_in_place_and_matches_transformers_sdpa(case):
    """4 query heads on 2 KV heads: the same numbers (float32 rounding) as transformers' sdpa, which copies each KV
    head out to its 2 query heads, on float32 inputs; in every case the engine meets (a 1-token decode step with
    rows padded on the left, a prefill after cached tokens, a prefill from scratch, and a static
    cache's first prefill with no mask and an additive position bias, which go to transformers' own path)."""
    q_length, kv_length = {"causal prefill, no mask": (6, 6), "decode with a padding mask": (1, 9)}.get(case, (4, 9))
    q, k, v = (
        torch.randn(3, heads, n, 8, generator=torch.Generator().manual_seed(i))
        for i, (heads, n) in enumerate([(4, q_length), (2, kv_length), (2, kv_length)])
    )
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    mask, extra = (
        None,
        {},
    )  # a static cache's first prefill: keys past the query are empty slots, transformers drops them
    if case in ("decode with a padding mask", "prefill with a mask", "additive position bias"):
        causal = torch.ones(q_length, kv_length, dtype=torch.bool).tril(kv_length - q_length)
        mask = causal.expand(3, 1, q_length, kv_length).clone()
        mask[0, :, :, :3] = False  # row 0 left-padded by 3
    if case == "additive position bias":
        extra["position_bias"] = torch.randn(1, 4, q_length, kv_length, generator=torch.Generator().manual_seed(9))
    ours, _ = builtin._cpu_sdpa(module, q, k, v, mask, scaling=0.35, **extra)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.35, **extra)
    if extra:  # the bias moves every output: dropping it would not go unseen
        unbiased, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.35)
        assert (theirs - unbiased).abs().max() > 0.1
    assert ours.shape == theirs.shape == (3, q_length, 4, 8)  # [batch, query, heads, head dim], as transformers
    assert torch.allclose(ours, theirs, atol=1e-6)
    if mask is not None:  # keys masked for row 0 weigh nothing: changing them changes nothing
        k2, v2 = k.clone(), v.clone()
        k2[0, :, :3], v2[0, :, :3] = 100.0, -100.0
        again, _ = builtin._cpu_sdpa(module, q, k2, v2, mask, scaling=0.35, **extra)
        assert torch.equal(again[0], ours[0])


def test_cpu_attention_moves_only_the_parts_of_a_composite_model_that_run_sdpa():
    """A tiny Gemma 3 with text and vision parts, its vision part pinned to eager: the model and its text part move
    to the CPU attention, the vision part stays eager (setting one name for all would move it, or raise where it
    cannot run sdpa)."""
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text |= dict(num_key_value_heads=2, head_dim=16, vocab_size=300)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision |= dict(image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    model.set_attn_implementation({"vision_config": "eager"})
    use_cpu_attention_(model)
    config = model.config
    assert (config._attn_implementation, config.text_config._attn_implementation) == (CPU_SDPA, CPU_SDPA)
    assert config.vision_config._attn_implementation == "eager"


def test_cpu_engines_take_the_cpu_attention(tiny_path, monkeypatch):
    """Every CPU engine, float32 or bf16, bf16 emulated or native: the CPU attention (on a native-bf16 CPU torch's bf16
    attention kernel is still ~5x slower than float32 sums: docs/benchmarks.md)."""
    assert BuiltinEngine(tiny_path, dtype="float32").model.config._attn_implementation == CPU_SDPA
    monkeypatch.setattr(builtin, "lacks_native_low_precision_matmul", lambda device, dtype: True)
    engine = BuiltinEngine(tiny_path, dtype="bfloat16")
    assert engine.model.config._attn_implementation == CPU_SDPA
    assert engine.model.lm_head.weight.dtype == torch.float32
    monkeypatch.setattr(builtin, "lacks_native_low_precision_matmul", lambda device, dtype: False)
    engine = BuiltinEngine(tiny_path, dtype="bfloat16")
    assert engine.model.config._attn_implementation == CPU_SDPA
    assert engine.model.lm_head.weight.dtype == torch.bfloat16


def test_only_cpu_low_precision_engines_take_the_float32_accumulation_path():
    assert not lacks_native_low_precision_matmul(torch.device("cpu"), torch.float32)
    assert not lacks_native_low_precision_matmul(torch.device("cuda"), torch.bfloat16)
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert lacks_native_low_precision_matmul(torch.device("cpu"), torch.bfloat16) == (not native_bf16)


def test_int8_and_logit_noise_widen_the_gap(tiny_path, tokenizer):
    model = load_model(tiny_path)
    base = _deltas(model, r := _requests(tokenizer, 4), BuiltinEngine(tiny_path, dtype="float32").generate(r)).mean()
    q = _deltas(
        model, r := _requests(tokenizer, 4), BuiltinEngine(tiny_path, dtype="float32", quantization="int8").generate(r)
    ).mean()
    noisy = _deltas(
        model, r := _requests(tokenizer, 4), BuiltinEngine(tiny_path, dtype="float32", logit_noise_std=0.5).generate(r)
    ).mean()
    assert q > base * 10 and noisy > base * 10


def test_stop_token_and_stop_string_and_length(tiny_path, tokenizer):
    engine = BuiltinEngine(tiny_path, dtype="float32", tokenizer=tokenizer)
    req = _requests(tokenizer, 1, max_new=6)[0]
    out = engine.generate([req])[0]
    assert out.finish_reason == "length" and len(out.output_ids) == 6
    first = out.output_ids[0]
    engine2 = BuiltinEngine(tiny_path, dtype="float32", tokenizer=tokenizer)  # same seed: same first token
    req_stop = GenerationRequest(0, req.prompt_ids, SamplingParams(max_new_tokens=6, stop_token_ids=[first]))
    out2 = engine2.generate([req_stop])[0]
    assert out2.finish_reason == "stop" and out2.output_ids == [first]
    text = tokenizer.decode([first])
    engine3 = BuiltinEngine(tiny_path, dtype="float32", tokenizer=tokenizer)
    out3 = engine3.generate([GenerationRequest(0, req.prompt_ids, SamplingParams(max_new_tokens=6, stop=[text]))])[0]
    assert out3.finish_reason == "stop" and len(out3.output_ids) == 1


def test_pause_continue_under_new_version_keeps_prefix_and_stamps(tiny_path, tokenizer):
    engine = BuiltinEngine(tiny_path, dtype="float32", tokenizer=tokenizer)
    req = _requests(tokenizer, 1, max_new=40)[0]
    k = 5
    # Pause from another thread once k tokens exist: the engine stops at the next token boundary.
    original = engine._stopped
    seen = []

    def spy(request, ids, token):
        seen.append(len(ids))
        if len(ids) == k:
            pause_from_another_thread(engine)
        return original(request, ids, token)

    engine._stopped = spy
    first = engine.generate([req])[0]
    engine._stopped = original
    assert first.finish_reason == "paused" and len(first.output_ids) == k
    model = load_model(tiny_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.update_weights(full_weights(model), 1)
    engine.resume()
    final = engine.generate([first.as_continuation(req)])[0]
    assert final.output_ids[:k] == first.output_ids
    assert final.output_logprobs[:k] == first.output_logprobs
    assert final.output_versions == [0] * k + [1] * (len(final.output_ids) - k)
    assert len(final.output_ids) == 40
    # tokens after the update are scored by the new weights
    lp = score_sequences(model, [req.prompt_ids + final.output_ids], Numerics())[0][len(req.prompt_ids) :]
    assert (lp[k:] - torch.tensor(final.output_logprobs[k:])).abs().max() < 1e-5


def test_generate_while_paused_returns_immediately(tiny_path, tokenizer):
    engine = BuiltinEngine(tiny_path, dtype="float32")
    engine.pause()
    out = engine.generate(_requests(tokenizer, 2))
    assert [o.finish_reason for o in out] == ["paused", "paused"] and all(not o.output_ids for o in out)


def test_factory_model_reloads_through_generic_loader(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert model(torch.tensor([ids])).logits.shape[-1] == len(tok)
