#!/usr/bin/env bash
# The third lent GPU run (one call). Carried: .whl (gymnasium and jsonschema wheels the image lacks), the tiny
# base model and the seed-5 warm start of configs/study/confirm-frozenlake-stale.yaml, so that the runs have a
# learning signal (the earlier GPU runs trained a model that never answered: every gradient was zero).
set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)' \
    > "$OUT/versions.txt" 2>&1
tf() { python3 -m twofold.cli "$@"; }
common=(--config configs/study/confirm-frozenlake-stale.yaml warmstart.seed=5 env.step_latency_ms=0
        trainer.steps=6 trainer.pack_sequences=true run.progress=false)

# Every source, async (W = 8), packed, warm-started; the approximate ones audited against exact snapshots.
# Run side by side (their own CUDA contexts): this checks behaviour, not speed.
run() {  # name, overrides...
    local name=$1; shift
    timeout 240 python3 -m twofold.cli train "${common[@]}" run.dir=/tmp/r_$name "$@" > "$OUT/train_$name.log" 2>&1
    echo "$name exit $?" >> "$OUT/exits.txt"
    cp /tmp/r_$name/metrics.jsonl "$OUT/$name-metrics.jsonl" 2>/dev/null
}
for s in snapshot dedicated interrupt; do run $s oldlogits.source=$s & done
for s in ewma recompute behavior linear loglinear; do run $s oldlogits.source=$s oldlogits.audit=true & done
run sync-snapshot mode=sync oldlogits.source=snapshot &
run lora-snapshot model.lora.r=8 oldlogits.source=snapshot run.checkpoint_every=3 &
wait
tf export /tmp/r_lora-snapshot "$OUT/lora-export" > "$OUT/export_lora.log" 2>&1; echo "export-lora exit $?" >> "$OUT/exits.txt"
tf export --merge /tmp/r_lora-snapshot /tmp/lora-merged > "$OUT/export_merged.log" 2>&1; echo "export-merged exit $?" >> "$OUT/exits.txt"
python3 - > "$OUT/reload_merged.log" 2>&1 <<'PY'
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained("/tmp/lora-merged", dtype=torch.bfloat16).cuda()
tok = AutoTokenizer.from_pretrained("/tmp/lora-merged")
ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
out = m.generate(ids.cuda(), max_new_tokens=8, do_sample=False)
print("reloaded on", m.device, "generated", out.shape[1] - ids.shape[1], "tokens")
PY
echo "reload-merged exit $?" >> "$OUT/exits.txt"

# Figures, alone on the GPU: the 0.5B shape (random weights), built-in engine, snapshots on host and on GPU.
timeout 200 python3 benchmarks/gpu.py --models 0.5b --engines builtin --steps 5 --out /tmp/gpu-bench \
    > "$OUT/gpu_bench.md" 2> "$OUT/gpu_bench.err"
echo "gpu-bench exit $?" >> "$OUT/exits.txt"
