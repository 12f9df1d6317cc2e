"""twofold's vLLM adapter against vLLM's own offline `generate`: tokens/s on the same engine, prompts and
sampling settings, side by side (target: the adapter at >= 90% of raw vLLM).

    python benchmarks/vllm_overhead.py                        # the tiny model, 64 prompts x 64 new tokens
    python benchmarks/vllm_overhead.py --model PATH --prompts 256 --new-tokens 256 --dtype bfloat16

The adapter drives vLLM's engine one scheduler step at a time (so a weight update can pause at a token
boundary) and returns per-token behaviour log-probs and versions; raw vLLM runs `LLM.generate` to the end.
Both ask for the sampled token's processed log-prob, with `ignore_eos` so every request makes exactly
`--new-tokens` tokens. Best of `--repeats`. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="a Hugging Face model directory (default: the tiny model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = ap.parse_args()

    import torch
    import vllm
    from vllm.inputs import TokensPrompt

    from twofold.config import EngineConfig, ModelConfig
    from twofold.engine.base import GenerationRequest, SamplingParams
    from twofold.engine.vllm import VLLMEngine
    from twofold.envs import tokenizer_corpus
    from twofold.models import ensure_tiny_model, load_tokenizer

    path = args.model or str(ensure_tiny_model(ModelConfig(), tokenizer_corpus()))
    tok = load_tokenizer(path)
    engine = VLLMEngine(
        path,
        EngineConfig(
            backend="vllm",
            dtype=args.dtype,
            max_batch_size=args.prompts,
            gpu_memory_utilization=args.gpu_memory_utilization,
        ),
        seed=0,
    )
    rng = random.Random(0)
    vocab = len(tok)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    raw_params = vllm.SamplingParams(
        temperature=1.0, max_tokens=args.new_tokens, logprobs=0, ignore_eos=True, detokenize=False, seed=None
    )
    ours = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)

    def raw() -> int:
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], raw_params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def adapter() -> int:
        results = engine.generate([GenerationRequest(i, p, ours) for i, p in enumerate(prompts)])
        return sum(len(r.output_ids) for r in results)

    best = {}
    for name, fn in (("vLLM LLM.generate", raw), ("twofold VLLMEngine.generate", adapter)):
        fn()  # warm-up (graph capture, caches)
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens = fn()
            rates.append(tokens / (time.perf_counter() - t0))
        best[name] = max(rates)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (vLLM's CPU build)"
    print(
        f"{device}; vllm {vllm.__version__}; {path}; {args.prompts} prompts x {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens each, {args.dtype}, best of {args.repeats}\n"
    )
    print("| path | tokens/s | vs raw vLLM |")
    print("|---|---|---|")
    base = best["vLLM LLM.generate"]
    for name, rate in best.items():
        print(f"| {name} | {rate:,.0f} | {rate / base:.0%} |")
    engine.close()


if __name__ == "__main__":
    main()
