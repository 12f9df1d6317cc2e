"""Engine tokens/s at batch 1 and 16 on the tiny model (prints a Markdown table).

python benchmarks/engine_throughput.py [--backend builtin|vllm] [--dtype bfloat16] [--new-tokens 64]
"""

import argparse
import time

import torch

from twofold.config import EngineConfig, ModelConfig
from twofold.engine import make_engine
from twofold.engine.base import GenerationRequest, SamplingParams
from twofold.envs import tokenizer_corpus
from twofold.models import ensure_tiny_model, load_tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="builtin", choices=["builtin", "vllm"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = ensure_tiny_model(ModelConfig(), tokenizer_corpus())
    tok = load_tokenizer(path)
    engine = make_engine(EngineConfig(backend=args.backend, dtype=args.dtype, gpu_memory_utilization=0.1), path, tok)
    prompt = tok.encode("P F F H\nF H F F\nF F F H\nH F F G", add_special_tokens=False)
    print(
        f"{args.backend}: torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}, "
        f"prompt {len(prompt)} tokens"
    )
    print("| batch | new tokens each | tokens/s |\n|---|---|---|")
    for batch in (1, 16):
        params = SamplingParams(max_new_tokens=args.new_tokens)
        engine.generate([GenerationRequest(0, prompt, params)])  # warm-up
        best = 0.0
        for _ in range(args.repeats):
            reqs = [GenerationRequest(i, prompt, params) for i in range(batch)]
            t0 = time.perf_counter()
            out = engine.generate(reqs)
            dt = time.perf_counter() - t0
            best = max(best, sum(len(o.output_ids) for o in out) / dt)
        print(f"| {batch} | {args.new_tokens} | {best:,.0f} |")


if __name__ == "__main__":
    main()
