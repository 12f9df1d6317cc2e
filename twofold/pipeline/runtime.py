"""Where the pipeline's parts live. `EmbeddedRuntime` (the default): all in this process.
`RayRuntime` (`ray_runtime.py`): the same interfaces backed by Ray actors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from twofold.config import Config
from twofold.engine import InferenceEngine, make_engine
from twofold.envs import TextEnv, env_from_config
from twofold.oldlogits import LogprobWorker, SourceContext


class Runtime(Protocol):
    """The three factories the pipeline takes its parts from, plus the runtime's own metrics."""

    def make_engine(
        self, cfg: Config, model_path: Path, tokenizer, trainer_device: str, sleeps: bool = False
    ) -> InferenceEngine: ...

    def make_env(self, cfg: Config) -> TextEnv: ...

    @property
    def logprob_worker(self) -> Callable[[dict[str, torch.Tensor], SourceContext], LogprobWorker] | None:
        """Builds the dedicated source's model copy elsewhere, from the trainer's (gathered) weights; None keeps
        it in the trainer's process."""
        ...

    def metrics(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class EmbeddedRuntime:
    """Every part in this process."""

    def make_engine(
        self, cfg: Config, model_path: Path, tokenizer, trainer_device: str, sleeps: bool = False
    ) -> InferenceEngine:
        return make_engine(
            cfg.engine, model_path, tokenizer, seed=cfg.seed, trainer_device=trainer_device, sleeps=sleeps
        )

    def make_env(self, cfg: Config) -> TextEnv:
        return env_from_config(cfg.env)

    @property
    def logprob_worker(self) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None: ...
