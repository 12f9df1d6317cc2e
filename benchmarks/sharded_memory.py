"""Bytes each trainer rank holds, for N = 1 and 2 ranks on this CPU (gloo), the same model and step:
parameters, gradients, AdamW state, one snapshot version, the EWMA average. Then the same arithmetic for
1.5B, 7B and 32B models on 8 GPUs, against the paper's 40 GB of snapshots at 4B.

    python benchmarks/sharded_memory.py                  # a random Qwen2 of ~26M parameters (32k vocabulary)

Each count is this rank's local shards (`DTensor.to_local()`), taken after one optimizer step (so the gradients
and AdamW state exist), with a snapshot taken and the EWMA updated once. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

GIB = 2**30


def measure(rank: int, world: int, address: str, port: int, model_dir: str, out: str) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import small_config
    from test_scale import seven_trajectory_batch

    from twofold.distributed import close_ranks, init_ranks, local_tensor
    from twofold.models import load_model, state_dict_bytes, versioned_state
    from twofold.oldlogits import BehaviorSource, SourceContext
    from twofold.oldlogits.ewma import ParameterEWMA
    from twofold.trainer.trainer import Trainer

    ranks = init_ranks(rank, world, address, port, torch.device("cpu"))
    torch.set_num_threads(1)
    cfg = small_config(**{"trainer.num_minibatches": 1, "trainer.world_size": world})
    batch = seven_trajectory_batch(load_model(model_dir), None)
    trainer = Trainer(load_model(model_dir), cfg, ranks=ranks)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.accumulate_gradients(batch, torch.zeros_like(batch.loss_mask), BehaviorSource(SourceContext(0, True, 2)))

    def nbytes(tensors):
        return sum(local_tensor(t).numel() * t.element_size() for t in tensors)

    grads = nbytes(p.grad for p in params if p.grad is not None)
    trainer.optimizer.step()
    optim = nbytes(v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    snapshot = state_dict_bytes(versioned_state(trainer.model))
    ewma = ParameterEWMA(trainer.model, 0.5)
    ewma.update(trainer.model)
    row = {
        "rank": rank,
        "params": nbytes(params),
        "grads": grads,
        "optimizer": optim,
        "snapshot": snapshot,
        "ewma": state_dict_bytes(ewma.params),
    }
    rows = ranks.all_gather(row)
    if ranks.is_main:
        Path(out).write_text(json.dumps(rows))
    close_ranks(ranks)


def projections() -> str:
    """Per-GPU bytes on 8 GPUs (FSDP2 over 8 ranks) for Qwen2.5-shaped models; float32 master weights."""
    models = {"1.5B": 1.54e9, "4B": 4.02e9, "7B": 7.62e9, "32B": 32.8e9}
    lines = [
        "| model | params+grads+AdamW per GPU (16 B/param / 8) | one snapshot version, whole / per GPU | "
        "snapshots per GPU (async holds one version): on GPU / offloaded to host RAM | EWMA average per GPU |",
        "|---|---|---|---|---|",
    ]
    for name, n in models.items():
        train, snap = 16 * n / 8 / GIB, 4 * n / GIB
        lines.append(
            f"| {name} | {train:.1f} GiB | {snap:.1f} GiB / {snap / 8:.2f} GiB | {snap / 8:.2f} GiB / "
            f"0 (host: {snap / 8:.2f} GiB per rank) | {snap / 8:.2f} GiB |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    from twofold.distributed import spawn_ranks
    from twofold.envs import tokenizer_corpus
    from twofold.models import save_random_model

    with tempfile.TemporaryDirectory() as tmp:
        save_random_model(
            Path(tmp) / "m",
            vocab_size=32000,
            hidden_size=args.hidden,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=1024,
            corpus=tokenizer_corpus(),
        )
        print("| ranks | rank | parameters | gradients | AdamW state | one snapshot version | EWMA average |")
        print("|---|---|---|---|---|---|---|")
        for n in (1, 2):
            out = Path(tmp) / f"n{n}.json"
            spawn_ranks(measure, n, str(Path(tmp) / "m"), str(out))
            for row in json.loads(out.read_text()):
                cells = " | ".join(
                    f"{row[k] / 2**20:.1f} MiB" for k in ("params", "grads", "optimizer", "snapshot", "ewma")
                )
                print(f"| {n} | {row['rank']} | {cells} |")
    print("\nProjected to 8 GPUs (arithmetic, 4 bytes per float32 value):\n")
    print(projections())


if __name__ == "__main__":
    main()
