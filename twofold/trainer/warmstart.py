"""Warm start: supervised fine-tuning on demonstrations of a noisy solver, and policy evaluation.

The solver plays optimally except that with probability `warmstart.noise` it takes a random move.
Imitating it gives a policy that almost always answers in the right format but succeeds only part
of the time, which leaves room for RL. Demonstrations are tokenised exactly as the rollout does.

A long warm start (tool use: over an hour on 2 CPU cores) resumes where it stopped: every
PROGRESS_SECONDS its weights, optimizer, schedule and position are written next to the cache entry
(same key), and the next call continues from there with the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from twofold.config import Config, EnvConfig
from twofold.engine import make_engine
from twofold.envs import env_class, env_from_config
from twofold.envs.seeding import DEMO_SEED_OFFSET, EVAL_SEED_OFFSET, level_seed
from twofold.logprobs import Numerics, pad_right, policy_logprobs
from twofold.models import cache_dir, fingerprint, load_model, load_tokenizer
from twofold.rollout.chat import first_prompt_ids, next_turn_ids, observation_messages
from twofold.rollout.worker import RolloutWorker
from twofold.trainer.trainer import forward_layout, linear_warmup

WARMSTART_RECIPE = 1
PROGRESS_SECONDS = 60.0  # how often an unfinished warm start saves where it is


def solver_answer(env, rng: random.Random, noise: float) -> str:
    """The reference solver's next move, replaced by a random one with probability `noise`."""
    plan = env.solve()
    return env.random_answer(rng) if (rng.random() < noise or not plan) else plan[0]


def solver_success_rate(cfg: Config, episodes: int, noise: float = 0.0) -> float:
    """Success rate of the (noisy) solver on the level set `evaluate` uses; noise=0 is the optimal rate.

    Below 1.0 at noise 0 means some levels cannot be won within `env.max_turns` (or slippery ice).
    """
    wins = 0
    for k in range(episodes):
        env = env_from_config(cfg.env)
        seed = level_seed(cfg.seed + EVAL_SEED_OFFSET, k)
        rng = random.Random(seed)
        env.reset(seed)
        while True:
            _, _, done, info = env.step(env.reply(solver_answer(env, rng, noise)))
            if done:
                wins += bool(info["success"])
                break
    return wins / episodes


def demonstration(cfg: Config, tokenizer, index: int) -> tuple[list[int], list[int], bool]:
    """One noisy-solver episode as (token_ids, loss_mask, success)."""
    env = env_from_config(cfg.env)
    seed = level_seed(cfg.seed + DEMO_SEED_OFFSET, index)
    rng = random.Random(seed)
    obs = env.reset(seed)
    ids = first_prompt_ids(tokenizer, env, obs)
    mask = [0] * len(ids)
    success = False
    while True:
        text = env.reply(solver_answer(env, rng, cfg.warmstart.noise))
        reply = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids += reply
        mask += [1] * len(reply)
        obs, _, done, info = env.step(text)
        if done:
            success = bool(info["success"])
            break
        chunk = next_turn_ids(tokenizer, observation_messages(obs, info), ids[-1], env.tool_schemas)
        if len(ids) + len(chunk) + len(reply) >= cfg.rollout.max_total_tokens:
            break
        ids += chunk
        mask += [0] * len(chunk)
    return ids, mask, success


# Env fields that change how fast an episode runs, never which demonstrations it gives.
TIMING_FIELDS = ("step_latency_ms", "step_latency_sigma", "step_timeout_s")


def warmstart_path(cfg: Config, base: Path) -> Path:
    recipe = dataclasses.asdict(cfg.warmstart)
    seed = recipe.pop("seed")  # hashed last: the key layout existing caches are stored under
    # Timing fields are hashed at their defaults, so keys made without latency stay valid and a latency
    # change never retrains the warm start.
    env = dataclasses.asdict(dataclasses.replace(cfg.env, **{f: getattr(EnvConfig(), f) for f in TIMING_FIELDS}))
    parts = [WARMSTART_RECIPE, base.name, recipe, env, cfg.rollout.max_total_tokens, cfg.engine.temperature, seed]
    data = env_class(cfg.env.name).data_fingerprint(cfg.env.options)  # a dataset's content, not just its path
    key = fingerprint(*parts, *([data] if data else []))
    return cache_dir() / "warmstart" / f"{cfg.env.name}-{key}"


def ensure_warmstart(cfg: Config, base: Path, progress: bool = True) -> Path:
    """The cached warm-start checkpoint for this config, trained first if absent."""
    path = warmstart_path(cfg, base)
    if (path / "config.json").exists():
        return path
    return run_warmstart(cfg, base, path, progress=progress)


def progress_path(out: Path) -> Path:
    """Where an unfinished warm start for the cache entry `out` keeps its state."""
    return out.with_name(out.name + ".progress.pt")


def run_warmstart(cfg: Config, base: Path, out: Path, progress: bool = True) -> Path:
    cfg = dataclasses.replace(cfg, seed=cfg.warmstart.seed)
    w = cfg.warmstart
    tokenizer = load_tokenizer(base)
    model = load_model(base, torch.float32).train()
    # as the trainer forwards (`trainer.pack_sequences`, `trainer.share_prefixes`), on this CPU copy of the model
    layout = forward_layout(model, Numerics.from_config(cfg))
    torch.manual_seed(cfg.seed)
    demos = [demonstration(cfg, tokenizer, i) for i in range(w.episodes)]
    demo_success = sum(s for _, _, s in demos) / len(demos)
    optimizer = torch.optim.AdamW(model.parameters(), lr=w.lr)
    total = w.epochs * ((len(demos) + w.batch_size - 1) // w.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: linear_warmup(i, 20) * max(0.05, 1 - i / total))
    done = 0  # batches trained so far
    saved = progress_path(out)
    if saved.exists():
        state = torch.load(saved, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        done = state["batches"]
    rng = random.Random(cfg.seed)
    bar = tqdm(total=total, initial=done, disable=not progress, desc=f"warmstart {cfg.env.name}", unit="batch")
    last_save, step = time.monotonic(), 0
    for _ in range(w.epochs):
        order = list(range(len(demos)))
        rng.shuffle(order)  # every epoch's shuffle is replayed on resume, so the orders are the same
        for start in range(0, len(order), w.batch_size):
            step += 1
            if step <= done:
                continue
            chunk = [demos[i] for i in order[start : start + w.batch_size]]
            ids, attn = pad_right([d[0] for d in chunk], tokenizer.pad_token_id)
            mask, _ = pad_right([d[1] for d in chunk], 0)
            # the system prompt (a tool task's lists every schema) opens every demonstration: run it once a batch
            logprobs = policy_logprobs(
                model, ids, attn, wanted=mask, packed=layout.packed, share_prefixes=layout.share_prefixes
            )
            loss = -(logprobs * mask).sum() / mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(nll=f"{loss.item():.3f}")
            if step < total and time.monotonic() - last_save >= PROGRESS_SECONDS:
                _save_progress(saved, model, optimizer, schedule, step)
                last_save = time.monotonic()
    bar.close()
    tmp = out.with_name(out.name + ".tmp")
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    report = evaluate(cfg, tmp, w.eval_episodes)
    report["demo_success_rate"] = demo_success
    (tmp / "warmstart.json").write_text(json.dumps(report, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        tmp.replace(out)
    saved.unlink(missing_ok=True)
    return out


def _save_progress(path: Path, model, optimizer, schedule, batches: int) -> None:
    """Atomically: a kill mid-write leaves the previous progress file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    torch.save({**state, "batches": batches}, tmp)
    os.replace(tmp, path)


def evaluate(cfg: Config, model_path: Path, episodes: int) -> dict[str, float]:
    """Valid-action rate and success rate of a checkpoint over `episodes` held-out levels (engine sampling)."""
    eval_cfg = dataclasses.replace(
        cfg, seed=cfg.seed + EVAL_SEED_OFFSET, rollout=dataclasses.replace(cfg.rollout, group_size=1)
    )
    tokenizer = load_tokenizer(model_path)
    engine = make_engine(cfg.engine, model_path, tokenizer, seed=cfg.seed)
    finished = []
    worker = RolloutWorker(
        engine, tokenizer, eval_cfg, admit=lambda: worker.next_group < episodes, on_group=finished.extend
    )
    try:
        worker.run_until(lambda: len(finished) >= episodes)
    finally:
        worker.stop()
    turns = sum(len(t.format_ok) for t in finished)
    return {
        "episodes": float(len(finished)),
        "valid_action_rate": sum(sum(t.format_ok) for t in finished) / max(turns, 1),
        "success_rate": sum(t.success for t in finished) / len(finished),
        "reward_mean": sum(t.reward for t in finished) / len(finished),
        "turns_mean": turns / len(finished),
    }
