"""What the GPU paths need of the device, checked on a CPU machine: the device a collective's tensor lives on, the
CPU ByteTensor a CUDA generator's `set_state` takes, a checkpoint that cannot run code, and the GPUs a config
may count (issue #35, items 1, 2, 9 and 10), and the imports local ranks are forked after."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import small_config
from torch.distributed.checkpoint.api import CheckpointException

from twofold.config import ConfigError, EngineConfig, load_config
from twofold.distributed import Ranks, collective_device, init_ranks, spawn_ranks
from twofold.engine.placement import (
    ipc_buffer_bytes,
    publish_bytes,
    sleep_frees_trainer_gpu,
    weight_transfer_path,
)
from twofold.models import file_sha256
from twofold.pipeline.checkpoint import (
    MANIFEST,
    RunParts,
    _tensor_state,
    latest_checkpoint,
    restore_run,
    save_checkpoint,
    verify,
)
from twofold.rollout.versions import Admission
from twofold.trainer.trainer import Trainer

# --------------------------------------------------------------------------- item 1: the collectives' device


@pytest.mark.parametrize(
    "backend_config,device",
    [
        ("cpu:gloo,cuda:gloo", "cpu"),  # init_process_group("gloo"): the value is in host memory, no copy
        ("cuda:nccl", "cuda"),  # init_process_group("nccl"): NCCL serves CUDA tensors only
        ("cpu:gloo,cuda:nccl", "cpu"),
        ("cuda:gloo", "cuda"),
    ],
)
def test_collective_device_is_one_the_group_serves(backend_config, device):
    assert collective_device(backend_config) == torch.device(device)


def _all_reduce_on_gloo(rank, world, address, port):
    ranks = init_ranks(rank, world, address, port, torch.device("cpu"))
    assert ranks.device == torch.device("cpu")
    # rank 0 gives 1.0, rank 1 gives 2.0: sum 3.0, max 2.0
    assert ranks.all_reduce(rank + 1.0) == 3.0
    assert ranks.all_reduce(rank + 1.0, "max") == 2.0


def test_ranks_all_reduce_on_a_cpu_group():
    spawn_ranks(_all_reduce_on_gloo, 2)


def _all_reduce_without_a_cpu_backend(rank, world, address, port):
    # 'cuda:gloo' maps only CUDA tensors to a backend, as NCCL's group does. The store is our own so that the
    # ranks can wait for each other at the end: this group has no barrier (it serves no CPU tensor), and rank 0
    # leaving first would take the store away from a rank still connecting.
    store = dist.TCPStore(address, port, world, is_master=rank == 0)
    dist.init_process_group("cuda:gloo", store=store, rank=rank, world_size=world)
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.tensor([1.0], dtype=torch.float64))
    ranks = Ranks(rank, world)
    assert ranks.device == torch.device("cuda")
    with pytest.raises((AssertionError, RuntimeError)) as refused:
        ranks.all_reduce(1.0)
    assert "No backend type" not in str(refused.value)
    assert "CUDA" in str(refused.value)
    store.set(f"done{rank}", "1")
    store.wait([f"done{r}" for r in range(world)])
    # the store lives in rank 0: it must outlive every other rank's last request, or that request's reply is cut
    if rank:
        store.set(f"left{rank}", "1")
    else:
        store.wait([f"left{r}" for r in range(1, world)])


def test_ranks_all_reduce_hands_the_group_a_tensor_on_the_device_it_serves():
    """Under NCCL a collective's tensor must be a CUDA tensor; a CPU one raises 'No backend type associated with
    device type cpu', at the trainer's first micro-batch plan (`deal_rows`). A gloo group whose backend map has only
    CUDA reproduces that refusal on this machine (checked first, with the CPU tensor the old `all_reduce` made).
    What this machine cannot show is the collective succeeding: `Ranks.all_reduce` now makes its tensor on CUDA,
    which a CPU build of torch refuses to make ('Torch not compiled with CUDA enabled'), so the test checks that it
    fails for that reason and no longer for the group's."""
    spawn_ranks(_all_reduce_without_a_cpu_backend, 2)


# --------------------------------------------------------------------------- item 2: RNG states on a GPU


class CudaLikeGenerator:
    """A CUDA generator as checkpointing sees it: its `device` is a GPU, `get_state` gives a CPU ByteTensor and
    `set_state` takes nothing else (torch's CUDA generator raises for any other tensor). The state itself is a CPU
    generator's, so draws can be compared."""

    device = torch.device("cuda", 0)

    def __init__(self, seed: int):
        self.cpu = torch.Generator().manual_seed(seed)

    def get_state(self) -> torch.Tensor:
        return self.cpu.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        if state.device.type != "cpu" or state.dtype != torch.uint8:
            raise TypeError(f"RNG state must be a torch.ByteTensor on the CPU, got {state.dtype} on {state.device}")
        self.cpu.set_state(state)

    def draw(self) -> float:
        return torch.rand(1, generator=self.cpu).item()


class NoSourceState:
    def state_dict(self) -> dict:
        return {}


class Engine:
    def __init__(self, generator):
        self.generator = generator


def run_parts(run_dir, engine=None) -> RunParts:
    trainer = Trainer(torch.nn.Linear(3, 2), small_config())
    return RunParts(run_dir, trainer, Admission(1, 2, "drop"), Ranks(), engine, keep_checkpoints=2)


def test_the_engines_gpu_generator_resumes_from_a_cpu_byte_tensor(tmp_path):
    generator = CudaLikeGenerator(seed=3)
    parts = run_parts(tmp_path, Engine(generator))
    path = save_checkpoint(parts, 1, NoSourceState())
    after_save = generator.draw()
    generator.draw()
    restore_run(parts, path)
    assert generator.draw() == after_save


def test_the_trainers_gpu_rng_is_saved_and_restored(tmp_path, monkeypatch):
    """A trainer on cuda:0 keeps that GPU's default generator (dropout, sampling on the device) in the checkpoint;
    `torch.cuda`'s RNG functions are stood in for by a `CudaLikeGenerator`."""
    gpu = CudaLikeGenerator(seed=5)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: asked.append(device) or gpu.get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: asked.append(device) or gpu.set_state(state))
    parts = run_parts(tmp_path)
    parts.trainer.numerics = dataclasses.replace(parts.trainer.numerics, device=torch.device("cuda", 0))
    path = save_checkpoint(parts, 1, NoSourceState())
    after_save = gpu.draw()
    gpu.draw()
    restore_run(parts, path)
    assert gpu.draw() == after_save
    assert set(asked) == {torch.device("cuda", 0)}


def test_a_checkpoint_saved_on_cpu_resumes_on_a_gpu_with_the_gpus_rng_as_it_was(tmp_path, monkeypatch):
    gpu = CudaLikeGenerator(seed=5)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpu.get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: gpu.set_state(state))
    path = save_checkpoint(run_parts(tmp_path), 1, NoSourceState())
    parts = run_parts(tmp_path)
    parts.trainer.numerics = dataclasses.replace(parts.trainer.numerics, device=torch.device("cuda", 0))
    expected = CudaLikeGenerator(seed=5).draw()
    restore_run(parts, path)
    assert gpu.draw() == expected


# --------------------------------------------------------------------------- item 9: a crafted checkpoint


class Payload:
    """What a crafted checkpoint would run on load: here, create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_checkpoint(tmp_path):
    """A real checkpoint whose DCP part is rewritten with a pickled object in place of the torch RNG state (DCP's
    own save marks it `BytesStorageMetadata`: every class in `.metadata` is DCP's), its manifest recomputed."""
    parts = run_parts(tmp_path)
    path = save_checkpoint(parts, 1, NoSourceState())
    marker = tmp_path / "payload_ran"
    state = _tensor_state(parts.trainer)
    state["rng"]["torch"] = Payload(marker)
    for p in path.glob("*.distcp"):
        p.unlink()
    dcp.save({**state, "source": {}}, checkpoint_id=str(path), no_dist=True)
    files = {p.name: [p.stat().st_size, file_sha256(p)] for p in sorted(path.iterdir()) if p.name != MANIFEST}
    (path / MANIFEST).write_text(json.dumps(files))
    return parts, path, marker


def test_a_checkpoint_holding_pickled_bytes_is_refused_before_it_is_loaded(tmp_path):
    parts, path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(CheckpointException, match="rng.torch as pickled bytes"):  # DCP wraps the reader's refusal
        restore_run(parts, path)
    assert not marker.exists()
    assert "rng.torch as pickled bytes" in verify(path)
    assert latest_checkpoint(tmp_path) is None  # a resume starts afresh


# --------------------------------------------------------------------------- item 10: whose GPUs a config counts


@pytest.fixture
def one_gpu(monkeypatch):
    """This machine as one with a single GPU, for the config's checks (nothing is placed on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


TWO_RANKS_ON_CUDA = ["trainer.device=cuda", "trainer.world_size=2"]
ON_A_CLUSTER = ["runtime.backend=ray", "runtime.ray.address=auto"]


def test_local_ranks_need_a_gpu_each(one_gpu):
    with pytest.raises(ConfigError, match="trainer.world_size.*2 GPUs; this machine has 1"):
        load_config("configs/frozenlake.yaml", TWO_RANKS_ON_CUDA)


def test_a_local_ray_cluster_has_only_this_machines_gpus(one_gpu):
    with pytest.raises(ConfigError, match="trainer.world_size"):
        load_config("configs/frozenlake.yaml", [*TWO_RANKS_ON_CUDA, "runtime.backend=ray"])


def test_ranks_placed_on_a_ray_cluster_do_not_count_this_machines_gpus(one_gpu):
    cfg = load_config("configs/frozenlake.yaml", [*TWO_RANKS_ON_CUDA, *ON_A_CLUSTER])
    assert (cfg.trainer.world_size, cfg.trainer.device) == (2, "cuda")


def test_a_ray_cluster_driver_needs_no_gpu_of_its_own(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    overrides = [*TWO_RANKS_ON_CUDA, "engine.device=cuda:1"]
    assert load_config("configs/frozenlake.yaml", [*overrides, *ON_A_CLUSTER]).engine.device == "cuda:1"
    with pytest.raises(ConfigError, match="engine.device"):  # still a device's name
        load_config("configs/frozenlake.yaml", [*overrides, *ON_A_CLUSTER, "engine.device=gpu"])
    with pytest.raises(ConfigError, match="trainer.device"):  # a Ray cluster started here is this machine
        load_config("configs/frozenlake.yaml", [*overrides, "runtime.backend=ray"])


# --------------------------------------------------------------------------- vLLM's weight-transfer path


def vllm_engine(**fields) -> EngineConfig:
    return EngineConfig(backend="vllm", **fields)


@pytest.mark.parametrize(
    ("engine", "trainer", "on_gpu", "path"),
    [
        (vllm_engine(), "cpu", False, "host"),  # vLLM's CPU build
        (vllm_engine(device="cuda:1"), "cpu", True, "host"),  # the trainer on the CPU: its weights are on the host
        (vllm_engine(), "cuda:0", True, "ipc"),  # auto: GPU 0, the trainer's
        (vllm_engine(device="cuda:0"), "cuda", True, "ipc"),  # "cuda" is GPU 0
        (vllm_engine(device="cuda:1"), "cuda:1", True, "ipc"),
        (vllm_engine(device="cuda:1"), "cuda:0", True, "nccl"),
        (vllm_engine(device="cuda:2", tensor_parallel_size=2), "cuda:0", True, "nccl"),  # GPUs 2-3
        (vllm_engine(device="cuda:0", tensor_parallel_size=2), "cuda:0", True, "host"),  # GPUs 0-1: neither fits
    ],
)
def test_auto_takes_the_weight_transfer_the_placement_allows(engine, trainer, on_gpu, path):
    assert weight_transfer_path(engine, trainer, engine_on_gpu=on_gpu) == path


def test_a_weight_transfer_the_placement_rules_out_is_refused_with_the_devices():
    shared, apart = vllm_engine(device="cuda:0", weight_transfer="nccl"), vllm_engine(device="cuda:1")
    with pytest.raises(ConfigError, match=r"engine.weight_transfer.*trainer on cuda:0, engine on cuda:0"):
        weight_transfer_path(shared, "cuda:0", engine_on_gpu=True)  # NCCL: one rank per GPU
    with pytest.raises(ConfigError, match=r"engine.weight_transfer.*ipc.*engine on cuda:1"):
        weight_transfer_path(dataclasses.replace(apart, weight_transfer="ipc"), "cuda:0", engine_on_gpu=True)
    with pytest.raises(ConfigError, match=r"engine.weight_transfer.*engine on the CPU"):
        weight_transfer_path(dataclasses.replace(apart, weight_transfer="ipc"), "cpu", engine_on_gpu=False)
    assert weight_transfer_path(dataclasses.replace(apart, weight_transfer="host"), "cuda:0", True) == "host"


def test_a_vllm_weight_transfer_is_refused_for_the_builtin_engine():
    with pytest.raises(ConfigError, match="engine.weight_transfer.*built-in engine loads in place"):
        load_config("configs/frozenlake.yaml", ["engine.weight_transfer=ipc"])
    assert load_config("configs/frozenlake.yaml", ["engine.weight_transfer=host"]).engine.weight_transfer == "host"
    on_ray = ["engine.backend=vllm", "runtime.backend=ray", "engine.weight_transfer=nccl"]
    with pytest.raises(ConfigError, match="engine.weight_transfer.*on Ray the engines are actors"):
        load_config("configs/frozenlake.yaml", on_ray)


@pytest.mark.parametrize(
    ("engine", "trainer", "frees"),
    [
        (vllm_engine(), "cuda:0", True),  # auto: GPU 0, the trainer's
        (vllm_engine(device="cuda:0"), "cuda", True),
        (vllm_engine(device="cuda:0", tensor_parallel_size=2), "cuda:1", True),  # GPUs 0-1 hold the trainer's
        (vllm_engine(device="cuda:1"), "cuda:0", False),  # a GPU of its own
        (vllm_engine(), "cpu", False),  # nothing of the trainer's is on a GPU
    ],
)
def test_vllm_sleeping_frees_trainer_memory_only_on_the_trainers_gpu(engine, trainer, frees):
    assert sleep_frees_trainer_gpu(engine, trainer) is frees


def test_a_packed_publication_holds_buffers_and_weights_not_the_model():
    """vLLM 0.32's packed senders: ipc, a buffer of max(1 GiB, L), the worker's clone of it, and two weights in
    flight; nccl, three chunks of up to 1 GiB + L (two sent, one being assembled). For 7B's embedding L =
    152,064 x 3,584 x 2 = 1,089,994,752: ipc 4L = 4,359,979,008, nccl 3 x 2,163,736,576 = 6,491,209,728; for a
    100 MB largest weight ipc holds 2 x 1 GiB + 2 x 100 MB."""
    embedding = 152_064 * 3_584 * 2
    assert publish_bytes("ipc", embedding) == 4_359_979_008
    assert publish_bytes("nccl", embedding) == 6_491_209_728
    assert publish_bytes("ipc", 100_000_000) == 2 * 2**30 + 200_000_000
    assert ipc_buffer_bytes(100_000_000) == 2**30 and ipc_buffer_bytes(embedding) == embedding


def test_engine_sleep_is_refused_where_the_engine_never_idles_or_lives_elsewhere():
    with pytest.raises(ConfigError, match="engine.sleep.*in async mode the engine generates while the trainer"):
        load_config("configs/frozenlake.yaml", ["mode=async", "engine.sleep=true"])
    with pytest.raises(ConfigError, match="engine.sleep.*on Ray the engines are actors"):
        load_config("configs/frozenlake.yaml", ["mode=sync", "engine.sleep=true", "runtime.backend=ray"])
    assert load_config("configs/frozenlake.yaml", ["mode=sync", "engine.sleep=true"]).engine.sleep is True
    assert load_config("configs/frozenlake.yaml", ["mode=async"]).engine.sleep is None  # empty: the plan decides


CUDA_SPY = """
import sys, torch, torch.cuda
asked = []
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "get_device_properties"):
    real = getattr(torch.cuda, name)
    setattr(torch.cuda, name, lambda *a, _real=real, _name=name, **k: asked.append(_name) or _real(*a, **k))
from twofold.distributed import RANK_MODULES
for module in RANK_MODULES:
    __import__(module)
print(",".join(asked))
"""


def test_the_rank_fork_server_imports_ask_cuda_nothing():
    """Local ranks are forks of a server that imported RANK_MODULES: a CUDA driver initialised there (even by
    `torch.cuda.is_available()`) would be unusable in every forked rank."""
    out = subprocess.run([sys.executable, "-c", CUDA_SPY], check=True, capture_output=True, text=True).stdout
    assert out.strip() == ""
