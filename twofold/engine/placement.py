"""Where a vLLM engine sits against the trainer: the GPUs its processes may see, and the path new weights
take to them (`engine/vllm.py`)."""

from __future__ import annotations

from collections.abc import Mapping

from twofold.config import ConfigError, EngineConfig

# vLLM's ipc and nccl senders pack the weights into reused buffers of this size (vLLM's own default); an ipc
# buffer must hold any one weight, so it is the largest weight's size where that is larger; nccl keeps two in
# flight.
PACKED_BUFFER_BYTES = 1 << 30
PACKED_BUFFERS = {"ipc": 1, "nccl": 2}


def ipc_buffer_bytes(largest_weight_bytes: int) -> int:
    return max(PACKED_BUFFER_BYTES, largest_weight_bytes)


def publish_bytes(path: str, largest_weight_bytes: int) -> int:
    """Bytes on the trainer's GPU while vLLM's `ipc` or `nccl` sender publishes (packed mode, vLLM 0.32's
    `packed_tensor.py`): ipc, its buffer, the weight being packed and the one before it, and the engine worker's
    clone of a buffer on that same GPU; nccl, each chunk in flight and the one being assembled, each a buffer and up
    to one weight more."""
    one = largest_weight_bytes
    if path == "ipc":
        return 2 * ipc_buffer_bytes(one) + 2 * one
    return (PACKED_BUFFERS["nccl"] + 1) * (PACKED_BUFFER_BYTES + one)


def visible_devices(gpus: list[int], environ: Mapping[str, str]) -> str:
    """CUDA_VISIBLE_DEVICES for an engine process that must see exactly `gpus` (`EngineConfig.gpu_indices`).
    When this process sees a subset itself (its own CUDA_VISIBLE_DEVICES, as under Ray), index N is that
    list's N-th entry."""
    seen = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not seen:
        return ",".join(str(g) for g in gpus)
    if max(gpus) >= len(seen):
        raise ConfigError(
            "engine.device",
            f"the engine needs GPUs {gpus}, but CUDA_VISIBLE_DEVICES={','.join(seen)} shows {len(seen)}; "
            "lower engine.tensor_parallel_size or choose an earlier engine.device",
        )
    return ",".join(seen[g] for g in gpus)


def trainer_gpu(trainer_device: str) -> int | None:
    """The trainer's GPU index ('cuda' is GPU 0); None for a trainer on the CPU."""
    if not trainer_device.startswith("cuda"):
        return None
    return int(trainer_device.split(":")[1]) if ":" in trainer_device else 0


def sleep_frees_trainer_gpu(cfg: EngineConfig, trainer_device: str) -> bool:
    """Whether vLLM on GPUs sleeping gives the trainer memory: its GPUs include the trainer's."""
    return trainer_gpu(trainer_device) in cfg.gpu_indices()


def weight_transfer_path(cfg: EngineConfig, trainer_device: str, engine_on_gpu: bool) -> str:
    """How the trainer's weights reach vLLM's workers (`engine.weight_transfer`):

    - host: bytes in vLLM's RPC messages, through host memory: vLLM's CPU build, or a trainer on the CPU;
    - ipc: CUDA IPC handles to the trainer's own tensors, no copy: the engine is one worker on the trainer's GPU;
    - nccl: a broadcast from the trainer's GPU to the engine's workers: the engine on GPUs of its own (NCCL
      allows one rank per GPU in a communicator, so the trainer's GPU cannot be among them).

    `auto` picks the one the placement allows; an explicit choice the placement rules out is refused."""
    gpu = trainer_gpu(trainer_device)
    engine_gpus = cfg.gpu_indices() if engine_on_gpu else []
    shares = gpu is not None and engine_gpus == [gpu]
    apart = gpu is not None and bool(engine_gpus) and gpu not in engine_gpus
    choice = cfg.weight_transfer
    if choice == "auto":
        return "ipc" if shares else "nccl" if apart else "host"
    if choice == "ipc" and not shares:
        raise ConfigError(
            "engine.weight_transfer",
            f"ipc needs the engine as one worker on the trainer's GPU (trainer on {trainer_device}, engine on "
            f"{_gpus(engine_gpus)}); set engine.device to the trainer's GPU with engine.tensor_parallel_size=1, "
            "or use auto",
        )
    if choice == "nccl" and not apart:
        raise ConfigError(
            "engine.weight_transfer",
            f"nccl needs the trainer on a GPU and the engine on GPUs without it (trainer on {trainer_device}, "
            f"engine on {_gpus(engine_gpus)}); set engine.device=cuda:N past the trainer's GPUs, or use auto",
        )
    return choice


def _gpus(gpus: list[int]) -> str:
    return ", ".join(f"cuda:{g}" for g in gpus) if gpus else "the CPU"
