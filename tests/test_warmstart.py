"""The warm-start cache key: what changes the demonstrations changes it, timing never does."""

import dataclasses
from pathlib import Path

from conftest import small_config

from twofold.models import cache_dir, fingerprint
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
