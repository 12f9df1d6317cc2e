"""The warm start: its cache key (what changes the demonstrations changes it, timing never does), resuming, and
its batches' shared system prompt run once."""

import dataclasses
from pathlib import Path

from conftest import small_config

from twofold.envs import env_from_config
from twofold.models import cache_dir, fingerprint
from twofold.prefix_tree import prefix_tree
from twofold.rollout.chat import render
from twofold.trainer import warmstart
from twofold.trainer.warmstart import WARMSTART_RECIPE, warmstart_path

BASE = Path("tiny-abc")


def test_env_timing_never_changes_the_warmstart_key():
    plain = warmstart_path(small_config(), BASE)
    slow = small_config(**{"env.step_latency_ms": 100.0, "env.step_latency_sigma": 1.0, "env.step_timeout_s": 5.0})
    assert warmstart_path(slow, BASE) == plain
    assert warmstart_path(small_config(**{"env.options": {"size": 4}}), BASE) != plain
    assert warmstart_path(small_config(**{"warmstart.noise": 0.2}), BASE) != plain


def test_key_without_latency_is_the_one_existing_caches_were_built_under():
    # The formula before timing fields were normalised: the whole env section hashed as configured.
    cfg = small_config()
    recipe = dataclasses.asdict(cfg.warmstart)
    seed = recipe.pop("seed")
    old_key = fingerprint(
        WARMSTART_RECIPE,
        BASE.name,
        recipe,
        dataclasses.asdict(cfg.env),
        cfg.rollout.max_total_tokens,
        cfg.engine.temperature,
        seed,
    )
    assert warmstart_path(cfg, BASE) == cache_dir() / "warmstart" / f"frozenlake-{old_key}"


def test_a_dataset_warmstart_key_follows_the_file_content(tmp_path):
    from twofold.envs.dataset import write_example

    path = write_example(tmp_path / "d.jsonl", "trl", n=10)
    cfg = small_config(**{"env.name": "dataset", "env.options": {"path": str(path)}})
    before = warmstart_path(cfg, BASE)
    assert warmstart_path(cfg, BASE) == before
    write_example(path, "trl", n=10, seed=1)  # other rows at the same path
    assert warmstart_path(cfg, BASE) != before


def test_an_interrupted_warmstart_resumes_to_the_uninterrupted_weights(tmp_path, tiny_path, monkeypatch):
    import pytest
    import torch

    from twofold.models import load_model
    from twofold.trainer import warmstart

    cfg = small_config(
        **{"warmstart.episodes": 24, "warmstart.batch_size": 8, "warmstart.epochs": 2, "warmstart.eval_episodes": 2}
    )  # 3 batches per epoch, 6 in all
    whole = warmstart.run_warmstart(cfg, tiny_path, tmp_path / "whole")

    class Killed(Exception):
        pass

    class DiesAtBatch5(warmstart.tqdm):
        def update(self, n=1):
            if self.n + n == 5:  # during the second epoch, after batch 4 was saved
                raise Killed
            return super().update(n)

    monkeypatch.setattr(warmstart, "PROGRESS_SECONDS", 0.0)  # save after every batch
    monkeypatch.setattr(warmstart, "tqdm", DiesAtBatch5)
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        warmstart.run_warmstart(cfg, tiny_path, out)
    saved = warmstart.progress_path(out)
    assert torch.load(saved, weights_only=True)["batches"] == 4 and not out.exists()

    trained = []

    class Counts(DiesAtBatch5.__mro__[1]):
        def update(self, n=1):
            trained.append(self.n + n)
            return super().update(n)

    monkeypatch.setattr(warmstart, "tqdm", Counts)
    warmstart.run_warmstart(cfg, tiny_path, out)
    assert trained == [5, 6]  # only the batches after the saved one
    assert not saved.exists()  # a finished warm start leaves no progress file behind
    a, b = load_model(whole, torch.float32).state_dict(), load_model(out, torch.float32).state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_each_warmstart_batch_runs_the_system_prompt_its_demonstrations_open_with_once(
    tmp_path, tiny_path, monkeypatch
):
    """FrozenLake's demonstrations all open with the chat template's system prompt: every batch's forward shares
    prefixes, and its prefix tree opens with one node, above every row, at least that long."""
    cfg = small_config(**{"warmstart.episodes": 8, "warmstart.batch_size": 4, "warmstart.eval_episodes": 1})
    calls = []

    def spy(model, ids, attn, wanted=None, packed=False, share_prefixes=False):
        calls.append((ids, attn, share_prefixes))
        return warmstart.policy_logprobs.__wrapped__(
            model, ids, attn, wanted=wanted, packed=packed, share_prefixes=share_prefixes
        )

    spy.__wrapped__ = warmstart.policy_logprobs
    monkeypatch.setattr(warmstart, "policy_logprobs", spy)
    warmstart.run_warmstart(cfg, tiny_path, tmp_path / "w")
    tokenizer = warmstart.load_tokenizer(tiny_path)
    env = env_from_config(cfg.env)
    system_turn = [m for m in env.first_messages(env.reset(0)) if m["role"] == "system"]
    system = tokenizer.encode(render(tokenizer, system_turn, generation_prompt=False), add_special_tokens=False)
    assert len(system) > 20 and len(calls) == cfg.warmstart.epochs * 2
    for ids, attn, share in calls:
        rows = [ids[r, :n].tolist() for r, n in enumerate(attn.sum(dim=1).tolist())]
        tree = prefix_tree(rows)
        opening = tree.nodes[0]
        assert share and opening.end - opening.start >= len(system)
        assert all(where[: opening.end] == list(range(opening.end)) for where in tree.where)
        assert len(tree.tokens) < sum(len(r) for r in rows) - (len(rows) - 1) * len(system)
