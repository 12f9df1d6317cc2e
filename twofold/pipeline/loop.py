"""The step loop: engine, rollout, old-logit source and trainer, wired together for one run.

sync:  generate a batch at version v, train it, publish v+1 (the on-policy baseline).
async: the rollout worker runs on its own thread and keeps sampling while the trainer trains; admission
       control (`admission.py`) bounds staleness, and a weight update pauses generation at a token
       boundary, so one response can span versions.

One train step (trainer at version v):
    wait for groups -> source.prepare (exact capture / recompute) -> per minibatch: source.old_logprobs,
    loss, optimizer step [before the first: pause if the source needs it, snapshot / capture]
    -> publish v+1 (pause, source.on_publish, engine.update_weights, resume)
The parts come from a runtime (`runtime.py`): in this process, or Ray actors (`ray_runtime.py`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from twofold import metrics as M
from twofold.config import Config, ConfigError, dump_config, to_dict, with_absolute_paths
from twofold.distributed import Ranks
from twofold.logprobs import DTYPES, microbatches, resolve_device
from twofold.loss import kl_estimates
from twofold.models import iter_full_weights, load_parameters, load_policy, load_tokenizer
from twofold.oldlogits import OldLogitSource, SourceContext, make_source
from twofold.pipeline.checkpoint import (
    Restored,
    RunParts,
    latest_checkpoint,
    restore_run,
    restore_source,
    save_checkpoint,
)
from twofold.pipeline.cpu_threads import CpuThreads
from twofold.pipeline.export import export_run
from twofold.pipeline.learning_signal import LearningSignalWatch, zero_variance_group_fraction
from twofold.pipeline.memory import memory_metrics
from twofold.pipeline.os_memory import (
    limit_malloc_arenas,
    reset_peak,
    resident_bytes,
    return_freed_memory_to_os,
    trim_heap,
)
from twofold.pipeline.plan import engine_sleeps, format_plan, memory_plan, read_model_shapes, this_machine
from twofold.pipeline.progress import progress_postfix, stop_signals
from twofold.pipeline.resolve import resolve_model_path
from twofold.pipeline.rundir import (
    MODEL_FOLDER,
    SNAPSHOT_DIRECTORY,
    MetricsSink,
    default_run_dir,
    lock_run_dir,
    refuse_existing_run,
    write_summary,
)
from twofold.pipeline.runtime import EmbeddedRuntime, Runtime
from twofold.rollout.trajectory import Batch, Trajectory
from twofold.rollout.versions import LAG_BUCKETS, Admission, lag_bucket
from twofold.rollout.worker import RolloutWorker
from twofold.trainer.trainer import Trainer

log = logging.getLogger(__name__)
MAX_FAILED_GROUPS_IN_A_ROW = 16  # then the env (or engine) is broken, not unlucky: stop instead of spinning
# `run.trim_heap_each_step` trims only when malloc's arenas hold this much free: SmolLM2-135M's hold 0.9-1.4 GiB
# at those points, the tiny model's 50-80 MiB, where a trim would cost ~3% of a 0.3 s step and return little.
TRIM_MIN_FREE_BYTES = 256 << 20
MEMORY_PLAN_FILE = "memory_plan.txt"  # the run's memory plan on the machine it started on


@dataclass
class StepTimes:
    idle: float = 0.0
    old_logits: float = 0.0
    training: float = 0.0
    weight_sync: float = 0.0


def source_context(cfg: Config, trainer: Trainer, pad_id: int, model_path: Path, run_dir: Path) -> SourceContext:
    """How and where the old-logit sources score and keep state: the trainer's numerics and ranks; model copies
    on `oldlogits.device`; snapshots on `oldlogits.snapshot_device` (host memory when the trainer is on a GPU;
    files under `run_dir/snapshots` with `disk`).
    With sharded ranks, model copies are built on the meta device and sharded on the trainer's mesh, each rank
    copying its own shards (a sharded module cannot be deep-copied), or gathered whole on rank 0 for the
    dedicated worker."""
    o, t, ranks = cfg.oldlogits, cfg.trainer, trainer.ranks
    device = trainer.numerics.device if o.device == "auto" else resolve_device(o.device)
    snapshot_directory = None
    if o.snapshot_device == "disk":  # files; the device is unused: they are read memory-mapped
        snapshot_device, snapshot_directory = torch.device("cpu"), run_dir / SNAPSHOT_DIRECTORY
    elif o.snapshot_device != "auto":
        snapshot_device = resolve_device(o.snapshot_device)
    else:
        snapshot_device = torch.device("cpu") if trainer.numerics.device.type == "cuda" else trainer.numerics.device
    whole_policy = None
    if ranks.sharded:

        def whole_policy(state: dict[str, torch.Tensor]) -> torch.nn.Module:
            copy = load_policy(model_path, cfg.model).to(device).eval()
            load_parameters(copy, state)
            return copy

    return SourceContext(
        pad_id=pad_id,
        async_mode=cfg.mode == "async",
        max_staleness=cfg.max_staleness if cfg.mode == "async" else 0,
        updates_per_version=t.ppo_epochs * t.num_minibatches,
        numerics=trainer.numerics,
        device=device,
        snapshot_device=snapshot_device,
        snapshot_directory=snapshot_directory,
        ranks=ranks,
        whole_policy=whole_policy,
    )


def batch_metrics(batch: Batch) -> dict[str, float]:
    """What a step's batch says about the episodes: outcome, format, length, tokens, versions."""
    trajs, n = batch.trajectories, len(batch.trajectories)
    return {
        M.REWARD_MEAN: sum(t.reward for t in trajs) / n,
        M.SUCCESS_RATE: sum(t.success for t in trajs) / n,
        M.ZERO_VARIANCE_GROUP_FRAC: zero_variance_group_fraction(trajs),
        M.FORMAT_OK_RATE: sum(sum(t.format_ok) for t in trajs) / max(1, sum(len(t.format_ok) for t in trajs)),
        M.TURNS_MEAN: sum(t.num_turns for t in trajs) / n,
        M.TRAJECTORIES: float(n),
        M.AGENT_TOKENS: float(batch.loss_mask.sum()),
        M.TOKENS: float(batch.attention_mask.sum()),
        M.MULTI_VERSION_FRAC: sum(len(t.agent_versions()) > 1 for t in trajs) / n,
    }


class Pipeline:
    """One run. With sharded ranks every rank builds a Pipeline and runs the same loop; rank 0 alone owns the
    rollout side (engine, rollout worker), the run directory and the metrics, and broadcasts what only it
    knows (the batch, the pending trajectories, a stop request) at fixed points of each step."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path | None = None,
        *,
        resume: bool = False,
        model_path: Path | None = None,
        runtime: Runtime | None = None,
        ranks: Ranks | None = None,
    ):
        self.cfg = cfg
        self.ranks = ranks or Ranks()
        main = self.ranks.is_main
        # again here for the processes that build a Pipeline without `train()` (local ranks, Ray actors), before the
        # engine's and rollout's threads open arenas of their own
        limit_malloc_arenas(cfg.run.malloc_arenas)
        if cfg.run.return_freed_memory:
            return_freed_memory_to_os()
        trim_heap()  # the model's resolution (a GGUF conversion, a warm start) may have run in this process
        self.baseline_bytes = resident_bytes()
        self.runtime = runtime or EmbeddedRuntime()
        self.run_dir = Path(run_dir or cfg.run.dir or default_run_dir(cfg))
        self.run_lock = self._open_run_dir(resume) if main else None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.async_mode = cfg.mode == "async"
        # async: the trainer's and the rollout thread's
        self.threads = CpuThreads(torch.get_num_threads(), settle_steps=max(1, cfg.max_staleness))
        self.model_path = model_path or resolve_model_path(cfg, progress=cfg.run.progress and main, check_budget=main)
        if main:
            (self.run_dir / MODEL_FOLDER).write_text(str(Path(self.model_path).resolve()) + "\n")
        self.tokenizer = load_tokenizer(self.model_path)
        self.trainer = Trainer.from_pretrained(self.model_path, cfg, seed=cfg.seed, ranks=self.ranks)
        trainer_device = str(self.trainer.numerics.device)
        self.engine_sleeps = False
        if main:
            shapes, machine = read_model_shapes(self.model_path), this_machine(self.run_dir)
            # an explicit engine.sleep is checked with the config (sync, embedded) and, for vLLM, as its engine
            # starts; empty, the plan decides
            sleep = cfg.engine.sleep
            self.engine_sleeps = sleep if sleep is not None else engine_sleeps(cfg, shapes, machine)
            plan = memory_plan(cfg, shapes, machine, self.engine_sleeps)  # what `twofold plan` prints for this run
            (self.run_dir / MEMORY_PLAN_FILE).write_text(format_plan(plan) + "\n")
        self.engine = (
            self.runtime.make_engine(cfg, self.model_path, self.tokenizer, trainer_device, self.engine_sleeps)
            if main
            else None
        )
        self.engine_dtype = DTYPES[cfg.engine.dtype]
        self.admission = Admission.of(cfg, self.async_mode)
        self.step = 0
        restored = self._restore() if resume else None
        # Sources are built after the checkpoint so that model copies (dedicated worker, EWMA) start
        # from the resumed weights and version.
        self.ctx = source_context(cfg, self.trainer, self.tokenizer.pad_token_id or 0, self.model_path, self.run_dir)
        self.source: OldLogitSource = make_source(
            cfg, self.ctx, self.trainer.model, version=self.trainer.version, logprob_worker=self.runtime.logprob_worker
        )
        if restored is not None:
            restore_source(self.source, restored.source_state, self.ranks)
        self.auditor: OldLogitSource | None = (
            make_source(cfg, self.ctx, self.trainer.model, kind="snapshot") if cfg.oldlogits.audit else None
        )
        self.sources = [s for s in (self.source, self.auditor) if s is not None]

        self.pending: dict[int, Trajectory] = {}  # every trajectory started and not yet trained or dropped
        self.ready: list[list[Trajectory]] = []
        self.ready_cond = threading.Condition()
        self.failed_in_a_row = 0  # groups in which no episode finished
        self.peak_extra_bytes = 0
        self.signal_watch = LearningSignalWatch()
        self._paused = False
        self._stop_signal: int | None = None
        self.metrics = (
            MetricsSink(
                self.run_dir,
                cfg.run.tensorboard,
                resume_step=self.step if resume else None,
                wandb=cfg.run.wandb,
                config=to_dict(cfg),
            )
            if main
            else None
        )
        if self.metrics is not None:  # a streak without reward variance goes on across a resume
            for row in self.metrics.kept_rows:
                self.signal_watch.update_from_row(row)
        self.worker = self._rollout_worker() if main else None

    def _open_run_dir(self, resume: bool):
        """Rank 0: create (or, resuming, reopen) the run directory, lock it, write the resolved config."""
        refuse_existing_run(self.run_dir, resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run_dir(self.run_dir)
        (self.run_dir / "config.yaml").write_text(dump_config(with_absolute_paths(self.cfg)))
        return lock

    def _checkpoint_parts(self) -> RunParts:
        return RunParts(
            self.run_dir, self.trainer, self.admission, self.ranks, self.engine, self.cfg.run.keep_checkpoints
        )

    def _restore(self) -> Restored | None:
        """Resume from the newest whole checkpoint, if there is one, and hand its weights to the engine."""
        main = self.ranks.is_main
        checkpoint = self.ranks.broadcast(latest_checkpoint(self.run_dir) if main else None)
        if checkpoint is None:
            return None
        restored = restore_run(self._checkpoint_parts(), checkpoint)
        self.step = restored.step
        self._hand_weights_to_engine(self.trainer.version)
        if main:
            log.info("resumed from %s at step %d", checkpoint, self.step)
        return restored

    def _rollout_worker(self) -> RolloutWorker:
        return RolloutWorker(
            self.engine,
            self.tokenizer,
            self.cfg,
            admit=self._admit,
            on_group=self._on_group,
            on_episode_start=self._on_episode_start,
            on_new_version=self._on_new_version,
            on_trajectory_end=self._on_trajectory_end,
            start_group=self.admission.next_group(self.step),
            levels=self.admission.levels_to_play(),
            lockstep=not self.async_mode,
            make_env=lambda: self.runtime.make_env(self.cfg),
        )

    # ------------------------------------------------------------------ rollout-thread callbacks

    def _admit(self) -> bool:
        return self.admission.admits(self.worker.next_group)

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
            self.admission.consume(group[0].level)
            if not usable or self.admission.too_stale(group, self.trainer.version):
                self.admission.drop(stale=bool(usable))
                self.failed_in_a_row = 0 if usable else self.failed_in_a_row + 1
                if self.failed_in_a_row >= MAX_FAILED_GROUPS_IN_A_ROW:
                    c = self.worker.counters
                    raise RuntimeError(
                        f"every episode of the last {self.failed_in_a_row} groups failed (env errors {c.env_errors}, "
                        f"env timeouts {c.env_timeouts}, non-finite log-probs {c.nonfinite_dropped}); "
                        "the environment or engine is broken, see the first logged traceback"
                    )
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

    def _trim_heap(self) -> None:
        """Hand the pages malloc's arenas hold free back to the system (`run.trim_heap_each_step`), when they hold
        at least TRIM_MIN_FREE_BYTES."""
        if self.cfg.run.trim_heap_each_step:
            trim_heap(TRIM_MIN_FREE_BYTES)

    def _before_update(self, times: StepTimes) -> None:
        self._trim_heap()  # the first minibatch's freed activations, before the optimizer step
        t0 = time.perf_counter()
        v, main = self.trainer.version, self.ranks.is_main
        pause = main and any(s.needs_pause_before_update(v) for s in self.sources)
        if pause:
            self._pause_rollout()
        # With the rollout paused, the pending trajectories are still and every rank captures the same ones;
        # otherwise no source reads them here (and the rollout thread may be appending to them).
        pending = self.ranks.broadcast(list(self.pending.values()) if pause else [])
        for s in self.sources:
            s.before_update(self.trainer.model, v, pending)
        times.old_logits += time.perf_counter() - t0

    def _publish(self) -> None:
        """Hand the trainer's new weights to the engine; admission counts from this version on. The weights
        are gathered one parameter at a time on every rank, cast to the engine's dtype, kept on rank 0."""
        main = self.ranks.is_main
        if main:
            self._pause_rollout()
        new_version = self.trainer.version
        pending = list(self.pending.values())  # rank 0's: only its sources look at them
        for s in self.sources:
            s.on_publish(self.trainer.model, new_version, pending)
        self._hand_weights_to_engine(new_version)
        self.admission.publish(new_version)
        if main:
            self.worker.resume()
            self._paused = False

    def _hand_weights_to_engine(self, version: int) -> None:
        """The trainer's weights into the engine, one parameter at a time as every rank gathers it, cast to the
        engine's dtype on the device the engine loads from (a built-in engine on the trainer's GPU: no host copy);
        ranks without the engine take part in the gathers and keep nothing."""
        engine = self.engine if self.ranks.is_main else None
        device = engine.weights_device if engine is not None else "cpu"
        weights = iter_full_weights(self.trainer.model, keep=engine is not None, dtype=self.engine_dtype, device=device)
        if engine is None:
            weights.finish()  # run the gathers to the end
            return
        try:
            engine.update_weights(weights, version)
        except BaseException:
            if self.ranks.sharded:  # the other ranks wait in the gathers the failed send left undone
                weights.finish()
            raise

    def _audit(self, batch: Batch) -> dict[str, float]:
        """Error of the source's old log-probs against the exact ones, both from their `old_logprobs`, over
        the batch in micro-batches under the token budget (every rank walks the same ones)."""
        version, deltas, lags, log_ratios = self.trainer.version, [], [], []
        for rows in microbatches(batch.attention_mask.sum(dim=1).tolist(), self.trainer.numerics.max_tokens):
            sub = batch.select(rows).trimmed()
            current = self.ctx.score_batch(self.trainer.model, sub)
            approx = self.source.old_logprobs(sub, current, version).cpu()
            exact = self.auditor.old_logprobs(sub, current, version).cpu()
            sel = sub.loss_mask > 0
            deltas.append((approx - exact)[sel].abs())
            lags.append(version - sub.versions[sel])
            log_ratios.append((exact - approx)[sel])
        delta, lag, log_ratio = torch.cat(deltas), torch.cat(lags), torch.cat(log_ratios)
        _, k3 = kl_estimates(log_ratio, torch.ones_like(log_ratio))
        out = {M.AUDIT_ABS_ERR_MEAN: float(delta.mean()), M.AUDIT_ABS_ERR_MAX: float(delta.max()), M.AUDIT_KL_K3: k3}
        buckets = lag_bucket(lag)  # the error against staleness, per token lag
        for i, name in enumerate(LAG_BUCKETS):
            if (buckets == i).any():
                out[M.audit_error_at_lag(name)] = float(delta[buckets == i].mean())
        return out

    def train_step(self) -> dict[str, float]:
        times = StepTimes()
        t_step = time.perf_counter()
        main = self.ranks.is_main
        self._trim_heap()  # what the last step and the rollout freed, before this step's peak
        peak_was_reset = reset_peak()
        gen0, tok0 = (self.worker.counters.generate_seconds, self.worker.counters.generated_tokens) if main else (0, 0)
        src0 = sum(s.seconds for s in self.sources)
        self.threads.trainer_waiting = True  # the rollout thread may use the trainer's threads meanwhile
        try:
            trajs = self.ranks.broadcast(self._collect_batch() if main else None)
        finally:
            self.threads.trainer_waiting = False
        times.idle = time.perf_counter() - t_step
        if self.async_mode and main and self.cfg.run.split_cpu_threads:
            torch.set_num_threads(self.threads.trainer())
        if self.engine_sleeps:  # sync mode: nothing generates until the next weights are published
            t0 = time.perf_counter()
            self.engine.sleep()
            times.weight_sync += time.perf_counter() - t0  # with the waking, in the publish
        if not self.async_mode:
            self._trim_heap()  # in sync mode, what this step's generation (and a sleeping engine) freed
        batch = Batch.from_trajectories(trajs, self.ctx.pad_id)

        t0 = time.perf_counter()
        # rank 0's trajectories still in flight (every rank scores the same ones); the rollout thread adds to
        # the dict (copied at once: `list` of its values takes no thread switch) and appends to the trajectories
        # meanwhile, so a source reads only tokens of versions the engine has moved past
        in_batch = {t.uid for t in trajs}
        started = list(self.pending.values()) if main else []
        pending = self.ranks.broadcast([t for t in started if t.uid not in in_batch] if main else None)
        for s in self.sources:
            s.prepare(batch, self.trainer.model, self.trainer.version, pending)
        audit = self._audit(batch) if self.auditor is not None else {}
        times.old_logits += time.perf_counter() - t0

        t0, old_before = time.perf_counter(), times.old_logits
        metrics = self.trainer.train_step(
            batch,
            self.source,
            before_first_update=lambda: self._before_update(times),
            after_optimizer_step=lambda: [s.after_optimizer_step(self.trainer.model) for s in self.sources],
        )
        times.training = time.perf_counter() - t0 - (times.old_logits - old_before)
        t0 = time.perf_counter()
        self._publish()
        times.weight_sync += time.perf_counter() - t0
        for s in self.sources:
            s.after_step(self.trainer.model, metrics)
        self._release(trajs)
        self.step += 1
        if not main:
            return {M.STEP: self.step, **metrics}

        wall = time.perf_counter() - t_step
        c = self.worker.counters
        source_seconds = sum(s.seconds for s in self.sources) - src0
        extra = self.source.extra_bytes()
        self.peak_extra_bytes = max(self.peak_extra_bytes, extra)
        row = {
            M.STEP: self.step,
            M.VERSION: self.trainer.version,
            **batch_metrics(batch),
            M.ENV_ERRORS: float(c.env_errors),
            M.ENV_TIMEOUTS: float(c.env_timeouts),
            M.NONFINITE_DROPPED: float(c.nonfinite_dropped),
            M.TRUNCATED: float(c.truncated),
            M.DISCARDED_TOKENS: float(c.discarded_tokens),
            M.STALE_DROPPED_GROUPS: float(self.admission.stale_dropped),
            M.STEP_SECONDS: wall,
            M.time_part("generation"): c.generate_seconds - gen0,
            M.time_part("old_logits"): max(times.old_logits, source_seconds),
            M.time_part("training"): times.training,
            M.time_part("weight_sync"): times.weight_sync,
            M.time_part("idle"): times.idle,
            M.SAMPLES_PER_S: len(trajs) / wall,
            M.TOKENS_PER_S: (c.generated_tokens - tok0) / wall,
            M.OLDLOGIT_PEAK_BYTES: float(self.peak_extra_bytes),
            **memory_metrics(
                self.trainer.model,
                self.trainer.optimizer,
                self.engine.resident_weight_bytes(),
                self.engine.resident_cache_bytes(),
                extra,
                peak_was_reset,
                self.baseline_bytes,
                self.engine_sleeps,
            ),
        }
        if self.trainer.numerics.device.type == "cuda":  # everything this process put on its GPU, at its peak
            row[M.DEVICE_PEAK_BYTES] = float(torch.cuda.max_memory_allocated(self.trainer.numerics.device))
        if self.async_mode and self.cfg.run.split_cpu_threads:
            row[M.CPU_THREADS_SPLIT] = float(self.threads.split)  # as this step ran, before the next is set
            verdict = self.threads.observe(row[M.TOKENS], wall)
            if verdict:
                log.info("run.split_cpu_threads: %s", verdict)
        row.update(self.engine.prefill_metrics())
        row.update(metrics)
        row.update(audit)
        row.update(self.runtime.metrics())
        for s in self.sources:
            row.update(s.metrics())
        self.metrics.log(row)
        warning = self.signal_watch.update_from_row(row)
        if warning is not None:
            log.warning(warning)
        return row

    # ------------------------------------------------------------------ the run

    def checkpoint(self) -> Path:
        """Save this step (every rank takes part)."""
        return save_checkpoint(self._checkpoint_parts(), self.step, self.source)

    def request_stop(self, signum: int) -> None:
        """Checkpoint and stop after the current step (SIGINT/SIGTERM here, or forwarded by the Ray driver)."""
        self._stop_signal = signum

    def _on_signal(self, signum, frame) -> None:
        self.request_stop(signum)

    def run(self, progress: bool | None = None) -> dict:
        progress = (self.cfg.run.progress if progress is None else progress) and self.ranks.is_main
        with stop_signals(self._on_signal):
            return self._run(progress)

    def _run(self, progress: bool) -> dict:
        cfg, main = self.cfg, self.ranks.is_main
        bar = tqdm(total=cfg.trainer.steps, initial=self.step, disable=not progress, desc="train", unit="step")
        last: dict = {}
        try:
            if self.async_mode and main:
                self.worker.start(self.threads.rollout if cfg.run.split_cpu_threads else None)
            while self.step < cfg.trainer.steps:
                last = self.train_step()
                bar.update(1)
                if main:
                    bar.set_postfix(progress_postfix(last, no_signal=self.signal_watch.warning is not None))
                if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                    self.checkpoint()
                stop = self.ranks.broadcast(self._stop_signal)  # rank 0's signal stops every rank at one step
                if stop is not None:
                    self._stop_signal = stop
                    self.checkpoint()
                    if main:
                        log.warning(
                            "stopped by signal %d at step %d; resume with --resume %s", stop, self.step, self.run_dir
                        )
                    break
            else:
                self.checkpoint()
            if main:
                outcome = {
                    "finished": self.step >= cfg.trainer.steps,
                    "steps": self.step,
                    "stopped_by_signal": self._stop_signal,
                    "last": last,
                    "no_learning_signal": self.signal_watch.warning,
                }
                if cfg.run.export_final and outcome["finished"]:
                    outcome.update(self._export_final())
                write_summary(self.run_dir, outcome)
                self.metrics.summary(outcome)
        except BaseException:
            # Whatever killed the run, the finished steps stay resumable. Not with several ranks: saving is a
            # collective, and the other ranks are not there to join it; the last periodic checkpoint stands.
            if self.step > 0 and not self.ranks.sharded:
                self.checkpoint()
            raise
        finally:
            torch.set_num_threads(self.threads.total)
            bar.close()
            self.close()
        return last

    def _export_final(self) -> dict:
        """`run.export_final`: the last checkpoint as RUN_DIR/export; a failure is logged and recorded, and the
        finished run stays finished (`twofold export` can be run again by hand)."""
        try:
            return {"export": str(export_run(self.run_dir, self.run_dir / "export"))}
        except (OSError, ConfigError) as e:
            log.warning("run.export_final: the export failed (%s); run `twofold export %s OUT`", e, self.run_dir)
            return {"export_error": str(e)}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        for s in self.sources:
            s.close()
        if self.engine is not None:
            self.engine.close()
        self.runtime.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.run_lock is not None:
            self.run_lock.close()  # releases the flock
            self.run_lock = None
