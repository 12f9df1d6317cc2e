"""TRL's GRPOTrainer on twofold's multi-turn tool-use task (configs/tooluse.yaml), through TRL's own agent path
(`environment_factory`: one environment per rollout, its methods are the tools); runs in benchmarks/peers/.venv
(setup.sh) with the repository on PYTHONPATH, so the episodes are twofold's own (`twofold.envs.tooluse`).

    PYTHONPATH=. benchmarks/peers/.venv/bin/python benchmarks/peers/trl_tooluse.py --model DIR --steps 10 --out r.json

The tools are the env's three methods under the same names, signatures and docstrings, so TRL renders the same
schemas into the same chat template as twofold does. Each tool call waits as twofold's env step does (log-normal,
median `--latency-ms`, sigma `--latency-sigma`); TRL calls them one rollout after another (its tool loop; an
`async def` tool would overlap one rollout's calls, not different rollouts'). The final reply's reward is the env's
(1 for a correct answer or database, else 0), scored without a wait (twofold waits on that step too: in TRL's
favour). The loss matches compare.py's (unscaled group advantages, token-mean, clip 0.2 both sides, no dual clip,
gradient norm 1, gradient checkpointing). Writes samples/s, reward per step, tool calls and peak memory as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import time

from twofold.config import load_config
from twofold.envs.base import env_from_config
from twofold.envs.tooluse import ToolUse


class Shop:
    """One episode of twofold's tool-use env for TRL's `environment_factory`."""

    latency_s, sigma, env_cfg = 0.1, 0.6, None
    calls = 0

    def __init__(self):
        self.env = env_from_config(Shop.env_cfg)
        self.rng = random.Random()

    def reset(self, seed, **kwargs) -> None:
        self.env.reset(int(seed))  # the task is already the prompt's user message
        self.rng.seed(int(seed))

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
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    torch.set_num_threads(2)
    cfg = load_config(args.config)
    Shop.env_cfg, Shop.latency_s, Shop.sigma = cfg.env, cfg.env.step_latency_ms / 1000, cfg.env.step_latency_sigma
    levels = range(args.steps * args.groups)
    env = env_from_config(cfg.env)
    rows = [{"prompt": env.first_messages(env.reset(s)), "seed": s} for s in levels]
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    tokenizer.response_template = qwen3_template  # Hermes <tool_call>{json}</tool_call>, as the template renders
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    completions = args.groups * args.group_size
    prompt_tokens = len(tokenizer.apply_chat_template(rows[0]["prompt"], tools=env.tool_schemas, tokenize=True))
    config = GRPOConfig(
        output_dir="/tmp/trl-tooluse",
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=completions,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        # twofold's budget for a whole episode (rollout.max_total_tokens) less the prompt
        max_completion_length=cfg.rollout.max_total_tokens - prompt_tokens,
        max_tool_calling_iterations=cfg.env.max_turns - 1,
        temperature=1.0,
        beta=0.0,
        num_iterations=1,
        scale_rewards="none",
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.2,
        delta=None,
        max_grad_norm=1.0,
        gradient_checkpointing=True,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=args.seed,
        shuffle_dataset=False,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=env_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        environment_factory=Shop,
    )
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
