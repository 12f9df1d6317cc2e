"""Seconds of one train step with padded rows against packed rows (`trainer.pack_sequences`), same batch.

    python benchmarks/packing.py                                   # the tiny model (not warm-started)
    python benchmarks/packing.py --model smollm2-135m-instruct --rows 16 --longest 400
    python benchmarks/packing.py trainer.max_tokens_per_microbatch=2048

The batch is random tokens in rows whose lengths are spread evenly from a quarter of `--longest` to
`--longest` (agent tokens after a 32-token prompt): the spread a multi-turn env's episodes have, where some end
in one turn and some run to the turn limit. One process, the two settings alternating (`--repeats` times each,
after one warm-up step each), each step on a fresh copy of the same starting weights; prints the median
seconds and the tokens each setting put through the decoder. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from twofold.config import load_config
from twofold.logprobs import pack_rows
from twofold.models import load_model
from twofold.oldlogits import BehaviorSource, SourceContext
from twofold.pipeline.resolve import resolve_model_path
from twofold.rollout.trajectory import Batch, Trajectory
from twofold.trainer.trainer import Trainer

PROMPT = 32
CONFIG = "configs/frozenlake.yaml"  # the default job: its trainer settings and tiny model


def batch_of(rows: int, longest: int, vocab: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    lengths = [round(longest / 4 + (longest - longest / 4) * i / max(rows - 1, 1)) for i in range(rows)]
    trajectories = []
    for i, n in enumerate(lengths):
        t = Trajectory(uid=i, group_id=i // 4, level_seed=0)
        tokens = torch.randint(1, vocab, (n,), generator=g).tolist()
        t.append(tokens[:PROMPT], agent=False)
        t.append(tokens[PROMPT:], agent=True, logprobs=[-2.0] * (n - PROMPT), versions=[0] * (n - PROMPT))
        t.turn_rewards.append(float(i % 3))
        trajectories.append(t)
    return Batch.from_trajectories(trajectories, pad_id=0)


def decoder_tokens(trainer: Trainer, batch: Batch, packed: bool) -> int:
    """Tokens through the decoder in the trainer's next step over `batch` (padding included): its minibatches
    (drawn from a copy of its generator, as `train_step` draws them), micro-batch by micro-batch."""
    draws = torch.Generator()
    draws.set_state(trainer.generator.get_state())
    t, total = trainer.cfg.trainer, 0
    for _ in range(t.ppo_epochs):
        order = torch.randperm(len(batch.trajectories), generator=draws)
        for rows in torch.chunk(order, t.num_minibatches):
            mb = batch.select(rows)
            for micro in trainer.my_microbatches(mb):
                lengths = [int(mb.attention_mask[i].sum()) for i in micro]
                forward_rows = len(pack_rows(lengths, max(lengths))) if packed else len(lengths)
                total += forward_rows * max(lengths)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model.path (default: the default job's tiny model)")
    ap.add_argument("--rows", type=int, default=32, help="trajectories in the batch")
    ap.add_argument("--longest", type=int, default=512, help="tokens of the longest row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value (both settings)")
    args = ap.parse_args()
    model = [*([f"model.path={args.model}"] if args.model else []), "model.warmstart=false"]  # any weights do
    configs = {
        packed: load_config(CONFIG, [*model, *args.overrides, f"trainer.pack_sequences={packed}"])
        for packed in (False, True)
    }
    base = configs[False]
    path = resolve_model_path(base)
    start = load_model(path)
    batch = batch_of(args.rows, args.longest, start.config.vocab_size)
    seconds, tokens = {False: [], True: []}, {}
    for round_ in range(args.repeats + 1):
        for packed in (False, True):
            trainer = Trainer(copy.deepcopy(start), configs[packed])
            ctx = SourceContext(pad_id=0, async_mode=False, max_staleness=0, numerics=trainer.numerics)
            tokens[packed] = decoder_tokens(trainer, batch, packed)
            t0 = time.perf_counter()
            trainer.train_step(batch, BehaviorSource(ctx))
            if round_ > 0:  # the first round warms up both
                seconds[packed].append(time.perf_counter() - t0)
    real = int(batch.attention_mask.sum()) * base.trainer.ppo_epochs
    threads = torch.get_num_threads()
    print(f"model {path.name}, {args.rows} rows of {args.longest // 4}-{args.longest} tokens, {threads} threads")
    print(f"| setting | s/step (median) | decoder tokens per step (real tokens: {real:,}) |\n|---|---|---|")
    for packed in (False, True):
        name = "packed" if packed else "padded"
        print(f"| {name} | {statistics.median(seconds[packed]):.2f} | {tokens[packed]:,} |")


if __name__ == "__main__":
    main()
