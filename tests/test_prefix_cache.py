"""The built-in engine's prefix cache: reused KV gives the numbers of a fresh prefill, never outlives the weights
that made it, and saves the prefill the counters say (tiny model: 2 layers, 2 KV heads of 16 dims)."""

import pytest
import torch
from conftest import pause_from_another_thread

from twofold.engine.base import GenerationRequest, SamplingParams
from twofold.engine.builtin import BuiltinEngine
from twofold.engine.prefix_cache import PrefixCache, shared_prefixes
from twofold.models import full_weights, load_model


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = _tokens(0, 40)  # the system prompt every episode starts with
A, B, C, D = (_tokens(seed, 8) for seed in (1, 2, 3, 4))  # first observations (they differ at their first token)
# KV per token of the float32 tiny model: 2 layers x (keys, values) x 2 heads x 16 dims x 4 bytes
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4


def _params(max_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, stop_token_ids=[])


def _outputs(results) -> list[tuple]:
    return [(o.output_ids, o.output_versions) for o in results]


def _logprobs(results) -> torch.Tensor:
    return torch.tensor([lp for o in results for lp in o.output_logprobs])


def _next_turn(request: GenerationRequest, result, observation: list[int]) -> GenerationRequest:
    return GenerationRequest(request.request_id, request.prompt_ids + result.output_ids + observation, request.params)


def test_a_cached_second_turn_samples_as_a_fresh_prefill_would(tiny_path):
    """float32: the same tokens, log-probs within 1e-5 (float32 sums in another order), the same versions, and
    the same RNG draws (the cache consumes no randomness), with a batch mixing reused and new contexts."""
    cached = BuiltinEngine(tiny_path, dtype="float32")
    fresh = BuiltinEngine(tiny_path, dtype="float32", prefix_cache_bytes=0)
    first = [GenerationRequest(0, SYSTEM + A, _params(6)), GenerationRequest(1, SYSTEM + B, _params(6))]
    out = cached.generate(first)
    assert _outputs(out) == _outputs(fresh.generate(first))
    new_episode = GenerationRequest(2, SYSTEM + D, _params(6))
    second = [_next_turn(first[0], out[0], C), _next_turn(first[1], out[1], D), new_episode]
    reused_before = cached.reused_tokens
    a, b = cached.generate(second), fresh.generate(second)
    assert _outputs(a) == _outputs(b)
    assert (_logprobs(a) - _logprobs(b)).abs().max() < 1e-5
    assert torch.equal(cached.generator.get_state(), fresh.generator.get_state())
    # each episode's turn-1 prompt and 5 of its 6 replies (the last was sampled, never fed) come from the cache;
    # so does the new episode's system prompt
    assert cached.reused_tokens - reused_before == 2 * (48 + 5) + 40 and fresh.reused_tokens == 0


def test_a_bfloat16_cached_prefill_is_within_two_ulps_of_a_fresh_one(tiny_path):
    """bfloat16 keeps 8 significant bits: a cached prefix's KV came from other shapes (decode steps, another batch),
    so a rounding may land one ulp apart; the log-probs stay within 2 bf16 ulps of the largest logit (eps 2^-7)."""
    cached = BuiltinEngine(tiny_path, dtype="bfloat16")
    fresh = BuiltinEngine(tiny_path, dtype="bfloat16", prefix_cache_bytes=0)
    first = [GenerationRequest(i, SYSTEM + obs, _params(6)) for i, obs in enumerate((A, B))]
    out = cached.generate(first)
    contexts = [r.prompt_ids + o.output_ids + C for r, o in zip(first, out, strict=True)] + [SYSTEM + D]
    with torch.no_grad():
        reused, new = cached._prefill(contexts)[2], fresh._prefill(contexts)[2]
    assert cached.reused_tokens > 0
    tolerance = 2 * torch.finfo(torch.bfloat16).eps * new.abs().max()
    assert (reused.log_softmax(-1) - new.log_softmax(-1)).abs().max() <= tolerance


def test_nothing_is_reused_after_a_weight_update(tiny_path, tmp_path):
    """After update_weights the next turn prefills everything and samples as an engine built from the new weights
    (log-probs within 1e-5); KV of the old weights (here 0.05 away) would miss that by far more."""
    model = load_model(tiny_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(tmp_path)
    engine, at_new_weights = BuiltinEngine(tiny_path, dtype="float32"), BuiltinEngine(tmp_path, dtype="float32")
    first = GenerationRequest(0, SYSTEM + A, _params(6))
    second = _next_turn(first, engine.generate([first])[0], C)
    engine.update_weights(full_weights(model), 1)
    at_new_weights.version = 1
    engine.generator.manual_seed(7), at_new_weights.generator.manual_seed(7)
    reused, prefilled = engine.reused_tokens, engine.prefilled_tokens
    a, b = engine.generate([second]), at_new_weights.generate([second])
    assert engine.reused_tokens == reused and engine.prefilled_tokens - prefilled == len(second.prompt_ids) == 62
    assert _outputs(a) == _outputs(b) and a[0].output_versions == [1] * 6
    assert (_logprobs(a) - _logprobs(b)).abs().max() < 1e-5


def test_counters_across_calls_and_episodes(tiny_path):
    engine = BuiltinEngine(tiny_path, dtype="float32")
    first = GenerationRequest(0, SYSTEM + A, _params(4))
    out = engine.generate([first])[0]  # 48 tokens prefilled; KV of 48 + 3 replies kept
    assert (engine.prefilled_tokens, engine.reused_tokens) == (48, 0)
    engine.generate([GenerationRequest(1, SYSTEM + B, _params(4))])  # shares the 40-token system prompt
    assert (engine.prefilled_tokens, engine.reused_tokens) == (48 + 8, 40)
    engine.generate([_next_turn(first, out, C)])  # 48 + 4 + 8 tokens, the first 51 cached
    assert (engine.prefilled_tokens, engine.reused_tokens) == (48 + 8 + 9, 40 + 51)
    # kept: episode 1's turn 2 (60 + 3 tokens: it replaced its turn 1) and episode 2's turn 1 (48 + 3)
    assert engine.prefix_cache.bytes == (63 + 51) * KV_BYTES_PER_TOKEN
    assert engine.resident_cache_bytes() == (63 + 51) * KV_BYTES_PER_TOKEN  # memory/engine_prefix_cache_bytes
    assert engine.prefill_metrics() == {
        "engine/prefilled_tokens": 65,
        "engine/reused_tokens": 91,
        "engine/joined_requests": 0,
    }


def test_a_batch_prefills_a_shared_prompt_once(tiny_path):
    """Four copies of a 48-token prompt (a GRPO group's first turn): its first 47 tokens once, then each row its
    last token (whose logits it samples from) on the cached 47; without the cache, 4 x 48."""
    engine = BuiltinEngine(tiny_path, dtype="float32")
    without = BuiltinEngine(tiny_path, dtype="float32", prefix_cache_bytes=0)
    group = [GenerationRequest(i, SYSTEM + A, _params(3)) for i in range(4)]
    a, b = engine.generate(group), without.generate(group)
    assert (engine.prefilled_tokens, engine.reused_tokens) == (47 + 4, 4 * 47)
    assert (without.prefilled_tokens, without.reused_tokens) == (4 * 48, 0)
    assert _outputs(a) == _outputs(b) and (_logprobs(a) - _logprobs(b)).abs().max() < 1e-5


def test_a_paused_request_continues_on_its_own_kv_as_if_never_paused(tiny_path):
    """Paused after 5 tokens and continued at the same version: the row's 48 + 5 fed tokens are cached, so only
    the last one is fed again, and tokens, log-probs and versions are those of a run that never paused."""
    engine, straight = BuiltinEngine(tiny_path, dtype="float32"), BuiltinEngine(tiny_path, dtype="float32")
    request = GenerationRequest(0, SYSTEM + A, _params(12))
    original = engine._stopped

    def pause_at_five(req, ids, token):
        if len(ids) == 5:
            pause_from_another_thread(engine)
        return original(req, ids, token)

    engine._stopped = pause_at_five
    paused = engine.generate([request])[0]
    engine._stopped = original
    engine.resume()
    assert paused.finish_reason == "paused" and len(paused.output_ids) == 5
    final = engine.generate([paused.as_continuation(request)])
    assert (engine.prefilled_tokens, engine.reused_tokens) == (48 + 1, 52)
    whole = straight.generate([request])
    assert _outputs(final) == _outputs(whole) and (_logprobs(final) - _logprobs(whole)).abs().max() < 1e-5


def _kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer, one head, one dim of float32: 8 bytes per token."""
    return [(torch.zeros(1, n, 1), torch.zeros(1, n, 1))]


def test_cache_evicts_least_recently_used_first_and_keys_by_version():
    cache = PrefixCache(max_bytes=8 * 40)  # room for 40 tokens
    x, y, z = ([k] * 16 for k in (5, 6, 7))
    cache.insert(0, x, _kv(16))
    cache.insert(0, y, _kv(16))
    assert cache.longest_prefix(0, x + [1])[1] == 16  # x is now the most recently used
    cache.insert(0, z, _kv(16))  # 48 tokens > 40: y, the least recently used, goes
    assert [cache.longest_prefix(0, t)[1] for t in (x, y, z)] == [16, 0, 16] and cache.bytes == 8 * 32
    cache.insert(0, x + [1, 2], _kv(18))  # extends x, which it replaces
    assert cache.bytes == 8 * (16 + 18) and cache.longest_prefix(0, x + [1, 2, 3])[1] == 18
    cache.insert(0, [9] * 15, _kv(15))  # shorter than a block: no lookup could find it, so it is not kept
    assert cache.bytes == 8 * 34
    assert cache.longest_prefix(1, x)[1] == 0 and cache.bytes == 0  # another version: nothing of version 0 serves


def test_cache_finds_the_longest_prefix_across_entries():
    cache = PrefixCache()
    cache.insert(0, SYSTEM + A, _kv(48))
    cache.insert(0, SYSTEM + B, _kv(48))
    entry, n = cache.longest_prefix(0, SYSTEM + A[:5] + C)
    assert n == 45 and entry.tokens == SYSTEM + A
    assert cache.longest_prefix(0, SYSTEM[:15])[1] == 0  # shorter than a block


@pytest.mark.parametrize(
    ("seqs", "expected"),
    [
        ([[1] * 20 + [2], [1] * 20 + [3], [5] * 17], [[1] * 20]),
        ([[1] * 20 + [2], [1] * 20 + [2]], [[1] * 20 + [2]]),  # equal sequences share all of themselves
        ([[1] * 30, [1] * 20 + [2], [1] * 20 + [3]], [[1] * 20]),
        ([[1] * 10 + [2], [1] * 10 + [3]], []),  # shorter than a block: never worth a forward of its own
    ],
)
def test_shared_prefixes_are_the_branch_points(seqs, expected):
    assert shared_prefixes(seqs) == expected
