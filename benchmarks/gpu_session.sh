#!/usr/bin/env bash
# One call for the next lent GPU (prepared 2026-12-06, when the device tool had paused its loans: not yet run).
# The first run of shared prefixes (`trainer.share_prefixes`, on by default) on CUDA: gpu_check's prefix_tree check
# (tree vs padded in float32 and bfloat16, forward-backward ms, which CUDA attention kernels take the tree's masked
# grouped-head calls) before every other check, then tool use trained on cuda:0 with and without the tree.
#
# Carry .whl (gymnasium 1.2.2, Farama-Notifications 0.0.4, jsonschema 4.25.1, jsonschema-specifications 2025.9.1,
# referencing 0.36.2, rpds-py 0.28.0: `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`) and
# docs/results/data/warmstarts/tooluse-c5cf8b953542 (a model that calls tools, so every step has gradients).
# The tracked tree is ~64 MiB, the device tool's limit, most of it the study's warm starts. Commit first (the
# call sends the working tree, uncommitted edits too), write `git log -1 --oneline; git status --short` into
# git-state.txt (untracked, so it travels; delete it afterwards), then take the warm starts out of the index and
# ignore them: `git rm -r -q --cached
# docs/results/data/warmstarts` and `/docs/results/data/warmstarts/` in .git/info/exclude; carry the one above.
# Commit nothing until both are undone after the call: `git reset -q -- docs/results/data/warmstarts` and the
# exclude line removed. Returns 8 files at most: machine.txt (nvidia-smi, versions, the commit, exits),
# gpu_check.jsonl and .log, train.log (each run's log tail and its warnings, appended as each run ends) and each
# training run's metrics.
set -u
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
cat git-state.txt > "$OUT/machine.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    >> "$OUT/machine.txt" 2>&1 || { echo "pip install of .whl failed" >> "$OUT/machine.txt"; exit 1; }
{ nvidia-smi; python3 -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)'; } \
    >> "$OUT/machine.txt" 2>&1

# Every check alone on the GPU, in three processes with their own time limits (all append to one file): the
# prefix tree first (a sticky CUDA error in its untried path must not fail the checks after it), the
# attention-kernel survey second (the other reason for this call), then the rest; checkpoint_resume (55-76 s,
# passed on two GPUs already) is left out to keep the call inside its limit.
check() {  # seconds, checks
    timeout -k 10 "$1" python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.jsonl" --checks "$2" \
        >> "$OUT/gpu_check.log" 2>&1
    echo "gpu_check $2 exit $?" >> "$OUT/machine.txt"
}
check 120 prefix_tree
check 60 sdpa_kernels
check 150 bf16_step,snapshot_exact,chunked_logprob_memory,fsdp_one_rank,engine_sleep,vllm_weights,vllm_sleep

# Tool use on CUDA (trainer and built-in engine on cuda:0 by default), side by side: behaviour, not speed.
# sync: the same batches with and without the tree (step 1's loss and grad norm comparable); async in bfloat16
# autocast with the EWMA audited against exact snapshots every step.
ws=docs/results/data/warmstarts/tooluse-c5cf8b953542
train() {  # name, overrides...
    local name=$1; shift
    timeout -k 15 150 python3 -m twofold.cli train --config configs/tooluse.yaml model.path=$ws model.warmstart=false \
        run.progress=false run.dir=/tmp/r_$name "$@" > /tmp/train_$name.log 2>&1
    local code=$?
    echo "$name exit $code" >> "$OUT/machine.txt"
    { echo "=== $name (exit $code)"; grep -iE "share|prefix|pack|warn|error|Traceback" /tmp/train_$name.log | head -20
      echo "--- tail"; tr '\r' '\n' < /tmp/train_$name.log | grep -v '%|' | tail -25; } >> "$OUT/train.log"
    cp /tmp/r_$name/metrics.jsonl "$OUT/$name-metrics.jsonl" 2>/dev/null
}
train sync-tree mode=sync trainer.steps=3 oldlogits.source=snapshot &
train sync-padded mode=sync trainer.steps=3 oldlogits.source=snapshot trainer.share_prefixes=false &
train async-tree-bf16 trainer.steps=5 trainer.dtype=bfloat16 oldlogits.source=ewma oldlogits.audit=true &
wait
