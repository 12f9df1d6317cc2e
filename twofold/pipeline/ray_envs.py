"""The env side of the Ray runtime: env workers and their client. It imports no torch or transformers, so an
env worker process starts in about a second and holds only the env (env workers are the many CPU-only
processes of a deployment, next to the tools they call)."""

from __future__ import annotations

import os

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from twofold.envs import env_from_config

ACTOR_FAILURES = (RayActorError, GetTimeoutError)
try:  # a restarting actor answers ActorUnavailableError in recent Ray
    from ray.exceptions import ActorUnavailableError

    ACTOR_FAILURES += (ActorUnavailableError,)
except ImportError:  # pragma: no cover - older Ray
    pass


class LostEpisode(RuntimeError):
    """The env worker holding this episode was restarted: the episode is gone."""


@ray.remote(max_restarts=-1, max_concurrency=32)  # threads: one slow env step never blocks the others
class EnvWorker:
    def __init__(self, env_cfg):
        self.env_cfg = env_cfg
        self.envs = {}

    def reset(self, key: int, seed: int) -> tuple[str, list[dict], list[dict] | None]:
        """The first observation, the messages the episode opens with, and the env's tool schemas."""
        env = env_from_config(self.env_cfg)
        self.envs[key] = env
        obs = env.reset(seed)
        return obs, env.first_messages(obs), env.tool_schemas

    def step(self, key: int, text: str):
        env = self.envs.get(key)
        if env is None:
            raise LostEpisode(f"episode {key} is unknown here: its env worker was restarted and lost it")
        out = env.step(text)
        if out[2]:
            del self.envs[key]
        return out

    def live_episodes(self) -> int:
        """Episodes reset here and not yet done: what a restart of this worker would lose."""
        return len(self.envs)

    def pid(self) -> int:
        return os.getpid()


class RemoteEnv:
    """A TextEnv whose instance lives in an EnvWorker actor: the same reset/step contract."""

    def __init__(self, pool: EnvPool):
        self.pool = pool
        self.key = next(pool.keys)
        self.actor = None
        self.tool_schemas = None
        self._first_messages: list[dict] = []

    def reset(self, seed: int) -> str:
        self.actor, (obs, self._first_messages, self.tool_schemas) = self.pool.reset(self.key, seed)
        return obs

    def first_messages(self, observation: str) -> list[dict]:
        return self._first_messages

    def step(self, text: str):
        try:
            return ray.get(self.actor.step.remote(self.key, text), timeout=self.pool.step_timeout_s)
        except (*ACTOR_FAILURES, LostEpisode):
            self.pool.failures += 1
            raise


class EnvPool:
    def __init__(self, workers: list, step_timeout_s: float):
        self.workers = workers
        self.step_timeout_s = step_timeout_s
        self.keys = iter(range(1 << 62))
        self.failures = 0

    def reset(self, key: int, seed: int):
        """Start the episode on the next worker that answers (one may be restarting)."""
        for i in range(len(self.workers)):
            worker = self.workers[(key + i) % len(self.workers)]
            try:
                return worker, ray.get(worker.reset.remote(key, seed), timeout=self.step_timeout_s)
            except ACTOR_FAILURES:
                self.failures += 1
        raise RuntimeError(f"no env worker answered within env.step_timeout_s={self.step_timeout_s}s")
