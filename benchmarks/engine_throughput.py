"""Engine tokens/s at batch 1 and 16 on the tiny model (prints a Markdown table).

python benchmarks/engine_throughput.py [--backend builtin|vllm] [--dtype bfloat16] [--new-tokens 64]
    [--prompt-tokens N] [--batches 1,16] [--torch-bf16-matmul]

--prompt-tokens repeats the map up to N prompt tokens (a multi-turn context, where prefill dominates).
--torch-bf16-matmul: the built-in engine's Linear layers use torch's own bf16 kernels even on a CPU
without native bf16 matmul (the engine otherwise accumulates them in float32 there), to compare.
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
    ap.add_argument("--prompt-tokens", type=int, default=0)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--torch-bf16-matmul", action="store_true")
    args = ap.parse_args()
    path = ensure_tiny_model(ModelConfig(), tokenizer_corpus())
    tok = load_tokenizer(path)
    engine = make_engine(EngineConfig(backend=args.backend, dtype=args.dtype, gpu_memory_utilization=0.1), path, tok)
    prompt = tok.encode("P F F H\nF H F F\nF F F H\nH F F G", add_special_tokens=False)
    if args.prompt_tokens:
        prompt = (prompt * (args.prompt_tokens // len(prompt) + 1))[: args.prompt_tokens]
    if args.torch_bf16_matmul:
        for module in engine.model.modules():
            vars(module).pop("forward", None)  # back to the class's forward: torch's own kernels
    print(
        f"{args.backend}: torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}, "
        f"prompt {len(prompt)} tokens, CPU {torch.backends.cpu.get_cpu_capability()}"
        + (", torch bf16 matmul" if args.torch_bf16_matmul else "")
    )
    print("| batch | new tokens each | tokens/s |\n|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
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
