"""`benchmarks/gpu_check.py`, the check to run on a lent GPU, in its CPU dry mode: every check runs end to end
on a tiny model and passes (vLLM's GPU check is skipped on CPU), and a check that raises is recorded as failed
without stopping the others."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_on_cpu_passes_every_check(tmp_path):
    out = tmp_path / "checks.jsonl"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["check"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["environment"]["device"] == "cpu" and records["environment"]["size"] == "tiny"
    statuses = {name: r["status"] for name, r in records.items() if name != "environment"}
    assert statuses == {
        "build_model": "passed",
        "bf16_step": "passed",
        "snapshot_exact": "passed",
        "chunked_logprob_memory": "passed",
        "fsdp_one_rank": "passed",
        "checkpoint_resume": "passed",
        "engine_sleep": "passed",
        "vllm_sleep": "skipped",
        "vllm_weights": "skipped",
        "prefix_tree": "passed",
        "sdpa_kernels": "skipped",
    }
    assert records["bf16_step"]["microbatches_of_half_the_rows"] > 1 and records["bf16_step"]["optimizer_steps"] == 2
    assert records["snapshot_exact"]["max_difference"] == 0.0  # bit for bit
    assert records["snapshot_exact"]["max_difference_after_update"] > 0  # the update did change the scores
    assert records["chunked_logprob_memory"]["peak_bytes_full"] is None  # no allocator statistics on CPU
    assert records["fsdp_one_rank"]["backend"] == "gloo"
    assert records["checkpoint_resume"]["restored_step"] == 1 and records["checkpoint_resume"]["engine_samples_equal"]
    assert records["engine_sleep"]["samples_equal_after_waking"] and records["engine_sleep"]["weight_bytes"] > 0
    assert records["engine_sleep"]["device_bytes_freed_by_sleep"] is None  # no allocator statistics on CPU
    tree = records["prefix_tree"]
    assert tree["tokens_in_tree"] < tree["tokens_real"] < tree["tokens_padded"]
    assert tree["fp32_hidden_relative"] < 1e-4 and tree["fp32_grads_relative"] < 1e-3
    assert tree["refusal"] is None and 0 < tree["shared_calls"] < tree["attention_calls"]
    assert records["bf16_step"]["shares_prefixes"]


def test_a_check_that_raises_is_recorded_as_failed(tmp_path):
    gpu_check = load_script()
    setup = gpu_check.Setup(tmp_path, torch.device("cpu"), gpu_check.SIZES["tiny"], tmp_path)
    record = gpu_check.run_check("boom", lambda s: 1 / 0, setup)
    assert record["check"] == "boom" and record["status"] == "failed"
    assert "ZeroDivisionError" in record["error"]
    assert gpu_check.run_check("fine", lambda s: {"ok": True, "value": 3}, setup)["status"] == "passed"
    assert gpu_check.run_check("no", lambda s: {"ok": False}, setup)["status"] == "failed"
    assert gpu_check.run_check("cpu", lambda s: {"skipped": "why"}, setup) | {"seconds": 0} == {
        "check": "cpu",
        "status": "skipped",
        "reason": "why",
        "seconds": 0,
    }
