"""How fast one decode step's matrix products can be on this CPU: SmolLM2-135M's Linear shapes at batch M (prints a
Markdown table).

python benchmarks/decode_gemm.py [--rows 16] [--threads 1,2] [--dtype float32|bfloat16]

Each shape runs over enough distinct weight matrices (~140 MB) that they stream from memory as in a real decode
step, through `F.linear` and, in float32, through MKL's packed weights (`torch.ops.mkl._mkl_linear`, what inductor
uses for frozen CPU weights; MKL packs float32 only). `--dtype bfloat16` is the built-in engine's GEMM on a CPU
with native bf16 matmul (AVX512-BF16 or AMX; elsewhere torch emulates it). GFLOP/s = 2 M N K / time; the last
column is the time these shapes take for one step of the 30-layer model (7 products a layer and the 49,152 x 576
LM head).
"""

import argparse
import time

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE, KV, VOCAB, LAYERS = 576, 1536, 192, 49_152, 30
# (out, in, times per step): q and o, k and v, gate and up, down, the LM head
SHAPES = [
    (HIDDEN, HIDDEN, 2 * LAYERS),
    (KV, HIDDEN, 2 * LAYERS),
    (INTERMEDIATE, HIDDEN, 2 * LAYERS),
    (HIDDEN, INTERMEDIATE, LAYERS),
    (VOCAB, HIDDEN, 1),
]
STREAMED_BYTES = 140e6


def _seconds_per_call(fn, count: int, repeats: int = 3) -> float:
    for i in range(min(count, 3)):
        fn(i)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(count):
            fn(i)
    return (time.perf_counter() - t0) / (repeats * count)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    m, dtype = args.rows, getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, M = {m}, {args.dtype}")
    print("| threads | out x in | F.linear GFLOP/s | MKL packed GFLOP/s | ms per decode step (F.linear) |")
    print("|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        step_ms = 0.0
        for n, k, per_step in SHAPES:
            count = max(1, int(STREAMED_BYTES // (n * k * dtype.itemsize)))
            weights = [torch.randn(n, k, dtype=dtype) for _ in range(count)]
            x = torch.randn(m, k, dtype=dtype)
            plain = _seconds_per_call(lambda i, x=x, w=weights: F.linear(x, w[i]), count)
            step_ms += plain * per_step * 1e3
            flops = 2 * m * n * k
            rates = f"{flops / plain / 1e9:.1f} | -"
            if dtype == torch.float32:
                packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights]
                mkl = _seconds_per_call(
                    lambda i, x=x, w=weights, p=packed: torch.ops.mkl._mkl_linear(x, p[i], w[i], None, m), count
                )
                rates = f"{flops / plain / 1e9:.1f} | {flops / mkl / 1e9:.1f}"
            print(f"| {threads} | {n} x {k} | {rates} | {plain * per_step * 1e3:.1f} |")
        print(f"| {threads} | all of one step | | | **{step_ms:.0f}** |")


if __name__ == "__main__":
    main()
