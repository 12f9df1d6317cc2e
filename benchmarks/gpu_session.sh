#!/usr/bin/env bash
# One call for the next lent GPU (prepared 2026-12-06, when the device tool had paused its loans: not yet run).
# The first run of shared prefixes (`trainer.share_prefixes`, on by default) on CUDA: gpu_check's prefix_tree check
# (tree vs padded in float32 and bfloat16, forward-backward ms, which CUDA attention kernels take the tree's masked
# grouped-head calls) before every other check, then tool use trained on cuda:0 with and without the tree.
#
# Carry .whl (gymnasium 1.2.2, Farama-Notifications 0.0.4, jsonschema 4.25.1, jsonschema-specifications 2025.9.1,
# referencing 0.36.2, rpds-py 0.28.0: `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`) and
# docs/results/data/warmstarts/tooluse-c5cf8b953542 (a model that calls tools, so every step has gradients).
# The tracked tree is ~64 MiB, the device tool's limit, most of it the study's warm starts: before the call, take
# them out of the index and ignore them (`git rm -r -q --cached docs/results/data/warmstarts` and
# `/docs/results/data/warmstarts/` in .git/info/exclude), carry the one above, and after it undo both
# (`git reset -q -- docs/results/data/warmstarts`). Returns 7 files: machine.txt (nvidia-smi, versions, exits),
# gpu_check.jsonl / .log, train.log and each training run's metrics.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)'; } \
    > "$OUT/machine.txt" 2>&1

# Every check, alone on the GPU, the new prefix-tree check first.
timeout 330 python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.jsonl" \
    --checks prefix_tree,bf16_step,snapshot_exact,chunked_logprob_memory,fsdp_one_rank,checkpoint_resume,engine_sleep,vllm_weights,vllm_sleep \
    > "$OUT/gpu_check.log" 2>&1
echo "gpu_check exit $?" >> "$OUT/machine.txt"

# Tool use on CUDA (trainer and built-in engine on cuda:0 by default), side by side: behaviour, not speed.
# sync: the same batches with and without the tree (step 1's loss and grad norm comparable);
# async with the EWMA audited against exact snapshots every step.
ws=docs/results/data/warmstarts/tooluse-c5cf8b953542
train() {  # name, overrides...
    local name=$1; shift
    timeout 170 python3 -m twofold.cli train --config configs/tooluse.yaml model.path=$ws model.warmstart=false \
        run.progress=false run.dir=/tmp/r_$name "$@" > /tmp/train_$name.log 2>&1
    echo "$name exit $?" >> "$OUT/machine.txt"
}
train sync-tree mode=sync trainer.steps=3 oldlogits.source=snapshot &
train sync-padded mode=sync trainer.steps=3 oldlogits.source=snapshot trainer.share_prefixes=false &
train async-tree trainer.steps=5 oldlogits.source=ewma oldlogits.audit=true &
wait
for n in sync-tree sync-padded async-tree; do
    echo "=== $n"; tr '\r' '\n' < /tmp/train_$n.log | grep -v '%|' | tail -40
    cp /tmp/r_$n/metrics.jsonl "$OUT/$n-metrics.jsonl" 2>/dev/null
done > "$OUT/train.log"
