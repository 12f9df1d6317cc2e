"""A warm-start batch with and without its shared prefixes run once (prints a Markdown table).

python benchmarks/warmstart_prefix.py [--config configs/tooluse.yaml] [--batches 6] [overrides ...]

The config's own demonstrations (`warmstart.batch_size` a batch, the first --batches batches of them) on its
tiny base model, in float32: one forward and backward of the warm start's loss per batch, four ways: padded rows
with every position through the LM head (the warm start before issue 38), the head only where the loss is taken,
that with the rows packed, and with the rows' prefix tree in one packed row, so the tokens demonstrations open
with alike (the system prompt; a tool task's lists the tool schemas) run once a batch (`prefix_tree`). Prints the
mean seconds a batch, the tokens the decoder runs, and the largest difference of the loss and of the gradient from
the first way.
"""

import argparse
import time

import torch

from twofold.config import load_config
from twofold.envs import tokenizer_corpus
from twofold.logprobs import pad_right, policy_logprobs
from twofold.models import ensure_tiny_model, load_model, load_tokenizer
from twofold.prefix_tree import prefix_tree
from twofold.trainer.warmstart import demonstration


def _loss_and_grads(model, ids, attn, mask, wanted, layout):
    model.zero_grad(set_to_none=True)
    logprobs = policy_logprobs(model, ids, attn, wanted=mask if wanted else None, **layout)
    loss = -(logprobs * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/tooluse.yaml")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    base = ensure_tiny_model(cfg.model, tokenizer_corpus(cfg.env))
    tokenizer, model = load_tokenizer(base), load_model(base, torch.float32).train()
    size = cfg.warmstart.batch_size
    demos = [demonstration(cfg, tokenizer, i) for i in range(args.batches * size)]
    batches = []
    for start in range(0, len(demos), size):
        chunk = demos[start : start + size]
        ids, attn = pad_right([d[0] for d in chunk], tokenizer.pad_token_id)
        mask, _ = pad_right([d[1] for d in chunk], 0)
        batches.append((ids, attn, mask.float(), len(prefix_tree([d[0] for d in chunk]).tokens)))
    tokens = sum(int(a.sum()) for _, a, _, _ in batches) / len(batches)
    print(
        f"{args.config}: {len(batches)} batches of {size}, {tokens:,.0f} real tokens a batch, "
        f"width {sum(i.shape[1] for i, *_ in batches) / len(batches):.0f}, torch threads {torch.get_num_threads()}"
    )
    print("| forward and backward | decoder tokens a batch | s a batch | max loss difference | max gradient diff. |")
    print("|---|---|---|---|---|")
    padded = sum(i.numel() for i, *_ in batches) / len(batches)
    tree = sum(b[3] for b in batches) / len(batches)
    ways = [
        ("every position through the head", False, {}, padded),
        ("head on loss positions", True, {}, padded),
        ("head on loss positions, rows packed", True, {"packed": True}, None),
        ("head on loss positions, prefix tree", True, {"share_prefixes": True}, tree),
    ]
    reference = [_loss_and_grads(model, ids, attn, mask, False, {}) for ids, attn, mask, _ in batches]
    for label, wanted, layout, decoded in ways:
        _loss_and_grads(model, *batches[0][:3], wanted, layout)  # warm-up
        seconds, loss_diff, grad_diff = 0.0, 0.0, 0.0
        for (ids, attn, mask, _), (ref_loss, ref_grads) in zip(batches, reference, strict=True):
            t0 = time.perf_counter()
            loss, grads = _loss_and_grads(model, ids, attn, mask, wanted, layout)
            seconds += time.perf_counter() - t0
            loss_diff = max(loss_diff, float((loss - ref_loss).abs()))
            grad_diff = max(grad_diff, max(float((g - r).abs().max()) for g, r in zip(grads, ref_grads, strict=True)))
        shown = f"{decoded:,.0f}" if decoded else "packed rows of the longest's width"
        print(f"| {label} | {shown} | {seconds / len(batches):.2f} | {loss_diff:.1e} | {grad_diff:.1e} |")


if __name__ == "__main__":
    main()
