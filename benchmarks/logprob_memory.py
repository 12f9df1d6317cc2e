"""Peak memory of one train step on a long sequence: full [B, T, V] logits against the chunked LM head.

    python benchmarks/logprob_memory.py                 # 32k vocabulary, one 4,096-token sequence
    python benchmarks/logprob_memory.py --tokens 8192 --vocab 151936

A random model (Qwen2 shape, hidden 256, 2 layers) is built locally. Each variant runs in a fresh process:
load, build the optimizer, then reset the kernel's peak-RSS counter (/proc/self/clear_refs) and run one
step (forward, backward, AdamW step). The figure is the peak resident memory during the step minus the
memory before it, so it counts what the step itself allocates (activations, logits, gradients, optimizer
state) and nothing of the setup. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name: (logprob_chunk_size, gradient_checkpointing)
    "full logits (chunk 0)": (0, False),
    "chunked head (512 positions)": (512, False),
    "chunked head + gradient checkpointing": (512, True),
}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def one_step(model_dir: str, tokens: int, chunk: int, checkpointing: bool) -> dict:
    import torch

    from twofold.logprobs import token_logprobs
    from twofold.models import load_model

    torch.manual_seed(0)
    model = load_model(model_dir).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    attn = torch.ones_like(ids)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_kib("VmRSS")
    t0 = time.perf_counter()
    loss = -token_logprobs(model, ids, attn, 1.0, chunk).sum() / tokens
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    return {"peak_mib": (rss_kib("VmHWM") - before) / 1024, "seconds": seconds, "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--child", nargs=4, metavar=("MODEL", "TOKENS", "CHUNK", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model_dir, tokens, chunk, ckpt = args.child
        print(json.dumps(one_step(model_dir, int(tokens), int(chunk), ckpt == "1")))
        return

    from twofold.models import save_random_model

    with tempfile.TemporaryDirectory() as tmp:
        save_random_model(
            tmp,
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=4 * args.hidden,
        )
        logits_mib = args.tokens * args.vocab * 4 / 2**20
        print(
            f"random Qwen2, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab:,}; one sequence of "
            f"{args.tokens:,} tokens; [T, V] float32 logits = {logits_mib:,.0f} MiB\n"
        )
        print("| variant | peak extra memory of the step | step seconds |")
        print("|---|---|---|")
        for name, (chunk, ckpt) in VARIANTS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", tmp, str(args.tokens), str(chunk), "1" if ckpt else "0"],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {r['peak_mib']:,.0f} MiB | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
