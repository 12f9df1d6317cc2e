"""Text environments for LLM agents: FrozenLake, Sokoban, arithmetic, tool use, and your own by import path."""

import json
import logging
import random

from twofold.envs import arithmetic, dataset, frozenlake, sokoban, tooluse  # noqa: F401  (registration)
from twofold.envs.base import (
    TextEnv,
    check_options,
    env_class,
    env_from_config,
    known_envs,
    make_env,
    parse_answer,
    register,
)

__all__ = [
    "TextEnv",
    "env_class",
    "env_from_config",
    "known_envs",
    "make_env",
    "parse_answer",
    "register",
    "check_options",
    "tokenizer_corpus",
]


# The tiny tokenizer's training text. Fixed (not "every registered env") because the tokenizer, the tiny
# model and every warm start are cached by a fingerprint of it. Any other env (tool use, your own) adds its
# own text: spelled out byte by byte, a tool name is a dozen tokens the tiny model fails to write.
CORPUS_ENVS = ("arithmetic", "frozenlake", "sokoban")


def tokenizer_corpus(env_cfg=None, seeds: int = 40) -> list[str]:
    """Text (prompts, observations, replies) of the built-in grid and arithmetic envs, plus `env_cfg`'s env."""
    texts = ["user\n", "assistant\n", "system\n"]
    for name in CORPUS_ENVS:
        texts += _env_text(make_env(name), seeds)
    if env_cfg is not None and env_cfg.name not in CORPUS_ENVS:
        env = env_from_config(env_cfg)  # a bad env.options is a ConfigError here already
        try:
            texts += _env_text(env, seeds)
        except Exception as exc:  # a broken env is reported by the run itself, with its traceback
            logging.getLogger(__name__).warning(
                "env %r raised while writing the tokenizer corpus (%s); its text is left out", env_cfg.name, exc
            )
    return texts


def _env_text(env: TextEnv, seeds: int) -> list[str]:
    texts = [env.system_prompt]
    if env.tool_schemas:  # the prompt lists them: let the tokenizer learn their JSON
        texts += [json.dumps(schema) for schema in env.tool_schemas]
    rng = random.Random(0)
    for seed in range(seeds):
        texts.append(env.reset(seed))
        for _ in range(3):
            move = _random_move(env, rng) if rng.random() < 0.5 else (env.solve() or ["x"])[0]
            reply = env.reply(move)
            obs, _, done, _ = env.step(reply)
            texts += [reply, obs]
            if done:
                break
        texts.append(env.step("nonsense")[0] if not env.done else env.action_help)
    return texts


def _random_move(env: TextEnv, rng) -> str:
    try:
        return env.random_answer(rng)
    except NotImplementedError:  # optional for your own env
        return "x"
