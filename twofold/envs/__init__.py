"""Text environments for LLM agents: FrozenLake, Sokoban, arithmetic, and your own by import path."""

from twofold.envs import arithmetic, frozenlake, sokoban  # noqa: F401  (registration)
from twofold.envs.base import TextEnv, env_class, known_envs, make_env, parse_answer, register

__all__ = ["TextEnv", "env_class", "known_envs", "make_env", "parse_answer", "register", "tokenizer_corpus"]


def tokenizer_corpus(seeds: int = 40) -> list[str]:
    """Text of every built-in env (prompts, observations, replies) to train the tiny tokenizer on."""
    import random

    texts = ["user\n", "assistant\n", "system\n"]
    for name in known_envs():
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
