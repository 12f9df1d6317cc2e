"""The GPUs an engine process may see (vLLM's engine core and workers: `engine/vllm.py`)."""

from __future__ import annotations

from collections.abc import Mapping

from twofold.config import ConfigError


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
