"""The embedded runtime: engine, rollout worker, trainer and old-logit source in one process.

sync:  generate a batch at version v, train it, publish v+1 (the on-policy baseline).
async: the rollout worker runs on its own thread and keeps sampling while the trainer trains.
       Admission control bounds staleness: the k-th group starts only once
       k < (version + W + 1) * groups_per_step (+ groups dropped), as in AReaL.
       A weight update pauses generation at a token boundary; in-flight requests continue
       under the new version, so one response can span versions.

One train step (trainer at version v):
    wait for groups -> source.prepare (old log-probs) -> forward/backward of the first minibatch
    -> [before_update: pause if the source needs it, snapshot / capture]
    -> optimizer steps -> publish v+1 (pause, source.on_publish, engine.update_weights, resume)
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from twofold.config import Config, ConfigError, dump_config
from twofold.engine import InferenceEngine, make_engine
from twofold.envs import TextEnv, env_from_config
from twofold.models import clone_state_dict, load_model, load_tokenizer
from twofold.oldlogits import OldLogitSource, make_source
from twofold.oldlogits.sources import SourceContext, current_logprobs
from twofold.pipeline.rundir import MetricsSink, latest_checkpoint, save_checkpoint, write_summary
from twofold.rollout.trajectory import Batch, Trajectory
from twofold.rollout.worker import RolloutWorker
from twofold.trainer.trainer import Trainer

log = logging.getLogger(__name__)
MAX_FAILED_GROUPS_IN_A_ROW = 16  # then the env (or engine) is broken, not unlucky: stop instead of spinning


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.env.name}-{cfg.mode}-{cfg.oldlogits.source}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_model_path(cfg: Config, progress: bool = True) -> Path:
    """The model to start from: `model.path`, else the tiny model (warm-started when configured)."""
    if cfg.model.path:
        return Path(cfg.model.path)
    from twofold.envs import tokenizer_corpus
    from twofold.models import ensure_tiny_model

    base = ensure_tiny_model(cfg.model, tokenizer_corpus(cfg.env))
    if not cfg.model.warmstart:
        return base
    from twofold.trainer.warmstart import ensure_warmstart

    return ensure_warmstart(cfg, base, progress=progress)


def refuse_existing_run(run_dir: Path, resume: bool) -> None:
    """A fresh run never writes into a finished or interrupted one (its metrics would interleave)."""
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError("run.dir", f"{str(run_dir)!r} already holds a run; continue it with "
                          f"`twofold train --resume {run_dir}` or choose another run.dir")


@contextlib.contextmanager
def stop_signals(handler):
    """SIGTERM/SIGINT call `handler(signum, frame)` inside the block (main thread only; else a no-op)."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def progress_postfix(row: dict) -> dict[str, str]:
    """What the progress bar shows of a step's metrics row (embedded bar and the Ray driver's)."""
    return {"success": f"{row['success/rate']:.2f}", "reward": f"{row['reward/mean']:.2f}",
            "active": f"{row.get('ppo/active_token_ratio', 0):.2f}", "s_step": f"{row['time/step']:.1f}"}


class EmbeddedRuntime:
    """Where the pipeline's parts live: here, all in this process. `RayRuntime` puts them in actors."""

    def make_engine(self, cfg: Config, model_path: Path, tokenizer) -> InferenceEngine:
        return make_engine(cfg.engine, model_path, tokenizer, seed=cfg.seed)

    def make_env(self, cfg: Config) -> TextEnv:
        return env_from_config(cfg.env)

    logprob_worker = None  # the dedicated source's model copy stays in this process

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None: ...


@dataclass
class StepTimes:
    idle: float = 0.0
    old_logits: float = 0.0
    training: float = 0.0
    weight_sync: float = 0.0


class Pipeline:
    def __init__(self, cfg: Config, run_dir: Path | None = None, *, resume: bool = False, model_path: Path | None = None,
                 runtime=None):
        self.cfg = cfg
        self.runtime = runtime or EmbeddedRuntime()
        self.run_dir = Path(run_dir or cfg.run.dir or default_run_dir(cfg))
        refuse_existing_run(self.run_dir, resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.async_mode = cfg.mode == "async"
        self.window = cfg.max_staleness if self.async_mode else 0
        path = model_path or resolve_model_path(cfg, progress=cfg.run.progress)
        self.model_path = path
        self.tokenizer = load_tokenizer(path)
        self.trainer = Trainer(load_model(path, torch.float32), cfg, seed=cfg.seed)
        self.engine = self.runtime.make_engine(cfg, path, self.tokenizer)
        self.dropped_groups = 0
        self.stale_dropped = 0
        self.step = 0
        start_group, source_state = self._load_checkpoint() if resume else (0, None)
        # Sources are built after the checkpoint so that model copies (dedicated worker, EWMA) start
        # from the resumed weights and version.
        self.ctx = SourceContext(pad_id=self.tokenizer.pad_token_id or 0, temperature=cfg.engine.temperature,
                                 async_mode=self.async_mode, max_staleness=self.window)
        self.source: OldLogitSource = make_source(cfg, self.ctx, self.trainer.model, version=self.trainer.version,
                                                  logprob_worker=self.runtime.logprob_worker)
        if source_state is not None:
            self.source.load_state_dict(source_state)
        self.auditor: OldLogitSource | None = (
            make_source(cfg, self.ctx, self.trainer.model, kind="snapshot") if cfg.oldlogits.audit else None)
        self.sources = [s for s in (self.source, self.auditor) if s is not None]

        self.pending: dict[int, Trajectory] = {}  # every trajectory started and not yet trained or dropped
        self.ready: list[list[Trajectory]] = []
        self.ready_cond = threading.Condition()
        self.failed_in_a_row = 0  # groups in which no episode finished
        self.peak_extra_bytes = 0
        self._paused = False
        self._stop_signal: int | None = None
        self.metrics = MetricsSink(self.run_dir, cfg.run.tensorboard, resume_step=self.step if resume else None)
        self.worker = RolloutWorker(
            self.engine, self.tokenizer, cfg, admit=self._admit, on_group=self._on_group,
            on_episode_start=self._on_episode_start, on_new_version=self._on_new_version,
            on_trajectory_end=self._on_trajectory_end, start_group=start_group, lockstep=not self.async_mode,
            make_env=lambda: self.runtime.make_env(cfg))

    # ------------------------------------------------------------------ rollout-thread callbacks

    def _admit(self) -> bool:
        limit = (self.trainer.version + self.window + 1) * self.cfg.rollout.groups_per_step + self.dropped_groups
        return self.worker.next_group < limit

    def _on_episode_start(self, traj: Trajectory) -> None:
        self.pending[traj.uid] = traj

    def _on_new_version(self, traj: Trajectory, version: int) -> None:
        for s in self.sources:
            s.on_new_version(traj, version)

    def _on_trajectory_end(self, traj: Trajectory) -> None:
        for s in self.sources:
            s.on_trajectory_end(traj)

    def _on_group(self, group: list[Trajectory]) -> None:
        with self.ready_cond:
            self.ready.append(group)
            self.ready_cond.notify_all()

    # ------------------------------------------------------------------ trainer side

    def _release(self, trajectories: list[Trajectory]) -> None:
        for s in self.sources:
            s.release(trajectories)
        for t in trajectories:
            self.pending.pop(t.uid, None)

    def _collect_batch(self) -> list[Trajectory]:
        """gps groups of usable trajectories, dropping stale groups when configured to."""
        want = self.cfg.rollout.groups_per_step
        taken: list[Trajectory] = []
        groups = 0
        while groups < want:
            if not self.async_mode:
                self.worker.run_until(lambda: len(self.ready) > 0)
            with self.ready_cond:
                while not self.ready:
                    if self.worker.error is not None:
                        raise RuntimeError("the rollout worker failed") from self.worker.error
                    self.ready_cond.wait(0.1)
                group = self.ready.pop(0)
            usable = [t for t in group if t.status in ("done", "truncated")]
            lag = self.trainer.version - min(t.start_version for t in group)
            if not usable or (lag > self.cfg.max_staleness and self.cfg.rollout.stale_policy == "drop"):
                self.stale_dropped += int(bool(usable))
                self.dropped_groups += 1
                self.failed_in_a_row = 0 if usable else self.failed_in_a_row + 1
                if self.failed_in_a_row >= MAX_FAILED_GROUPS_IN_A_ROW:
                    c = self.worker.counters
                    raise RuntimeError(
                        f"every episode of the last {self.failed_in_a_row} groups failed (env errors {c.env_errors}, "
                        f"env timeouts {c.env_timeouts}, non-finite log-probs {c.nonfinite_dropped}); "
                        "the environment or engine is broken, see the first logged traceback")
                self._release(group)
                continue
            self.failed_in_a_row = 0
            self._release([t for t in group if t not in usable])
            taken += usable
            groups += 1
        return taken

    def _pause_rollout(self) -> None:
        if not self._paused:
            self.worker.pause()
            self._paused = True

    def _before_update(self, times: StepTimes) -> None:
        t0 = time.perf_counter()
        v = self.trainer.version
        if any(s.needs_pause_before_update(v) for s in self.sources):
            self._pause_rollout()
        pending = list(self.pending.values())
        for s in self.sources:
            s.before_update(self.trainer.model, v, pending)
        times.old_logits += time.perf_counter() - t0

    def _publish(self) -> None:
        self._pause_rollout()
        new_version = self.trainer.version
        pending = list(self.pending.values())
        for s in self.sources:
            s.on_publish(self.trainer.model, new_version, pending)
        self.engine.update_weights(clone_state_dict(self.trainer.model), new_version)
        self.worker.resume()
        self._paused = False

    def _audit(self, batch: Batch, old: torch.Tensor | None) -> dict[str, float]:
        """Error of the approximate old log-probs against the exact ones (from snapshots)."""
        exact = self.auditor.prepare(batch, self.trainer.model, self.trainer.version)
        if old is None:  # interpolation: compare with the proxy built from the step-start log pi_theta
            from twofold.loss import interpolate_proximal_logprobs

            current = current_logprobs(self.trainer.model, batch, self.ctx)
            old = interpolate_proximal_logprobs(batch.behavior_logprobs, current, batch.versions, self.trainer.version,
                                                self.source.interpolation)
        sel = batch.loss_mask > 0
        delta = (old - exact)[sel]
        log_ratio = (exact - old)[sel].clamp(-20, 20)
        return {"audit/abs_err_mean": float(delta.abs().mean()), "audit/abs_err_max": float(delta.abs().max()),
                "audit/kl_k3": float((torch.expm1(log_ratio) - log_ratio).mean())}

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        times = StepTimes()
        t_step = time.perf_counter()
        gen0, tok0 = self.worker.counters.generate_seconds, self.worker.counters.generated_tokens
        src0 = sum(s.seconds for s in self.sources)
        trajs = self._collect_batch()
        times.idle = time.perf_counter() - t_step
        batch = Batch.from_trajectories(trajs, self.ctx.pad_id)
        version = self.trainer.version

        t0 = time.perf_counter()
        old = self.source.prepare(batch, self.trainer.model, version)
        audit = self._audit(batch, old) if self.auditor is not None else {}
        times.old_logits += time.perf_counter() - t0

        t0, old_before = time.perf_counter(), times.old_logits
        metrics = self.trainer.train_step(
            batch, old, interpolation=getattr(self.source, "interpolation", None),
            before_first_update=lambda: self._before_update(times),
            after_optimizer_step=lambda: [s.after_optimizer_step(self.trainer.model) for s in self.sources])
        times.training = time.perf_counter() - t0 - (times.old_logits - old_before)
        t0 = time.perf_counter()
        self._publish()
        times.weight_sync = time.perf_counter() - t0
        for s in self.sources:
            s.after_step(self.trainer.model, metrics)
        self._release(trajs)
        self.step += 1

        wall = time.perf_counter() - t_step
        c = self.worker.counters
        source_seconds = sum(s.seconds for s in self.sources) - src0
        extra = self.source.extra_bytes()
        self.peak_extra_bytes = max(self.peak_extra_bytes, extra)
        n = len(trajs)
        row = {
            "step": self.step,
            "version": self.trainer.version,
            "reward/mean": sum(t.reward for t in trajs) / n,
            "success/rate": sum(t.success for t in trajs) / n,
            "rollout/format_ok_rate": sum(sum(t.format_ok) for t in trajs) / max(1, sum(len(t.format_ok) for t in trajs)),
            "rollout/turns_mean": sum(t.num_turns for t in trajs) / n,
            "rollout/trajectories": float(n),
            "rollout/agent_tokens": float(batch.loss_mask.sum()),
            "rollout/tokens": float(batch.attention_mask.sum()),
            "rollout/multi_version_frac": sum(len(t.agent_versions()) > 1 for t in trajs) / n,
            "rollout/env_errors": float(c.env_errors),
            "rollout/env_timeouts": float(c.env_timeouts),
            "rollout/nonfinite_dropped": float(c.nonfinite_dropped),
            "rollout/truncated": float(c.truncated),
            "rollout/discarded_tokens": float(c.discarded_tokens),
            "rollout/stale_dropped_groups": float(self.stale_dropped),
            "time/step": wall,
            "time/generation": c.generate_seconds - gen0,
            "time/old_logits": max(times.old_logits, source_seconds),
            "time/training": times.training,
            "time/weight_sync": times.weight_sync,
            "time/idle": times.idle,
            "throughput/samples_per_s": n / wall,
            "throughput/tokens_per_s": (c.generated_tokens - tok0) / wall,
            "memory/oldlogit_extra_bytes": float(extra),
            "memory/oldlogit_peak_bytes": float(self.peak_extra_bytes),
        }
        row.update(metrics)
        row.update(audit)
        row.update(self.runtime.metrics())
        for s in self.sources:
            row.update(s.metrics())
        self.metrics.log(row)
        return row

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self) -> dict:
        return {
            "step": self.step,
            "trainer": self.trainer.state_dict(),
            "source": self.source.state_dict(),
            "engine_rng": self.engine.generator.get_state() if hasattr(self.engine, "generator") else None,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            # In-flight trajectories are not saved: a resumed run regenerates from the first group
            # not yet trained (documented in docs/reliability.md).
            "next_group": self.step * self.cfg.rollout.groups_per_step + self.dropped_groups,
            "dropped_groups": self.dropped_groups,
            "stale_dropped": self.stale_dropped,
        }

    def checkpoint(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self._checkpoint_state(), self.cfg.run.keep_checkpoints)

    def _load_checkpoint(self) -> tuple[int, dict | None]:
        """Restore trainer, engine and RNGs; return (first group to generate, the source's state)."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return 0, None
        state = torch.load(path, weights_only=False)
        self.step = state["step"]
        self.trainer.load_state_dict(state["trainer"])
        if state["engine_rng"] is not None:
            self.engine.generator.set_state(state["engine_rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.dropped_groups = state["dropped_groups"]
        self.stale_dropped = state["stale_dropped"]
        self.engine.update_weights(clone_state_dict(self.trainer.model), self.trainer.version)
        log.info("resumed from %s at step %d", path, self.step)
        return state["next_group"], state["source"]

    # ------------------------------------------------------------------ the run

    def request_stop(self, signum: int) -> None:
        """Checkpoint and stop after the current step (SIGINT/SIGTERM here, or forwarded by the Ray driver)."""
        self._stop_signal = signum

    def _on_signal(self, signum, frame) -> None:
        self.request_stop(signum)

    def run(self, progress: bool | None = None) -> dict:
        cfg = self.cfg
        progress = cfg.run.progress if progress is None else progress
        with stop_signals(self._on_signal):
            return self._run(progress)

    def _run(self, progress: bool) -> dict:
        cfg = self.cfg
        bar = tqdm(total=cfg.trainer.steps, initial=self.step, disable=not progress, desc="train", unit="step")
        last: dict = {}
        try:
            if self.async_mode:
                self.worker.start()
            while self.step < cfg.trainer.steps:
                last = self.train_step()
                bar.update(1)
                bar.set_postfix(progress_postfix(last))
                if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                    self.checkpoint()
                if self._stop_signal is not None:
                    self.checkpoint()
                    log.warning("stopped by signal %d at step %d; resume with --resume %s", self._stop_signal, self.step, self.run_dir)
                    break
            else:
                self.checkpoint()
            write_summary(self.run_dir, {"finished": self.step >= cfg.trainer.steps, "steps": self.step,
                                         "stopped_by_signal": self._stop_signal, "last": last})
        except BaseException:
            if self.step > 0:
                self.checkpoint()  # whatever killed the run, the finished steps stay resumable
            raise
        finally:
            bar.close()
            self.close()
        return last

    def close(self) -> None:
        self.worker.stop()
        for s in self.sources:
            s.close()
        self.engine.close()
        self.runtime.close()
        self.metrics.close()


def train(cfg: Config, run_dir: Path | None = None, *, resume: bool = False) -> tuple[Path, dict]:
    """Run (or resume) one training run on the configured runtime; return (run directory, last metrics)."""
    if cfg.runtime.backend == "embedded":
        pipeline = Pipeline(cfg, run_dir, resume=resume)
        return pipeline.run_dir, pipeline.run()
    try:
        from twofold.pipeline.ray_runtime import RaySession
    except ImportError as e:
        raise ConfigError("runtime.backend", f"Ray is not installed ({e}); `pip install twofold[ray]`, "
                          "or use runtime.backend=embedded") from None
    run_dir = Path(run_dir or cfg.run.dir or default_run_dir(cfg))
    refuse_existing_run(run_dir, resume)  # here too: before any actor starts
    model_path = resolve_model_path(cfg, progress=cfg.run.progress)  # on the driver: actors share the path
    with RaySession(cfg, run_dir, model_path, resume=resume) as session:
        return run_dir, session.run()
