"""The GPU paths on a GPU, in one short run: what to run first whenever a GPU machine is lent (issue #35).

    python benchmarks/gpu_check.py --out runs/gpu_check.jsonl                  # one GPU, a random 0.5B model
    python benchmarks/gpu_check.py --device cpu --out /tmp/gpu_check.jsonl     # the same checks, tiny, on CPU

Needs no network: the model is a random one of Qwen2.5-0.5B's shape (`--size 0.5b`; `tiny` on CPU), built from a
config and saved to a temporary folder with a BPE tokenizer trained here. Each check is independent: it builds
what it needs, and a check that fails (or raises) is recorded with its error and the next one runs. One JSON line
per check goes to `--out` as soon as it finishes (so a run cut short keeps what it did), with its status
(passed / failed / skipped), its seconds and its numbers; the exit code is 1 when any check failed.

Checks:
  bf16_step               a training step in bfloat16 autocast with micro-batches and gradient checkpointing
  snapshot_exact          old log-probs rescored from a snapshot in host memory equal, bit for bit, what the
                          live weights gave before the update
  chunked_logprob_memory  chunked log-probs equal the full computation, and their peak memory is lower by at
                          least half a [tokens, vocabulary] float32 logits tensor (torch.cuda.max_memory_allocated;
                          not measured on CPU)
  fsdp_one_rank           a trainer built on the meta device and sharded by FSDP2 over a one-rank NCCL group
                          (gloo on CPU) takes the step the plain trainer takes
  checkpoint_resume       save, keep training, restore into fresh parts (twice): the same engine samples (the
                          engine's device RNG), and the same next step and EWMA average as the straight run,
                          within the spread of the two restored runs (0 on CPU: bit-identical)
  engine_sleep            the built-in engine asleep (`engine.sleep`) holds none of its weights' memory on its
                          device (torch.cuda.memory_allocated; resident bytes on CPU) and, given the next weights,
                          samples exactly what an engine that stayed awake samples
  vllm_sleep              vLLM beside the trainer with sleep mode (when importable): its GPU memory handed back
                          while asleep (torch.cuda.mem_get_info), woken by a weight update that its samples follow
                          (skipped on CPU: vLLM's sleep mode is CUDA/ROCm only; not yet run on a GPU)
  vllm_weights            vLLM on the GPU (when importable): version stamps before and after a weight update,
                          and behaviour log-probs that follow the new weights (skipped on CPU: tests/test_vllm.py
                          runs vLLM's CPU build; not yet run on a GPU: neither lent image had vLLM)
  prefix_tree             a tool task's batch (one system prompt, 4 short prompts under it, 4 completions each)
                          over its prefix tree, short nodes sharing attention calls: the start-up trial passes;
                          hidden states and log-probs (1e-4 relative) and gradients (1e-3) equal the padded
                          forward's in float32, and in bfloat16 autocast stay as close to the float32 padded ones
                          as the bfloat16 padded forward does (within 2x); forward-backward ms and peak bytes
                          padded, packed and as a tree
  sdpa_kernels            which of CUDA's attention kernels take a tree node's masked call with grouped KV heads
                          in place and repeated (forward and backward, bf16 and float32), their ms, and the kernel
                          torch picks by itself (skipped on CPU)

Ran: docs/gpu/2026-12-04-h200/ (every check but vllm_weights) and docs/gpu/2026-12-04-h200-second/
(checkpoint_resume and snapshot_exact), one H200 each.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# The repository root, so that the check runs from a copy of the working tree without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twofold.config import Config, config_from_dict  # noqa: E402
from twofold.distributed import Ranks, free_port, is_sharded  # noqa: E402
from twofold.logprobs import (  # noqa: E402
    Numerics,
    pad_right,
    policy_logprobs,
    prefix_sharing_trial,
    score_sequences,
    token_logprobs,
)
from twofold.models import gathered_state, iter_full_weights, load_model, load_policy, save_random_model  # noqa: E402
from twofold.oldlogits import BehaviorSource, SnapshotSource, SourceContext, make_source  # noqa: E402
from twofold.prefix_tree import MIN_SHARED_TOKENS, TreeAttention, prefix_tree, prefix_tree_decoder_states  # noqa: E402
from twofold.rollout.trajectory import Batch, Trajectory  # noqa: E402
from twofold.trainer.trainer import Trainer  # noqa: E402


@dataclass(frozen=True)
class Size:
    """A model shape and the work each check does with it."""

    model: dict
    reply_lengths: tuple[int, ...]  # agent tokens of each trajectory (after a prompt a quarter as long)
    microbatch_tokens: int  # trainer.max_tokens_per_microbatch: several micro-batches per minibatch
    memory_tokens: int  # the sequence of the log-prob memory check
    chunk: int  # trainer.logprob_chunk_size


SIZES = {
    # Qwen2.5-0.5B's shape (494M parameters with the tied head)
    "0.5b": Size(
        model=dict(
            vocab_size=151936,
            hidden_size=896,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            intermediate_size=4864,
            tie_word_embeddings=True,
        ),
        reply_lengths=(900, 700, 520, 400, 330, 260, 200, 150),
        microbatch_tokens=2048,
        memory_tokens=4096,
        chunk=512,
    ),
    "tiny": Size(
        model=dict(
            vocab_size=2048,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            tie_word_embeddings=True,
        ),
        reply_lengths=(24, 20, 17, 14, 12, 10, 8, 6),
        microbatch_tokens=64,
        memory_tokens=128,
        chunk=32,
    ),
}


@dataclass
class Setup:
    path: Path
    device: torch.device
    size: Size
    workdir: Path

    def config(self, **trainer) -> Config:
        """A run's config for this model and device: bfloat16 autocast, gradient checkpointing, micro-batches
        (overridable per check)."""
        dev = str(self.device)
        return config_from_dict(
            {
                "model": {"path": str(self.path), "warmstart": False},
                "engine": {"device": dev, "dtype": "bfloat16"},
                "trainer": {
                    "device": dev,
                    "dtype": "bfloat16",
                    "gradient_checkpointing": True,
                    "max_tokens_per_microbatch": self.size.microbatch_tokens,
                    "logprob_chunk_size": self.size.chunk,
                    "num_minibatches": 2,
                    "lr": 1e-4,
                    **trainer,
                },
                "loss": {"aggregation": "seq-mean-token-mean"},
                "oldlogits": {"source": "ewma", "snapshot_device": "cpu"},
            }
        )


# --------------------------------------------------------------------------- shared pieces


def random_batch(model: torch.nn.Module, size: Size, numerics: Numerics, version: int = 0, seed: int = 0) -> Batch:
    """Trajectories of random tokens (groups of two, random rewards), behaviour log-probs = the model's own plus
    noise, every agent token of `version`."""
    vocab = model.config.vocab_size
    rng = random.Random(seed)
    trajectories = []
    for i, n in enumerate(size.reply_lengths):
        t = Trajectory(uid=i, group_id=i // 2, level_seed=0)
        t.append([rng.randrange(vocab) for _ in range(max(2, n // 4))], agent=False)
        t.append([rng.randrange(vocab) for _ in range(n)], agent=True, logprobs=[0.0] * n, versions=[version] * n)
        t.turn_rewards.append(rng.random())
        trajectories.append(t)
    noise = torch.Generator().manual_seed(seed)
    for t, lp in zip(trajectories, score_sequences(model, [t.token_ids for t in trajectories], numerics), strict=True):
        lp = lp + 0.05 * torch.randn(len(lp), generator=noise)
        t.behavior_logprobs = [float(v) if m else 0.0 for v, m in zip(lp, t.loss_mask, strict=True)]
    return Batch.from_trajectories(trajectories, pad_id=0)


def source_context(trainer: Trainer, async_mode: bool = True) -> SourceContext:
    """Where the sources score and keep state: the trainer's numerics and device; snapshots in host memory."""
    t = trainer.cfg.trainer
    return SourceContext(
        pad_id=0,
        async_mode=async_mode,
        max_staleness=1,
        updates_per_version=t.ppo_epochs * t.num_minibatches,
        numerics=trainer.numerics,
        device=trainer.numerics.device,
        snapshot_device=torch.device("cpu"),
    )


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].detach().cpu().float() - b[n].detach().cpu().float()).abs().max()) for n in a)


def update_difference(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], start: dict) -> float:
    """||got - expected|| / ||expected - start|| over all weights: how far apart two runs' updates from the same
    `start` are, relative to the update itself. 0 when bit-identical (as on CPU); a GPU's atomic adds (embedding
    and attention backward) make two runs of one step differ: 0.95% of the update on an H200 for the 0.5B shape
    (docs/gpu/2026-12-04-h200-second/), Adam's normalisation amplifying rounding in near-zero gradients."""

    def sq(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach().cpu().double() - b.detach().cpu().double()).square().sum())

    apart = sum(sq(got[n], expected[n]) for n in expected)
    moved = sum(sq(expected[n], start[n]) for n in expected)
    return math.sqrt(apart / moved) if moved > 0 else math.inf


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device, run: Callable[[], object]) -> int | None:
    """Peak allocated bytes on `device` while `run()` runs, above what was allocated before; None off CUDA."""
    if device.type != "cuda":
        run()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# --------------------------------------------------------------------------- the checks


def check_bf16_step(s: Setup) -> dict:
    cfg = s.config()
    trainer = Trainer(load_policy(s.path, cfg.model), cfg)
    batch = random_batch(trainer.model, s.size, trainer.numerics)
    before = gathered_state(trainer.model)
    half = batch.select(list(range(len(batch.trajectories) // 2)))
    microbatches = len(trainer.my_microbatches(half))
    metrics = {}
    start = time.perf_counter()
    peak = peak_bytes(
        s.device, lambda: metrics.update(trainer.train_step(batch, BehaviorSource(source_context(trainer))))
    )
    seconds = time.perf_counter() - start
    moved = max_difference(gathered_state(trainer.model), before)
    ok = (
        math.isfinite(metrics["loss/value"])
        and math.isfinite(metrics["loss/grad_norm"])
        and metrics["trainer/optimizer_steps"] == 2
        and microbatches > 1
        and moved > 0
    )
    return {
        "ok": ok,
        "step_seconds": seconds,
        "peak_bytes": peak,
        "microbatches_of_half_the_rows": microbatches,
        "loss": metrics["loss/value"],
        "grad_norm": metrics["loss/grad_norm"],
        "optimizer_steps": metrics["trainer/optimizer_steps"],
        "max_weight_change": moved,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "shares_prefixes": trainer.numerics.share_prefixes,  # false when the start-up trial refused the tree here
    }


def check_snapshot_exact(s: Setup) -> dict:
    cfg = s.config()
    trainer = Trainer(load_policy(s.path, cfg.model), cfg)
    ctx = source_context(trainer)
    batch = random_batch(trainer.model, s.size, trainer.numerics)
    source = SnapshotSource(ctx, trainer.model, budget_bytes=None)
    source.prepare(batch, trainer.model, 0, [])  # captured with the live weights W_0
    live = source.old_logprobs(batch, None, 0)
    source.release(batch.trajectories)
    source.before_update(trainer.model, 0, [])  # the snapshot of W_0, in (pinned) host memory
    trainer.train_step(batch, BehaviorSource(ctx))
    source.prepare(batch, trainer.model, 1, [])  # W_0's tokens, now scored from the snapshot
    rescored = source.old_logprobs(batch, None, 1)
    now = ctx.score_batch(trainer.model, batch)
    tokens = int(batch.loss_mask.sum())
    return {
        "ok": torch.equal(rescored, live) and float((now - live).abs().max()) > 0,
        "tokens": tokens,
        "max_difference": float((rescored - live).abs().max()),
        "max_difference_after_update": float((now - live).abs().max()),
        "snapshot_bytes": source.store.bytes,
    }


def check_chunked_logprob_memory(s: Setup) -> dict:
    model = load_model(s.path).to(s.device).train()
    vocab = model.config.vocab_size
    ids, attn = pad_right([[random.Random(1).randrange(vocab) for _ in range(s.size.memory_tokens)]], 0)
    ids, attn = ids.to(s.device), attn.to(s.device)
    results = {}

    def forward_backward(chunk: int) -> None:
        lp = token_logprobs(model, ids, attn, 1.0, chunk)
        lp.sum().backward()
        results[chunk] = lp.detach()
        model.zero_grad(set_to_none=True)

    forward_backward(s.size.chunk)  # warm-up: kernels, allocator
    chunked = peak_bytes(s.device, lambda: forward_backward(s.size.chunk))
    full = peak_bytes(s.device, lambda: forward_backward(0))
    logits_bytes = (s.size.memory_tokens - 1) * vocab * 4  # one [tokens, V] float32 logits tensor
    difference = float((results[s.size.chunk] - results[0]).abs().max())
    saved = None if full is None else full - chunked
    return {
        "ok": difference < 1e-4 and (saved is None or saved > logits_bytes / 2),
        "tokens": s.size.memory_tokens,
        "chunk": s.size.chunk,
        "max_difference": difference,
        "peak_bytes_chunked": chunked,
        "peak_bytes_full": full,
        "one_logits_tensor_bytes": logits_bytes,
        "memory": "measured" if full is not None else "not measured (no CUDA allocator statistics on CPU)",
    }


def check_fsdp_one_rank(s: Setup) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from twofold.logprobs import DTYPES
    from twofold.sharding import load_sharded_policy

    cfg = s.config(dtype="float32")  # float32, to compare the two steps closely
    plain = Trainer(load_policy(s.path, cfg.model), cfg)
    batch = random_batch(plain.model, s.size, plain.numerics)
    start = gathered_state(plain.model)
    expected = plain.train_step(batch, BehaviorSource(source_context(plain)))
    expected_weights = gathered_state(plain.model)
    del plain
    gc.collect()
    backend = "nccl" if s.device.type == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh(s.device.type, (1,))
        policy = load_sharded_policy(s.path, cfg.model, Ranks(), s.device, DTYPES[cfg.trainer.fsdp_param_dtype], mesh)
        sharded = Trainer(policy, cfg)
        got = sharded.train_step(batch, BehaviorSource(source_context(sharded)))
        weights = gathered_state(sharded.model)
        sharded_parameters = all(is_sharded(p) for p in sharded.model.parameters())
    finally:
        dist.destroy_process_group()
    relative = update_difference(weights, expected_weights, start)
    return {
        "ok": (
            sharded_parameters
            and math.isclose(got["loss/value"], expected["loss/value"], rel_tol=1e-5, abs_tol=1e-6)
            and math.isclose(got["loss/grad_norm"], expected["loss/grad_norm"], rel_tol=1e-4)
            and relative < 1e-2
        ),
        "backend": backend,
        "loss": [got["loss/value"], expected["loss/value"]],
        "grad_norm": [got["loss/grad_norm"], expected["loss/grad_norm"]],
        "max_weight_difference": max_difference(weights, expected_weights),
        "update_difference": relative,
    }


def check_checkpoint_resume(s: Setup) -> dict:
    from twofold.engine.base import GenerationRequest, SamplingParams
    from twofold.engine.builtin import BuiltinEngine
    from twofold.pipeline.checkpoint import RunParts, restore_run, restore_source, save_checkpoint
    from twofold.rollout.versions import Admission

    cfg = s.config()
    request = GenerationRequest(0, [1, 2, 3, 4], SamplingParams(max_new_tokens=8))

    def parts(run_dir: Path, engine_seed: int):
        trainer = Trainer(load_policy(s.path, cfg.model), cfg, seed=0)
        engine = BuiltinEngine(s.path, dtype="bfloat16", device=str(s.device), seed=engine_seed)
        source = make_source(cfg, source_context(trainer), trainer.model)
        return RunParts(run_dir, trainer, Admission(1, 2, "drop"), Ranks(), engine, keep_checkpoints=1), source

    def step(p: RunParts, source, batch) -> dict:
        model = p.trainer.model
        return p.trainer.train_step(batch, source, after_optimizer_step=lambda: source.after_optimizer_step(model))

    run_dir = s.workdir / "resume"
    straight, source = parts(run_dir, engine_seed=0)
    batches = [random_batch(straight.trainer.model, s.size, straight.trainer.numerics, seed=k) for k in (1, 2)]
    step(straight, source, batches[0])
    saved = save_checkpoint(straight, 1, source)
    at_save = gathered_state(straight.trainer.model)
    samples = straight.engine.generate([request])[0].output_ids
    expected = step(straight, source, batches[1])
    expected_weights, expected_average = gathered_state(straight.trainer.model), source.ewma.params
    del straight

    def resume_and_step() -> dict:
        resumed, source = parts(run_dir, engine_seed=12345)  # the engine's generator must come from the checkpoint
        restored = restore_run(resumed, saved)
        restore_source(source, restored.source_state, Ranks())
        out = {
            "step": restored.step,
            "samples": resumed.engine.generate([request])[0].output_ids,
            "restored_weights": max_difference(gathered_state(resumed.trainer.model), at_save),
        }
        out["metrics"] = step(resumed, source, batches[1])
        out["weights"], out["average"] = gathered_state(resumed.trainer.model), source.ewma.params
        return out

    # The same step from the same checkpoint twice: how far two runs of one step drift apart on this device
    # (0 on CPU; a GPU's atomic adds in the backward, amplified by Adam's normalisation of near-zero gradients,
    # can move them apart), the floor the resumed run is held to.
    first = resume_and_step()
    second = resume_and_step()
    got = first["metrics"]
    relative = update_difference(first["weights"], expected_weights, at_save)
    floor = update_difference(second["weights"], first["weights"], at_save)
    ewma_relative = update_difference(first["average"], expected_average, at_save)
    ewma_floor = update_difference(second["average"], first["average"], at_save)
    return {
        "ok": (
            first["step"] == 1
            and first["restored_weights"] == 0.0
            and first["samples"] == samples == second["samples"]
            # within the device's own run-to-run spread (3x, and never more than 5e-2 of the update; an H200's
            # spread is ~1e-2): a resume that lost the optimizer state or the EWMA average moves it by O(1)
            and relative <= min(3 * floor + 1e-6, 5e-2)
            and ewma_relative <= min(3 * ewma_floor + 1e-6, 5e-2)
        ),
        "restored_step": first["step"],
        "restored_weight_difference": first["restored_weights"],
        "engine_samples_equal": first["samples"] == samples,
        # resumed, straight, resumed again: a scalar of cancelling terms (advantages sum to 0 per group), so its
        # rounding spread is reported, not bounded
        "loss": [got["loss/value"], expected["loss/value"], second["metrics"]["loss/value"]],
        "max_weight_difference": max_difference(first["weights"], expected_weights),
        "update_difference": relative,
        "update_difference_run_to_run": floor,
        "max_ewma_difference": max_difference(first["average"], expected_average),
        "ewma_difference": ewma_relative,
        "ewma_difference_run_to_run": ewma_floor,
        "checkpoint_bytes": sum(f.stat().st_size for f in saved.iterdir()),
    }


def check_vllm_weights(s: Setup) -> dict:
    """Each weight-transfer path this machine allows (`engine.weight_transfer`): host and ipc with the engine on
    the trainer's GPU, nccl with the engine on a second GPU when there is one."""
    if s.device.type != "cuda":
        return {"skipped": "vLLM's GPU path; on CPU, tests/test_vllm.py runs vLLM's CPU build (the host path)"}
    try:
        from twofold.engine.vllm import VLLMEngine  # noqa: F401
    except ImportError as e:
        return {"skipped": f"vLLM is not importable here ({e})"}
    paths = {"host": "cuda:0", "ipc": "cuda:0"}
    if torch.cuda.device_count() > 1:
        paths["nccl"] = "cuda:1"
    results = {path: vllm_weights_on(s, path, device) for path, device in paths.items()}
    if "nccl" not in results:
        results["nccl"] = {"skipped": "one GPU: the nccl path needs the engine on a GPU of its own"}
    return {"ok": all(r.get("ok", True) for r in results.values()), **results}


def vllm_weights_on(s: Setup, path: str, engine_device: str) -> dict:
    """Version stamps before and after a weight update over `path`, and behaviour log-probs that follow the new
    weights (and no longer the old ones)."""
    from twofold.config import EngineConfig
    from twofold.engine.base import GenerationRequest, SamplingParams
    from twofold.engine.vllm import VLLMEngine

    cfg = EngineConfig(
        backend="vllm",
        device=engine_device,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_batch_size=4,
        weight_transfer=path,
    )
    engine = VLLMEngine(s.path, cfg, trainer_device=str(s.device))
    try:
        model = load_model(s.path).to(s.device)
        prompt = [1, 2, 3, 4, 5, 6, 7, 8]

        def sample() -> tuple[list[int], list[float], list[int]]:
            r = engine.generate([GenerationRequest(0, prompt, SamplingParams(max_new_tokens=32))])[0]
            return r.output_ids, r.output_logprobs, r.output_versions

        def scored(ids: list[int]) -> torch.Tensor:
            ids_t, attn = pad_right([prompt + ids], 0)
            with torch.no_grad():
                return token_logprobs(model, ids_t.to(s.device), attn.to(s.device))[0, len(prompt) :].cpu()

        ids0, lps0, versions0 = sample()
        gap_before = float((torch.tensor(lps0) - scored(ids0)).abs().mean())
        with torch.no_grad():  # new weights that change every distribution: the (tied) embedding x 4
            model.get_input_embeddings().weight.mul_(4.0)
        t0 = time.perf_counter()
        weights = iter_full_weights(model, dtype=torch.bfloat16, device=engine.weights_device)
        engine.update_weights(weights, 1)
        torch.cuda.synchronize()
        update_seconds = time.perf_counter() - t0
        ids1, lps1, versions1 = sample()
        gap_after = float((torch.tensor(lps1) - scored(ids1)).abs().mean())
        with torch.no_grad():
            model.get_input_embeddings().weight.div_(4.0)
        gap_to_old_weights = float((torch.tensor(lps1) - scored(ids1)).abs().mean())
    finally:
        engine.close()
    return {
        "ok": (
            engine.transfer == path
            and set(versions0) == {0}
            and set(versions1) == {1}
            and gap_before < 0.25  # bfloat16 vLLM against float32 scoring of the same weights
            and gap_after < 0.25
            and gap_to_old_weights > 3 * gap_after
        ),
        "update_seconds": update_seconds,
        "mean_logprob_gap_before_update": gap_before,
        "mean_logprob_gap_after_update": gap_after,
        "mean_logprob_gap_to_the_old_weights": gap_to_old_weights,
    }


def _samples(engine, prompts: list[list[int]], tokens: int = 16) -> list[tuple]:
    from twofold.engine.base import GenerationRequest, SamplingParams

    requests = [GenerationRequest(i, p, SamplingParams(max_new_tokens=tokens)) for i, p in enumerate(prompts)]
    return [(r.output_ids, r.output_logprobs, r.output_versions) for r in engine.generate(requests)]


def check_engine_sleep(s: Setup) -> dict:
    """Two built-in engines from one seed take the same new weights, one of them asleep when they come."""
    from twofold.engine.builtin import BuiltinEngine

    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12]]
    awake, sleeper = (BuiltinEngine(s.path, dtype="bfloat16", device=str(s.device), seed=7) for _ in range(2))
    model = load_model(s.path).to(s.device)
    with torch.no_grad():  # new weights, different from the engines' own
        model.get_input_embeddings().weight.mul_(2.0)
    for engine in (awake, sleeper):
        _samples(engine, prompts)
    synchronize(s.device)
    held = sleeper.resident_weight_bytes()
    before = torch.cuda.memory_allocated(s.device) if s.device.type == "cuda" else None
    sleeper.sleep()
    after = torch.cuda.memory_allocated(s.device) if s.device.type == "cuda" else None
    for engine in (awake, sleeper):
        engine.update_weights(iter_full_weights(model, dtype=torch.bfloat16, device=engine.weights_device), 1)
    same = _samples(awake, prompts) == _samples(sleeper, prompts)
    freed = None if before is None else before - after
    return {
        "ok": same and (freed is None or freed >= held),
        "weight_bytes": held,
        "device_bytes_freed_by_sleep": freed,
        "samples_equal_after_waking": same,
    }


def check_vllm_sleep(s: Setup) -> dict:
    """vLLM on the trainer's GPU with `sleeps`, over each weight-transfer path that placement allows (ipc, host)."""
    if s.device.type != "cuda":
        return {"skipped": "vLLM's sleep mode is CUDA/ROCm only; on CPU tests/test_vllm.py checks its refusal"}
    try:
        from twofold.engine.vllm import VLLMEngine  # noqa: F401
    except ImportError as e:
        return {"skipped": f"vLLM is not importable here ({e})"}
    results = {path: vllm_sleep_on(s, path) for path in ("ipc", "host")}
    return {"ok": all(r["ok"] for r in results.values()), **results}


def vllm_sleep_on(s: Setup, path: str) -> dict:
    """The memory vLLM hands back asleep (a 0.3 share), and a weight update over `path` that wakes it, whose
    samples follow the new weights with the new version's stamp."""
    from twofold.config import EngineConfig
    from twofold.engine.vllm import VLLMEngine

    cfg = EngineConfig(
        backend="vllm", device=str(s.device), dtype="bfloat16", gpu_memory_utilization=0.3, weight_transfer=path
    )
    engine = VLLMEngine(s.path, cfg, trainer_device=str(s.device), sleeps=True)
    try:
        model = load_model(s.path).to(s.device)
        prompt = [1, 2, 3, 4, 5, 6, 7, 8]
        _samples(engine, [prompt])
        free_awake = torch.cuda.mem_get_info(s.device)[0]
        engine.sleep()
        free_asleep = torch.cuda.mem_get_info(s.device)[0]
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(4.0)
        engine.update_weights(iter_full_weights(model, dtype=torch.bfloat16, device=engine.weights_device), 1)
        free_woken = torch.cuda.mem_get_info(s.device)[0]
        ids, lps, versions = _samples(engine, [prompt], 32)[0]
        ids_t, attn = pad_right([prompt + ids], 0)
        with torch.no_grad():
            scored = token_logprobs(model, ids_t.to(s.device), attn.to(s.device))[0, len(prompt) :].cpu()
        gap = float((torch.tensor(lps) - scored).abs().mean())
    finally:
        engine.close()
    share = int(0.3 * torch.cuda.get_device_properties(s.device).total_memory)
    handed_back = free_asleep - free_awake
    return {
        "ok": (
            handed_back > share // 2  # weights and KV cache leave the GPU
            and free_awake - free_woken < share // 10  # and all of it comes back
            and set(versions) == {1}
            and gap < 0.25  # bfloat16 vLLM against float32 scoring of the new weights
        ),
        "share_bytes": share,
        "bytes_handed_back_asleep": handed_back,
        "bytes_free_awake_minus_woken": free_awake - free_woken,
        "mean_logprob_gap_after_update": gap,
    }


def shared_prefix_rows(vocab: int, size: Size, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """16 rows as a tool task's GRPO batch lays them out: one system prompt, 4 task prompts of 12-15 tokens under
    it (nodes short enough to share attention calls), 4 completions under each (lengths from
    `size.reply_lengths`); and each row's completion length."""
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    system = tokens(max(size.reply_lengths[1] // 2, MIN_SHARED_TOKENS))
    rows, completions = [], []
    for g in range(4):
        prompt = system + tokens(12 + g)
        for j in range(4):
            n = size.reply_lengths[(4 * g + j) % len(size.reply_lengths)]
            rows.append(prompt + tokens(n))
            completions.append(n)
    return rows, completions


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_prefix_tree(s: Setup) -> dict:
    model = load_model(s.path).to(s.device).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    refusal = prefix_sharing_trial(model, s.device)  # what the trainer runs at start: None, or why it would not share
    model.train()
    rows, completions = shared_prefix_rows(model.config.vocab_size, s.size)
    tree_calls = TreeAttention.of(prefix_tree(rows), torch.device("cpu")).calls
    ids, attn = pad_right(rows, 0)
    wanted = torch.zeros_like(attn)
    for r, (row, n) in enumerate(zip(rows, completions, strict=True)):
        wanted[r, len(row) - n : len(row)] = 1
    ids, attn, wanted = ids.to(s.device), attn.to(s.device), wanted.to(s.device)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1)).to(s.device) * wanted
    real = attn.bool()
    layouts = {"padded": {}, "packed": {"packed": True}, "tree": {"share_prefixes": True}}
    decoder = model.get_decoder()

    def run(layout: str, dtype: torch.dtype) -> dict:
        model.zero_grad(set_to_none=True)
        with Numerics(device=s.device, dtype=dtype).autocast():
            with torch.no_grad():
                if layout == "tree":
                    hidden = prefix_tree_decoder_states(decoder, ids, attn)
                else:
                    hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            lp = policy_logprobs(model, ids, attn, chunk_size=s.size.chunk, wanted=wanted, **layouts[layout])
        (lp * weights).sum().backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return {"hidden": hidden[real].float(), "logprobs": lp[wanted.bool()].detach(), "grads": grads}

    truth = run("padded", torch.float32)
    fp32 = run("tree", torch.float32)
    padded_bf16, tree_bf16 = run("padded", torch.bfloat16), run("tree", torch.bfloat16)
    numbers = {}
    for what in ("hidden", "logprobs", "grads"):
        numbers[f"fp32_{what}_relative"] = relative(fp32[what], truth[what])
        numbers[f"bf16_padded_{what}_relative"] = relative(padded_bf16[what], truth[what])
        numbers[f"bf16_tree_{what}_relative"] = relative(tree_bf16[what], truth[what])
    numbers["fp32_logprobs_max_difference"] = float((fp32["logprobs"] - truth["logprobs"]).abs().max())
    del truth, fp32, padded_bf16, tree_bf16
    ok = (
        refusal is None
        and any(call.span is None for call in tree_calls)  # short nodes shared a call: that path ran too
        and numbers["fp32_hidden_relative"] < 1e-4
        and numbers["fp32_logprobs_relative"] < 1e-4
        and numbers["fp32_grads_relative"] < 1e-3
        # one sample each: 2x leaves room for bfloat16's own scatter (CPU: 0.00492 tree against 0.00483 padded)
        and all(
            numbers[f"bf16_tree_{w}_relative"] <= 2 * numbers[f"bf16_padded_{w}_relative"] + 1e-6
            for w in ("hidden", "logprobs", "grads")
        )
    )

    def train_pass(layout: str) -> None:
        with Numerics(device=s.device, dtype=torch.bfloat16).autocast():
            lp = policy_logprobs(model, ids, attn, chunk_size=s.size.chunk, wanted=wanted, **layouts[layout])
        (lp * weights).sum().backward()
        model.zero_grad(set_to_none=True)

    for layout in layouts:
        train_pass(layout)  # warm-up: kernels, allocator
        numbers[f"{layout}_peak_bytes"] = peak_bytes(s.device, lambda layout=layout: train_pass(layout))
        times = []
        for _ in range(3):
            synchronize(s.device)
            start = time.perf_counter()
            train_pass(layout)
            synchronize(s.device)
            times.append(time.perf_counter() - start)
        numbers[f"{layout}_forward_backward_ms"] = round(sorted(times)[1] * 1e3, 2)
    return {
        "ok": ok,
        "refusal": refusal,
        "rows": len(rows),
        "tokens_padded": ids.numel(),
        "tokens_real": int(attn.sum()),
        "tokens_in_tree": len(prefix_tree(rows).tokens),
        "attention_calls": len(tree_calls),
        "shared_calls": sum(call.span is None for call in tree_calls),
        **numbers,
        "peak_bytes_note": "each includes the float32 gradients (4 bytes a parameter)",
    }


def check_sdpa_kernels(s: Setup) -> dict:
    """Which of torch's attention kernels take a prefix-tree call on this GPU (a node of 150 queries under 350
    ancestor keys, boolean mask, the query a strided slice of a [1, L, heads, dim] projection as in the model,
    forward and backward), with grouped KV heads read in place (`enable_gqa`) and repeated, and what each
    costs; the kernel torch picks by itself (`torch._fused_sdp_choice`) each way; CUDA only."""
    if s.device.type != "cuda":
        return {"skipped": "CUDA's kernels only"}
    config = load_model(s.path).config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    out: dict = {}
    for dtype in (torch.bfloat16, torch.float32):
        for layout in ("grouped", "repeated"):
            g = torch.Generator(device=s.device).manual_seed(0)
            above, queries = 350, 150
            length = above + queries
            q = torch.randn(1, length, heads, dim, device=s.device, dtype=dtype, generator=g).transpose(1, 2)
            q = q[:, :, above:].detach().requires_grad_()
            k, v = (
                torch.randn(1, kv_heads, length, dim, device=s.device, dtype=dtype, generator=g).requires_grad_()
                for _ in range(2)
            )
            mask = torch.ones(queries, length, dtype=torch.bool, device=s.device).tril(above)
            repeat = layout == "repeated"

            def call(q=q, k=k, v=v, mask=mask, repeat=repeat):
                kk, vv = (x.repeat_interleave(heads // kv_heads, 1) for x in (k, v)) if repeat else (k, v)
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, kk, vv, attn_mask=mask, enable_gqa=kk.shape[1] != heads
                )
                o.sum().backward()

            name = f"{str(dtype).removeprefix('torch.')}_{layout}"
            try:  # a private function of torch's: its signature may move
                kk = k.repeat_interleave(heads // kv_heads, 1) if repeat else k
                choice = torch._fused_sdp_choice(q, kk, kk, attn_mask=mask, enable_gqa=kk.shape[1] != heads)
                out[f"{name}_default_kernel"] = SDPBackend(choice).name
            except Exception as e:
                out[f"{name}_default_kernel"] = f"unknown: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            for backend in (
                *(b for b in SDPBackend.__members__.values() if b.name not in ("ERROR", "OVERRIDEABLE")),
                None,
            ):
                key = f"{name}_{backend.name.lower() if backend else 'default'}"
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        with sdpa_kernel([backend]) if backend else contextlib.nullcontext():
                            call()
                            synchronize(s.device)
                            start = time.perf_counter()
                            for _ in range(10):
                                call()
                            synchronize(s.device)
                    out[f"{key}_fwd_bwd_ms"] = round((time.perf_counter() - start) / 10 * 1e3, 4)
                except Exception as e:  # a refusal, or anything else: recorded, the next one runs
                    reasons = " | ".join(str(w.message).splitlines()[0][:160] for w in caught)
                    out[f"{key}_fwd_bwd_ms"] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    if reasons:
                        out[f"{key}_reasons"] = reasons
    return {"ok": True, **out}


CHECKS: dict[str, Callable[[Setup], dict]] = {
    "bf16_step": check_bf16_step,
    "snapshot_exact": check_snapshot_exact,
    "chunked_logprob_memory": check_chunked_logprob_memory,
    "fsdp_one_rank": check_fsdp_one_rank,
    "checkpoint_resume": check_checkpoint_resume,
    "engine_sleep": check_engine_sleep,
    "vllm_sleep": check_vllm_sleep,
    "vllm_weights": check_vllm_weights,
    "prefix_tree": check_prefix_tree,
    "sdpa_kernels": check_sdpa_kernels,
}


# --------------------------------------------------------------------------- running them


def run_check(name: str, check: Callable[[Setup], dict], setup: Setup) -> dict:
    """One check's JSON record: passed / failed / skipped, its seconds and numbers; an exception is a failure
    with its traceback's last lines."""
    start = time.perf_counter()
    try:
        result = check(setup)
        if "skipped" in result:
            record = {"check": name, "status": "skipped", "reason": result["skipped"]}
        else:
            ok = result.pop("ok")
            record = {"check": name, "status": "passed" if ok else "failed", **result}
    except Exception:  # a failing check is recorded and the next one runs
        record = {"check": name, "status": "failed", "error": traceback.format_exc()[-3000:]}
    record["seconds"] = round(time.perf_counter() - start, 2)
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def environment(device: torch.device, size: str) -> dict:
    """What ran the checks: versions as installed (read without importing), the GPU."""
    info = {"check": "environment", "device": str(device), "size": size, "python": sys.version.split()[0]}
    for package in ("torch", "transformers", "peft", "vllm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON lines file the results go to (appended)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (the dry run)")
    ap.add_argument("--size", choices=sorted(SIZES), help="model shape: 0.5b on CUDA, tiny on CPU by default")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of: {', '.join(CHECKS)}")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # `torch.cuda.set_device` wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    size = args.size or ("0.5b" if device.type == "cuda" else "tiny")
    names = [n for n in args.checks.split(",") if n]
    unknown = set(names) - CHECKS.keys()
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}; known: {', '.join(CHECKS)}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the tiny dry run: one thread beats several on cores other work shares (5 ms -> 0.3 ms a matmul)
        torch.set_num_threads(1)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp, out_path.open("a") as out_file:

        def write(record: dict) -> None:
            records.append(record)
            out_file.write(json.dumps(record) + "\n")
            out_file.flush()
            print(json.dumps({k: v for k, v in record.items() if k != "error"}), flush=True)
            if "error" in record:
                print(record["error"], file=sys.stderr, flush=True)

        write(environment(device, size))
        start = time.perf_counter()
        path = save_random_model(Path(tmp) / "model", **SIZES[size].model)
        write({"check": "build_model", "status": "passed", "seconds": round(time.perf_counter() - start, 2)})
        setup = Setup(path, device, SIZES[size], Path(tmp))
        for name in names:
            write(run_check(name, CHECKS[name], setup))
    failed = [r["check"] for r in records if r.get("status") == "failed"]
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "no check failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
