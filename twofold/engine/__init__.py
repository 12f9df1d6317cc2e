"""Inference engines behind one interface: the built-in engine (default) and vLLM."""

from __future__ import annotations

from pathlib import Path

from twofold.config import ConfigError, EngineConfig, parse_bytes
from twofold.engine.base import GenerationRequest, GenerationResult, InferenceEngine, SamplingParams

__all__ = ["GenerationRequest", "GenerationResult", "InferenceEngine", "SamplingParams", "make_engine"]


def make_engine(
    cfg: EngineConfig,
    model_path: str | Path,
    tokenizer,
    seed: int = 0,
    trainer_device: str = "cpu",
    sleeps: bool = False,
) -> InferenceEngine:
    """The engine `cfg` names; `trainer_device` (the trainer's, where vLLM's weight transfer starts from)
    decides vLLM's transfer path; `sleeps`: the run will call `sleep()` between steps (vLLM is started for it)."""
    if cfg.backend == "builtin":
        from twofold.engine.builtin import BuiltinEngine

        return BuiltinEngine(
            model_path,
            dtype=cfg.dtype,
            quantization=cfg.quantization,
            logit_noise_std=cfg.logit_noise_std,
            max_batch_size=cfg.max_batch_size,
            max_batch_tokens=cfg.max_batch_tokens,
            seed=seed,
            tokenizer=tokenizer,
            device=cfg.device,
            prefix_cache_bytes=parse_bytes(cfg.prefix_cache, "engine.prefix_cache") or 0,
        )
    if cfg.backend == "vllm":
        try:
            from twofold.engine.vllm import VLLMEngine
        except ImportError as e:
            raise ConfigError(
                "engine.backend",
                f"vLLM is not usable here ({e}); install it with "
                "`pip install twofold[vllm]` on a machine it supports, or use engine.backend=builtin",
            ) from None
        return VLLMEngine(model_path, cfg, seed=seed, trainer_device=trainer_device, sleeps=sleeps)
    raise ConfigError("engine.backend", f"unknown backend {cfg.backend!r}; valid: builtin, vllm")
