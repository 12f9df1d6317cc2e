"""The trainer's forward and backward on a GRPO batch, padded, packed and over its prefix tree (prints a table).

python benchmarks/prefix_tree.py [--config configs/dataset.yaml] [--groups 8] [--group-size 4] [--new-tokens 16]
    [overrides ...]

The config's env (default: the dataset example's word problems, written to a temporary file when
`env.options.path` names none) gives `--groups`
first prompts through the tiny model's chat template; each gets `--group-size` random completions of
`--new-tokens` tokens (the forward's cost does not depend on which tokens). One forward and backward of
`policy_logprobs` (loss on the completions, gradient checkpointing on, as the trainer runs it), and one forward
without gradient (as a source scores), on 1 and 2 torch threads, each way: padded rows, packed rows
(`trainer.pack_sequences`), the prefix tree (`trainer.share_prefixes`). Best of two rounds of 10.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from twofold.config import load_config
from twofold.envs import env_from_config, tokenizer_corpus
from twofold.envs.dataset import write_example
from twofold.logprobs import pad_right, policy_logprobs
from twofold.models import ensure_tiny_model, load_model, load_tokenizer
from twofold.prefix_tree import prefix_tree
from twofold.rollout.chat import first_prompt_ids


def _seconds(fn, repeats: int = 10) -> float:
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/dataset.yaml")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.env.name == "dataset" and not Path(cfg.env.options["path"]).exists():
        example = write_example(Path(tempfile.mkdtemp()) / "word_problems.jsonl", "verl", n=1000)
        cfg = load_config(args.config, [*args.overrides, f"env.options.path={example}"])
    base = ensure_tiny_model(cfg.model, tokenizer_corpus(cfg.env))
    tokenizer, model = load_tokenizer(base), load_model(base, torch.float32).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    env = env_from_config(cfg.env)
    g = torch.Generator().manual_seed(0)
    rows, prompts = [], []
    for i in range(args.groups):
        prompt = first_prompt_ids(tokenizer, env, env.reset(i))
        prompts.append(len(prompt))
        for _ in range(args.group_size):
            rows.append(prompt + torch.randint(5, len(tokenizer), (args.new_tokens,), generator=g).tolist())
    ids, attn = pad_right(rows, tokenizer.pad_token_id)
    wanted = torch.zeros_like(attn)
    for r, row in enumerate(rows):
        wanted[r, len(row) - args.new_tokens : len(row)] = 1
    print(
        f"{args.config}: {args.groups} prompts x {args.group_size} completions of {args.new_tokens} tokens, prompts "
        f"{min(prompts)}-{max(prompts)} tokens; tokens: {ids.numel():,} padded, {int(attn.sum()):,} real, "
        f"{len(prefix_tree(rows).tokens):,} in the prefix tree"
    )
    print("| torch threads | rows | forward and backward ms | forward without gradient ms |")
    print("|---|---|---|---|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for label, layout in (("padded", {}), ("packed", {"packed": True}), ("prefix tree", {"share_prefixes": True})):

            def train_pass(layout=layout):
                model.zero_grad(set_to_none=True)
                policy_logprobs(model, ids, attn, 1.0, 512, wanted, **layout).sum().backward()

            def score_pass(layout=layout):
                with torch.no_grad():
                    policy_logprobs(model, ids, attn, 1.0, 512, wanted, **layout)

            print(f"| {threads} | {label} | {_seconds(train_pass) * 1e3:.1f} | {_seconds(score_pass) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
