"""The Ray runtime: the embedded pipeline's parts as Ray actors, with the same semantics and run directory.

    driver (`twofold train`)   joins or starts the cluster, creates the actors, shows progress from
                               metrics.jsonl, forwards SIGINT/SIGTERM (checkpoint, then stop)
    TrainerActor               the `Pipeline` itself: trainer model and optimizer, old-logit sources
                               (the snapshot store lives here, budget and all), admission control,
                               metrics and checkpoints
    EngineReplica x N          one inference engine each; `RayEngine` splits every batch across them
    EnvWorker x M              env instances keyed by episode: a crashing env dies in its own process
                               (`ray_envs.py`: imports no torch, so these processes start fast and stay small)
    OldLogitActor              `oldlogits.source=dedicated`: the dedicated worker's model copy

Weights go through the object store: one `ray.put` per update, every replica reads the same object.
Version stamps come from the replicas' engines, set by `update_weights` exactly as embedded.

Faults: a dead env worker is restarted by Ray (max_restarts=-1); the episodes it held fail (counted as
env errors) and the others go on. A dead engine replica is restarted by Ray, `RayEngine` pushes the
current weights to it and retries its requests (counted). Every wait on an actor has a timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import uuid
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError
from tqdm import tqdm

from twofold import metrics as M
from twofold.config import Config, EngineConfig
from twofold.distributed import Ranks, close_ranks, free_port, init_ranks, rank_device
from twofold.engine import make_engine
from twofold.engine.base import GenerationRequest, GenerationResult, InferenceEngine, Weights, weight_items
from twofold.logprobs import DTYPES, resolve_device
from twofold.models import load_policy, load_tokenizer
from twofold.oldlogits import LocalLogprobWorker, SourceContext
from twofold.pipeline.learning_signal import LearningSignalWatch
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.progress import progress_postfix, stop_signals
from twofold.pipeline.ray_envs import ACTOR_FAILURES, EnvPool, EnvWorker, RemoteEnv
from twofold.pipeline.rundir import read_metrics
from twofold.pipeline.runtime import EmbeddedRuntime

log = logging.getLogger(__name__)


def _threads(num_cpus: float) -> None:
    # Each actor is its own process: keep torch to its CPU share so actors do not oversubscribe cores.
    torch.set_num_threads(max(1, int(num_cpus)))


# --------------------------------------------------------------------------- actors


@ray.remote(max_restarts=-1, max_concurrency=2)  # 2 threads: pause() must reach it while generate() runs
class EngineReplica:
    def __init__(self, engine_cfg: EngineConfig, model_path: str, seed: int, num_cpus: float):
        _threads(num_cpus)
        self.engine = make_engine(engine_cfg, model_path, load_tokenizer(model_path), seed=seed)

    def generate(self, requests: list[GenerationRequest], version: int) -> list[GenerationResult] | None:
        """None when this replica is not at `version` (restarted since): the caller pushes weights first."""
        if self.engine.version != version:
            return None
        return self.engine.generate(requests)

    def update_weights(self, weights: Weights, version: int) -> None:
        self.engine.update_weights(weights, version)

    def pause(self) -> None:
        self.engine.pause()

    def resume(self) -> None:
        self.engine.resume()

    def pid(self) -> int:
        return os.getpid()


@ray.remote(max_restarts=0)  # its weights are versioned state: a dead one fails the run (resumable)
class OldLogitActor:
    """The dedicated source's model copy in a process of its own: a `LocalLogprobWorker` behind calls."""

    def __init__(self, model_path: str, model_cfg, num_cpus: float):
        _threads(num_cpus)
        # the trainer's policy (LoRA adapters included), on this actor's own device
        self.model = load_policy(model_path, model_cfg).to(resolve_device("auto")).eval()
        self.worker: LocalLogprobWorker | None = None

    def start(self, ctx: SourceContext, state: dict) -> None:
        self.worker = LocalLogprobWorker(self.model, ctx)
        self.worker.load(state, None)

    def load(self, state: dict) -> None:
        self.worker.load(state, None)

    def logprobs(self, prefixes: list[list[int]]) -> list[torch.Tensor]:
        return self.worker(prefixes)

    def nbytes(self) -> int:
        return self.worker.nbytes()


@ray.remote(max_concurrency=2)  # 2 threads: stop() must reach it while run() trains
class TrainerActor:
    """One trainer rank. Rank 0 also holds the rollout side's clients (engine replicas, env workers); with
    `trainer.world_size` > 1 the actors of a placement group form the trainer's process group, as verl and
    OpenRLHF place theirs."""

    def __init__(self, num_cpus: float):
        _threads(num_cpus)
        self.pipeline = None
        self.ranks = Ranks()

    def endpoint(self) -> tuple[str, int]:
        """Where the process group meets: this node and a free port (rank 0's)."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(
        self,
        cfg: Config,
        run_dir: str,
        resume: bool,
        model_path: str,
        handles: dict,
        rank: int = 0,
        world_size: int = 1,
        address: str = "",
        port: int = 0,
    ) -> None:
        self.ranks = init_ranks(rank, world_size, address, port, rank_device(cfg.trainer.device, rank))
        runtime = RayRuntime(cfg, handles) if rank == 0 else EmbeddedRuntime()  # other ranks make no parts
        self.pipeline = Pipeline(
            cfg, Path(run_dir), resume=resume, model_path=Path(model_path), runtime=runtime, ranks=self.ranks
        )

    def run(self) -> dict:
        try:
            return self.pipeline.run(progress=False)  # the driver draws the bar; the actor's would be log lines
        finally:
            close_ranks(self.ranks)

    def stop(self, signum: int) -> None:
        if self.pipeline is not None:
            self.pipeline.request_stop(signum)


# --------------------------------------------------------------------------- clients (inside the trainer actor)


class RayEngine(InferenceEngine):
    """The engine interface over N replicas: each batch is split round-robin, one share per replica."""

    def __init__(self, replicas: list, timeout_s: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.replicas = replicas
        self.dtype = dtype  # the replicas' weight dtype: what crosses the network
        self.timeout_s = timeout_s
        self.weights = None  # object ref of the current weights, for replicas that come back
        self.calls = 0
        self.requests = [0] * len(replicas)  # requests served per replica (load balance, visible in metrics)
        self.replica_failures = 0
        self.retried_requests = 0

    def _generate(self, requests, joiners=None, on_result=None):  # replicas batch statically
        n = len(self.replicas)
        self.calls += 1
        start = self.calls % n  # rotate, so a lone request does not always land on replica 0
        shares = {(start + i) % n: requests[i::n] for i in range(n) if requests[i::n]}
        refs = {i: self.replicas[i].generate.remote(share, self.version) for i, share in shares.items()}
        for i, share in shares.items():
            self.requests[i] += len(share)
        results = {}
        for i, ref in refs.items():
            for res in self._collect(i, ref, shares[i]):
                results[res.request_id] = res
        return [results[r.request_id] for r in requests]

    def _collect(self, i: int, ref, share: list[GenerationRequest], attempts: int = 3) -> list[GenerationResult]:
        for _ in range(attempts):
            try:
                out = ray.get(ref, timeout=self.timeout_s)
            except ACTOR_FAILURES as exc:
                if isinstance(exc, GetTimeoutError):  # hung, not dead: make Ray restart it
                    ray.kill(self.replicas[i], no_restart=False)
                out = None
            if out is not None:
                return out
            # died, hung, or came back restarted (not at our version): retry its share on it
            self.replica_failures += 1
            self.retried_requests += len(share)
            log.warning("engine replica %d failed or restarted; retrying its %d requests", i, len(share))
            if self.pause_requested:  # an update is waiting: hand the share back untouched, as paused
                return [r.unchanged("paused") for r in share]
            self._sync(i)  # current weights first
            ref = self.replicas[i].generate.remote(share, self.version)
        raise RuntimeError(f"engine replica {i} failed {attempts} times in a row")

    def _sync(self, i: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if self.weights is not None:
                    ray.get(self.replicas[i].update_weights.remote(self.weights, self.version), timeout=self.timeout_s)
                else:
                    ray.get(self.replicas[i].pid.remote(), timeout=self.timeout_s)
                return
            except ACTOR_FAILURES:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine replica {i} did not come back within {self.timeout_s:.0f}s") from None
                time.sleep(0.5)

    def _each(self, method: str, *args) -> None:
        """Call `method` on every replica; a replica that fails is re-synced at its next generate."""
        refs = [getattr(r, method).remote(*args) for r in self.replicas]
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=self.timeout_s)
            except ACTOR_FAILURES as exc:
                log.warning("engine replica %d: %s failed (%s)", i, method, type(exc).__name__)

    def pause(self) -> None:
        with self._cond:
            self._paused = True
        self._each("pause")
        super().pause()

    def resume(self) -> None:
        self._each("resume")
        super().resume()

    def update_weights(self, weights: Weights, version: int) -> None:
        # Cast here, as each replica would on load (bit-identical), so half the bytes travel for bfloat16;
        # one put, every replica reads the same object.
        self.weights = ray.put({k: v.to(self.dtype) if v.is_floating_point() else v for k, v in weight_items(weights)})
        self.version = version
        self._each("update_weights", self.weights, version)

    def metrics(self) -> dict[str, float]:
        out = {
            M.RAY_ENGINE_REPLICA_FAILURES: float(self.replica_failures),
            M.RAY_ENGINE_RETRIED_REQUESTS: float(self.retried_requests),
        }
        out.update({M.engine_requests(i): float(n) for i, n in enumerate(self.requests)})
        return out


class RayLogprobWorker:
    """The dedicated source's `LogprobWorker` in an OldLogitActor."""

    def __init__(self, actor, state: dict[str, torch.Tensor], ctx: SourceContext, timeout_s: float):
        self.actor, self.timeout_s = actor, timeout_s
        # the trainer's weights now (the resumed ones on resume) and its scoring numerics; the actor is a
        # process of its own: no ranks, no factories of the trainer's process
        scoring = dataclasses.replace(ctx, ranks=Ranks(), whole_policy=None)
        ray.get(self.actor.start.remote(scoring, ray.put(state)), timeout=self.timeout_s)

    def __call__(self, prefixes):
        return ray.get(self.actor.logprobs.remote(prefixes), timeout=self.timeout_s)

    def load(self, state, version):
        ray.get(self.actor.load.remote(ray.put(state)), timeout=self.timeout_s)

    def nbytes(self):
        return ray.get(self.actor.nbytes.remote(), timeout=self.timeout_s)

    def close(self):
        pass


class RayRuntime:
    """The `Runtime` backed by actors: `EmbeddedRuntime`'s three factories, returning clients of them."""

    def __init__(self, cfg: Config, handles: dict):
        self.timeout_s = cfg.runtime.ray.request_timeout_s
        self.handles = handles
        self.envs = EnvPool(handles["envs"], cfg.env.step_timeout_s)
        self.engine: RayEngine | None = None

    def make_engine(self, cfg, model_path, tokenizer, trainer_device, sleeps=False):
        # the engines are actors of their own: weights reach them through Ray, then the host path; they never
        # sleep (config validation refuses engine.sleep on Ray, and the plan never turns it on there)
        self.engine = RayEngine(self.handles["engines"], self.timeout_s, DTYPES[cfg.engine.dtype])
        return self.engine

    def make_env(self, cfg):
        return RemoteEnv(self.envs)

    @property
    def logprob_worker(self):
        actor = self.handles.get("oldlogit")
        return None if actor is None else (lambda state, ctx: RayLogprobWorker(actor, state, ctx, self.timeout_s))

    def metrics(self) -> dict[str, float]:
        out = {M.RAY_ENV_WORKER_FAILURES: float(self.envs.failures)}
        if self.engine is not None:
            out.update(self.engine.metrics())
        return out

    def close(self) -> None: ...


# --------------------------------------------------------------------------- the driver


def required_cpus(cfg: Config) -> float:
    r = cfg.runtime.ray
    dedicated = r.oldlogit_num_cpus if cfg.oldlogits.source == "dedicated" else 0.0
    trainers = cfg.trainer.world_size * r.trainer_num_cpus
    return trainers + r.engine_replicas * r.engine_num_cpus + r.env_workers * r.env_num_cpus + dedicated


class RaySession:
    """One run on Ray: actors up, `run()`, actors down (and the local cluster, if this session started it)."""

    def __init__(self, cfg: Config, run_dir: Path, model_path: Path, *, resume: bool = False):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.placement = None
        r = cfg.runtime.ray
        self.started_cluster = not ray.is_initialized()
        if self.started_cluster:
            if r.address:
                ray.init(address=r.address, namespace="twofold", log_to_driver=True)
            else:  # logical CPUs: enough for every actor's request, whatever the core count
                ray.init(
                    num_cpus=max(os.cpu_count() or 1, math.ceil(required_cpus(cfg))),
                    include_dashboard=False,
                    namespace="twofold",
                    log_to_driver=True,
                )
        self.prefix = f"twofold-{uuid.uuid4().hex[:8]}-"
        path = str(model_path)
        self.engines = [
            EngineReplica.options(
                name=f"{self.prefix}engine-{i}", num_cpus=r.engine_num_cpus, num_gpus=r.engine_num_gpus
            ).remote(cfg.engine, path, cfg.seed + 7919 * i, r.engine_num_cpus)
            for i in range(r.engine_replicas)
        ]
        self.envs = [
            EnvWorker.options(name=f"{self.prefix}env-{i}", num_cpus=r.env_num_cpus).remote(cfg.env)
            for i in range(r.env_workers)
        ]
        handles = {"engines": self.engines, "envs": self.envs}
        self.oldlogit = None
        if cfg.oldlogits.source == "dedicated":
            self.oldlogit = OldLogitActor.options(
                name=f"{self.prefix}oldlogit", num_cpus=r.oldlogit_num_cpus, num_gpus=r.oldlogit_num_gpus
            ).remote(path, cfg.model, r.oldlogit_num_cpus)
            handles["oldlogit"] = self.oldlogit
        self.trainers = self._trainer_ranks(cfg.trainer.world_size)
        self.trainer = self.trainers[0]  # rank 0: the rollout side's clients, metrics, checkpoints' coordinator
        address, port = _get(self.trainer.endpoint.remote())
        n = len(self.trainers)
        _get_all(
            [
                t.setup.remote(cfg, str(self.run_dir), resume, path, handles if i == 0 else {}, i, n, address, port)
                for i, t in enumerate(self.trainers)
            ]
        )

    def _trainer_ranks(self, n: int) -> list:
        """One TrainerActor per rank; several are gang-scheduled in a placement group (one bundle each)."""
        r = self.cfg.runtime.ray
        options = {"num_cpus": r.trainer_num_cpus, "num_gpus": r.trainer_num_gpus}
        if n == 1:
            return [TrainerActor.options(name=f"{self.prefix}trainer", **options).remote(r.trainer_num_cpus)]
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": r.trainer_num_cpus, **({"GPU": r.trainer_num_gpus} if r.trainer_num_gpus else {})}
        self.placement = placement_group([bundle] * n, strategy="PACK")
        ray.get(self.placement.ready(), timeout=r.request_timeout_s)
        return [
            TrainerActor.options(
                name=f"{self.prefix}trainer" + (f"-{i}" if i else ""),
                **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=i),
            ).remote(r.trainer_num_cpus)
            for i in range(n)
        ]

    def actor(self, role: str):
        """A named actor of this session ("engine-0", "env-1", "trainer", "trainer-1", "oldlogit"), e.g. to kill
        in a test."""
        return ray.get_actor(f"{self.prefix}{role}", namespace="twofold")

    def run(self) -> dict:
        refs = [t.run.remote() for t in self.trainers]
        # forwarded to rank 0, which stops every rank after its current step, with a checkpoint, as embedded
        with stop_signals(lambda signum, frame: self.trainer.stop.remote(signum)):
            self._follow(refs)
            try:
                return _get_all(refs)[0]
            except BaseException:
                for t in self.trainers:  # a rank is gone: the others would wait in a collective forever
                    ray.kill(t, no_restart=True)
                raise

    def _follow(self, refs: list) -> None:
        """Progress bar from metrics.jsonl until one rank's run() returns (or fails)."""
        steps = self.cfg.trainer.steps
        metrics = self.run_dir / "metrics.jsonl"
        signal_watch, seen = LearningSignalWatch(), 0  # the trainer actor logs the warning; the bar shows it too
        with tqdm(total=steps, disable=not self.cfg.run.progress, desc="train (ray)", unit="step") as bar:
            while True:
                done, _ = ray.wait(refs, timeout=1.0)
                rows = read_metrics(metrics)
                for row in rows[seen:]:
                    signal_watch.update_from_row(row)
                seen = max(seen, len(rows))
                if rows:
                    bar.n = rows[-1][M.STEP]
                    bar.set_postfix(progress_postfix(rows[-1], no_signal=signal_watch.warning is not None))
                if done:
                    return

    def close(self) -> None:
        for a in [*self.trainers, self.oldlogit, *self.engines, *self.envs]:
            if a is not None:
                ray.kill(a, no_restart=True)
        if self.placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)
        if self.started_cluster:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _get(ref):
    """ray.get that raises the actor's own exception (a ConfigError stays a ConfigError)."""
    return _get_all([ref])[0]


def _get_all(refs: list) -> list:
    """Every result, in order; the first failure is raised as the actor's own exception (a dead actor as
    Ray's `RayActorError`, which names it)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
    return ray.get(list(refs))
