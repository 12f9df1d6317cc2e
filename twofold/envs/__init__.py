"""Text environments for LLM agents: FrozenLake, Sokoban, arithmetic, tool use, and your own by import path."""

from twofold.envs import arithmetic, frozenlake, sokoban, tooluse  # noqa: F401  (registration)
from twofold.envs.base import TextEnv, env_class, env_from_config, known_envs, make_env, parse_answer, register

__all__ = ["TextEnv", "env_class", "env_from_config", "known_envs", "make_env", "parse_answer", "register", "tokenizer_corpus"]


# The tiny tokenizer's training text. Fixed (not "every registered env") because the tokenizer, the tiny
# model and every warm start are cached by a fingerprint of it; tool-use text is covered by byte-level BPE.
CORPUS_ENVS = ("arithmetic", "frozenlake", "sokoban")


def tokenizer_corpus(seeds: int = 40) -> list[str]:
    """Text of the built-in grid and arithmetic envs (prompts, observations, replies) for the tiny tokenizer."""
    import random

    texts = ["user\n", "assistant\n", "system\n"]
    for name in CORPUS_ENVS:
        env = make_env(name)
        texts.append(env.system_prompt)
        rng = random.Random(0)
        for seed in range(seeds):
            texts.append(env.reset(seed))
            for _ in range(3):
                answer = env.random_answer(rng) if rng.random() < 0.5 else (env.solve() or ["x"])[0]
                reply = f"<answer>{answer}</answer>"
                obs, _, done, _ = env.step(reply)
                texts += [reply, obs]
                if done:
                    break
            texts.append(env.step("nonsense")[0] if not env.done else env.action_help)
    return texts
