"""TRL's GRPOTrainer on twofold's multi-turn tool-use task (configs/tooluse.yaml), through TRL's own agent path
(`environment_factory`: one environment per rollout, its methods are the tools); runs in benchmarks/peers/.venv
(setup.sh) with the repository on PYTHONPATH, so the episodes are twofold's own (`twofold.envs.tooluse`).

    PYTHONPATH=. benchmarks/peers/.venv/bin/python benchmarks/peers/trl_tooluse.py --model DIR --steps 10 --out r.json

Everything the config says is read from it: the levels in twofold's order (`level_seed`), groups and group size,
learning rate, turns, the token budget per episode and per reply. The tools are the env's three methods under
the same names, signatures and docstrings, listed in the env's order, so TRL's prompt is twofold's token for token
(checked at start). Each tool call waits as twofold's env step does (log-normal, `env.step_latency_ms` median,
`env.step_latency_sigma`); TRL calls them one rollout after another (its tool loop; an `async def` tool would
overlap one rollout's calls, not different rollouts'). The final reply's reward is the env's (1 for a correct
answer or database, else 0), scored without a wait, and failed calls do not wait (twofold waits on every env
step: both in TRL's favour). The loss matches compare.py's (unscaled group advantages, token-mean, clip 0.2 both
sides, no dual clip, gradient norm 1, gradient checkpointing). Writes samples/s, reward per step, tool calls and
peak memory as JSON."""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import time

from trl_grpo import MATCHED  # this folder: the settings both TRL scripts match

from twofold.config import load_config
from twofold.envs.base import env_from_config
from twofold.envs.seeding import level_seed
from twofold.envs.tooluse import ToolUse


class Shop:
    """One episode of twofold's tool-use env for TRL's `environment_factory`."""

    latency_s, sigma, env_cfg, group_size = 0.1, 0.6, None, 4
    calls = made = 0

    def __init__(self):
        self.env = env_from_config(Shop.env_cfg)
        self.rng = random.Random()
        self.member = Shop.made % Shop.group_size  # TRL pools one instance per batch row; a group's rows are adjacent
        Shop.made += 1

    def reset(self, seed, **kwargs) -> None:
        self.env.reset(int(seed))  # the task is already the prompt's user message
        self.rng.seed(int(seed) * 31 + self.member)  # a group's members wait differently, as twofold's episodes do

    def _call(self, tool: str, **arguments) -> str:
        Shop.calls += 1
        time.sleep(self.latency_s * math.exp(self.rng.gauss(0.0, self.sigma)))
        return getattr(self.env, tool)(**arguments)

    def find_customer(self, name: str) -> str:
        return self._call("find_customer", name=name)

    def get_order(self, id: str) -> str:
        return self._call("get_order", id=id)

    def cancel_order(self, id: str) -> str:
        return self._call("cancel_order", id=id)

    find_customer.__doc__ = ToolUse.find_customer.__doc__
    get_order.__doc__ = ToolUse.get_order.__doc__
    cancel_order.__doc__ = ToolUse.cancel_order.__doc__


def env_reward(completions, environments, **kwargs):
    """The env's reward for each rollout's final reply (an <answer>: 1 when right, else 0)."""
    out = []
    for completion, shop in zip(completions, environments, strict=True):
        final = completion[-1]["content"] if isinstance(completion, list) else completion
        _, reward, done, _ = shop.env.step(final or "")
        out.append(float(reward) if done else 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", default="configs/tooluse.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    cfg = load_config(args.config)
    Shop.env_cfg, Shop.latency_s, Shop.sigma = cfg.env, cfg.env.step_latency_ms / 1000, cfg.env.step_latency_sigma
    Shop.group_size = cfg.rollout.group_size
    groups = cfg.rollout.groups_per_step
    env = env_from_config(cfg.env)
    # twofold's levels in its order: step k plays level seeds level_seed(seed, 8k) .. level_seed(seed, 8k + 7)
    seeds = [level_seed(cfg.seed, g) for g in range(args.steps * groups)]
    rows = [{"prompt": env.first_messages(env.reset(s)), "seed": s} for s in seeds]
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    tokenizer.response_template = qwen3_template  # Hermes <tool_call>{json}</tool_call>, as the template renders
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    completions = groups * cfg.rollout.group_size

    def prompt_ids(messages, tools):
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    longest_prompt = max(len(prompt_ids(r["prompt"], env.tool_schemas)) for r in rows)
    config = GRPOConfig(
        output_dir="/tmp/trl-tooluse",
        max_steps=args.steps,
        learning_rate=cfg.trainer.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=completions,
        gradient_accumulation_steps=1,
        num_generations=cfg.rollout.group_size,
        # twofold's budget for a whole episode (rollout.max_total_tokens) less the prompt, and per reply
        # (engine.max_new_tokens): TRL's batch decodes until its longest reply stops
        max_completion_length=cfg.rollout.max_total_tokens - longest_prompt,
        generation_kwargs={"max_new_tokens": cfg.engine.max_new_tokens},
        max_tool_calling_iterations=cfg.env.max_turns - 1,
        seed=args.seed,
        shuffle_dataset=False,
        **MATCHED,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=env_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        environment_factory=Shop,
    )
    # TRL lists an environment's methods by name (inspect.getmembers); the warm start learnt twofold's order
    order = [schema["function"]["name"] for schema in env.tool_schemas]
    trainer._env_tools[None].sort(key=lambda tool: order.index(tool.__name__))
    if prompt_ids(rows[0]["prompt"], trainer._env_tools[None]) != prompt_ids(rows[0]["prompt"], env.tool_schemas):
        raise SystemExit("TRL's prompt is not twofold's: the comparison would not be matched")
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [r for r in trainer.state.log_history if "reward" in r]
    result = {
        "steps": len(logs),
        "seconds": seconds,
        "samples_per_s": completions * len(logs) / seconds,
        "tool_calls_per_sample": Shop.calls / (completions * len(logs)),
        "reward": [r["reward"] for r in logs],
        "log": logs,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
