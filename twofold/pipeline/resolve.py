"""Model resolution: which checkpoint a run starts from."""

from __future__ import annotations

from pathlib import Path

from twofold.config import Config
from twofold.envs import tokenizer_corpus
from twofold.modelpath import allow_model_code, resolve_model_source
from twofold.models import ensure_tiny_model
from twofold.trainer.warmstart import ensure_warmstart


def resolve_model_path(cfg: Config, progress: bool = True) -> Path:
    """The local folder of the model to start from: `model.path` (a folder, a GGUF file or a Hub ID), else the
    tiny model (warm-started when configured)."""
    if cfg.model.path:
        folder = resolve_model_source(cfg.model.path, cfg.model.revision)
        allow_model_code(folder, cfg.model.trust_remote_code)
        return folder
    base = ensure_tiny_model(cfg.model, tokenizer_corpus(cfg.env))
    if not cfg.model.warmstart:
        return base
    return ensure_warmstart(cfg, base, progress=progress)
