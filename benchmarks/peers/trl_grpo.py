"""TRL's GRPOTrainer on the dataset task, with twofold's settings; runs in benchmarks/peers/.venv (setup.sh).

    benchmarks/peers/.venv/bin/python benchmarks/peers/trl_grpo.py --model DIR --data FILE --steps 20 --out r.json

One optimizer step per generation batch of `groups x group_size` completions (as twofold with one minibatch),
no KL term (beta 0, as twofold), the same learning rate, temperature and completion length, the same exact
reward on <answer>...</answer>, and the same loss: unscaled group advantages, token-mean, clip 0.2 both sides,
no dual clip, gradient norm 1 (TRL's defaults would scale advantages by the group's std and differ in those).
Writes samples/s, tokens/s, reward per step and peak memory as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import time

# The settings compare.py matches on both sides, for every task (trl_tooluse.py takes them from here).
MATCHED = dict(
    temperature=1.0,
    beta=0.0,
    num_iterations=1,
    # twofold's loss, named: advantages are reward minus the group mean, not divided by its std
    # (advantage.normalize_std=false), token losses averaged over the batch's tokens (loss.aggregation=
    # token-mean: TRL's "dapo"), the clip [0.8, 1.2] (loss.eps_low = eps_high = 0.2), no dual clip
    # (loss.dual_clip=null: TRL's delta=None), gradients clipped to norm 1
    scale_rewards="none",
    loss_type="dapo",
    epsilon=0.2,
    epsilon_high=0.2,
    delta=None,
    max_grad_norm=1.0,
    gradient_checkpointing=True,  # TRL's GRPOConfig default, named; twofold's default too
    use_cpu=True,
    bf16=False,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
)

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def exact(completions, solution, **kwargs):
    """1 when the last <answer>...</answer> equals the solution (case and spacing aside), else 0."""
    out = []
    for completion, truth in zip(completions, solution, strict=True):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        found = ANSWER.findall(text)
        out.append(float(bool(found) and found[-1].strip().lower() == str(truth).strip().lower()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="verl-layout JSONL (twofold dataset example)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(2)
    rows = load_dataset("json", data_files=args.data, split="train")
    data = rows.map(
        lambda r: {"prompt": r["prompt"], "solution": r["reward_model"]["ground_truth"]},
        remove_columns=[c for c in rows.column_names if c != "prompt"],
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    completions = args.groups * args.group_size
    config = GRPOConfig(
        output_dir="/tmp/trl-grpo",
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=completions,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        seed=args.seed,
        **MATCHED,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact, args=config, train_dataset=data, processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [r for r in trainer.state.log_history if "reward" in r]
    lengths = [r.get("completions/mean_length", r.get("completion_length", 0.0)) for r in logs]
    result = {
        "steps": len(logs),
        "seconds": seconds,
        "samples_per_s": completions * len(logs) / seconds,
        "tokens_per_s": sum(length * completions for length in lengths) / seconds,
        "reward": [r["reward"] for r in logs],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
