"""Seconds per step and extra memory held for old logits, per old-logit source, on one config.

    python benchmarks/sources.py --config configs/frozenlake.yaml --steps 8 [--sources ewma,snapshot,...] [overrides]

Runs each source for --steps steps (same seed, same levels) and prints a Markdown table of the mean over
steps 2.. (step 1 includes start-up) of the time breakdown, plus the peak extra memory for old logits.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from twofold.config import load_config
from twofold.pipeline.rundir import read_metrics
from twofold.pipeline.runner import Pipeline

ALL = "behavior,recompute,loglinear,linear,ewma,snapshot,dedicated,interrupt"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/frozenlake.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sources", default=ALL)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in args.sources.split(","):
            cfg = load_config(args.config, args.overrides + [f"oldlogits.source={src}", f"trainer.steps={args.steps}",
                                                             "run.progress=false", "run.checkpoint_every=0"])
            Pipeline(cfg, Path(tmp) / src).run()
            m = read_metrics(Path(tmp) / src / "metrics.jsonl")[1:]
            mean = lambda k: statistics.mean(r[k] for r in m)
            rows[src] = {k: mean(k) for k in ("time/step", "time/generation", "time/old_logits", "time/training",
                                              "time/weight_sync", "time/idle", "success/rate", "rollout/multi_version_frac")}
            rows[src]["peak_mb"] = max(r["memory/oldlogit_peak_bytes"] for r in m) / 1e6
            print(json.dumps({src: rows[src]}), flush=True)
    base = rows.get("behavior", {}).get("time/step")
    print("\n| source | s/step | vs behavior | generation | old logits | training | weight sync | idle | peak extra MB | multi-version traj |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for src, r in rows.items():
        rel = f"{100 * (r['time/step'] / base - 1):+.0f}%" if base else "n/a"
        print(f"| {src} | {r['time/step']:.2f} | {rel} | {r['time/generation']:.2f} | {r['time/old_logits']:.2f} | "
              f"{r['time/training']:.2f} | {r['time/weight_sync']:.3f} | {r['time/idle']:.2f} | {r['peak_mb']:.1f} | "
              f"{r['rollout/multi_version_frac']:.2f} |")


if __name__ == "__main__":
    main()
