"""Engine tokens/s at batch 1 and 16 (prints Markdown tables).

python benchmarks/engine_throughput.py [--model PATH] [--backend builtin|vllm] [--dtype bfloat16] [--new-tokens 64]
    [--prompt-tokens N] [--batches 1,16] [--torch-bf16-matmul | --float32-weights] [--compare-hf] [--turns K]

--model: any model path twofold accepts (a folder, a .gguf file, a Hub ID, `smollm2-135m-instruct`); default the
tiny model. --prompt-tokens repeats the map up to N prompt tokens (a multi-turn context, where prefill dominates).
--torch-bf16-matmul: the built-in engine's Linear layers and attention use torch's own bf16 kernels even on a CPU
without native bf16 matmul (where the engine otherwise holds its weights in float32 and multiplies and attends in
float32), to compare;
--float32-weights: the float32 path even on a CPU with native bf16 matmul.
--compare-hf: also time transformers' `generate` in float32 on the same prompts in the same process (sampling at
temperature 1, no top-k/top-p, exactly --new-tokens each, as the engine).
--turns K: instead, K-turn episodes of --batches rows that share the prompt as system prompt (each turn appends
the reply and an 8-token observation), with the built-in engine's prefix cache on and off: prefilled and reused
tokens, and generated tokens/s.
"""

import argparse
import time

import torch

from twofold.config import EngineConfig, ModelConfig
from twofold.engine import make_engine
from twofold.engine.base import GenerationRequest, SamplingParams
from twofold.engine.builtin import (
    BuiltinEngine,
    hold_weights_in_float32_,
    lacks_native_low_precision_matmul,
    use_cpu_attention_,
)
from twofold.engine.prefix_cache import DEFAULT_MAX_BYTES
from twofold.envs import tokenizer_corpus
from twofold.modelpath import resolve_model_source
from twofold.models import ensure_tiny_model, load_model, load_tokenizer

OBSERVATION_TOKENS = 8


def _args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="model path (default: the tiny model)")
    ap.add_argument("--backend", default="builtin", choices=["builtin", "vllm"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=0)
    ap.add_argument("--batches", default="1,16")
    matmul = ap.add_mutually_exclusive_group()
    matmul.add_argument("--torch-bf16-matmul", action="store_true")
    matmul.add_argument("--float32-weights", action="store_true")
    ap.add_argument("--compare-hf", action="store_true")
    ap.add_argument("--turns", type=int, default=0)
    args = ap.parse_args()
    if args.turns and args.backend != "builtin":
        ap.error("--turns measures the built-in engine's prefix cache: --backend builtin")
    return args


def _set_matmul(engine, args) -> None:
    if args.torch_bf16_matmul:
        engine.model.to(engine.dtype)
        for module in engine.model.modules():
            vars(module).pop("forward", None)  # back to the class's forward: torch's own kernels
        engine.model.set_attn_implementation("sdpa")
    elif args.float32_weights and not lacks_native_low_precision_matmul(engine.device, engine.dtype):
        hold_weights_in_float32_(engine.model, engine.dtype)
        use_cpu_attention_(engine.model)


def _best_tokens_per_s(run, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = run()
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def _engine_tokens(engine, prompt: list[int], batch: int, new_tokens: int) -> int:
    params = SamplingParams(max_new_tokens=new_tokens)
    out = engine.generate([GenerationRequest(i, prompt, params) for i in range(batch)])
    return sum(len(o.output_ids) for o in out)


def _hf_tokens(model, prompt: list[int], batch: int, new_tokens: int, pad_id: int) -> int:
    ids = torch.tensor([prompt] * batch)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_id,
    )
    return (out.shape[1] - ids.shape[1]) * batch


def throughput(args, path, tok, prompt: list[int]) -> None:
    engine = make_engine(EngineConfig(backend=args.backend, dtype=args.dtype, gpu_memory_utilization=0.1), path, tok)
    if args.backend == "builtin":
        _set_matmul(engine, args)
    hf = load_model(path) if args.compare_hf else None
    print("| batch | new tokens each | engine tokens/s |" + (" transformers float32 tokens/s | ratio |" if hf else ""))
    print("|---|---|---|" + ("---|---|" if hf else ""))
    for batch in (int(b) for b in args.batches.split(",")):
        _engine_tokens(engine, prompt, 1, args.new_tokens)  # warm-up
        ours = _best_tokens_per_s(lambda b=batch: _engine_tokens(engine, prompt, b, args.new_tokens), args.repeats)
        row = f"| {batch} | {args.new_tokens} | {ours:,.0f} |"
        if hf is not None:
            with torch.no_grad():
                _hf_tokens(hf, prompt, 1, args.new_tokens, tok.pad_token_id or tok.eos_token_id)
                theirs = _best_tokens_per_s(
                    lambda b=batch: _hf_tokens(hf, prompt, b, args.new_tokens, tok.pad_token_id or tok.eos_token_id),
                    args.repeats,
                )
            row += f" {theirs:,.0f} | {ours / theirs:.2f}x |"
        print(row)
    engine.close()


def _observation(prompt: list[int], index: int) -> list[int]:
    """`OBSERVATION_TOKENS` tokens of the prompt from a place that moves with `index`, so observations differ."""
    start = (3 * index) % len(prompt)
    return (prompt[start:] + prompt)[:OBSERVATION_TOKENS]


def _episodes(engine, prompt: list[int], batch: int, turns: int, new_tokens: int) -> tuple[int, int, int]:
    """`batch` episodes of `turns` turns on `prompt` as system prompt; returns (generated, prefilled, reused)."""
    params = SamplingParams(max_new_tokens=new_tokens)
    contexts = [prompt + _observation(prompt, e * turns) for e in range(batch)]
    prefilled, reused, generated = engine.prefilled_tokens, engine.reused_tokens, 0
    for turn in range(1, turns + 1):
        out = engine.generate([GenerationRequest(e, c, params) for e, c in enumerate(contexts)])
        generated += sum(len(o.output_ids) for o in out)
        contexts = [
            c + o.output_ids + _observation(prompt, e * turns + turn)
            for e, (c, o) in enumerate(zip(contexts, out, strict=True))
        ]
    return generated, engine.prefilled_tokens - prefilled, engine.reused_tokens - reused


def multi_turn(args, path, prompt: list[int]) -> None:
    print(f"{args.turns}-turn episodes, {OBSERVATION_TOKENS}-token observations, {args.new_tokens} new tokens a turn")
    print("| episodes | prefix cache | prefilled tokens | reused tokens | generated tokens/s |\n|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        for cache_bytes, label in ((0, "off"), (DEFAULT_MAX_BYTES, "on")):
            engine = BuiltinEngine(path, dtype=args.dtype, prefix_cache_bytes=cache_bytes)
            _set_matmul(engine, args)
            _episodes(engine, prompt, 1, 1, args.new_tokens)  # warm-up
            counts = []

            def run(engine=engine, batch=batch, counts=counts):
                engine.prefix_cache.clear()  # each repeat starts cold, as after a weight update
                generated, prefilled, reused = _episodes(engine, prompt, batch, args.turns, args.new_tokens)
                counts[:] = [prefilled, reused]
                return generated

            best = _best_tokens_per_s(run, args.repeats)
            print(f"| {batch} | {label} | {counts[0]:,} | {counts[1]:,} | {best:,.0f} |")


def main():
    args = _args()
    path = resolve_model_source(args.model) if args.model else ensure_tiny_model(ModelConfig(), tokenizer_corpus())
    tok = load_tokenizer(path)
    prompt = tok.encode("P F F H\nF H F F\nF F F H\nH F F G", add_special_tokens=False)
    if args.prompt_tokens:
        prompt = (prompt * (args.prompt_tokens // len(prompt) + 1))[: args.prompt_tokens]
    matmul = ""
    if args.torch_bf16_matmul:
        matmul = ", torch bf16 matmul"
    elif args.float32_weights:
        matmul = ", float32-held weights"
    print(
        f"{args.backend}: {path.name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"dtype {args.dtype}, prompt {len(prompt)} tokens, CPU {torch.backends.cpu.get_cpu_capability()}{matmul}"
    )
    if args.turns:
        multi_turn(args, path, prompt)
    else:
        throughput(args, path, tok, prompt)


if __name__ == "__main__":
    main()
