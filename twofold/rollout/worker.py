"""The agent loop: many multi-turn episodes at once against one engine.

Each episode alternates generate -> parse -> env step until done. Generation is batched over all
episodes that are ready; env steps run on a thread pool (sleeping for simulated tool latency, never
spinning), so a slow environment never holds up the engine. Finished groups of G trajectories of
the same task instance go to `on_group`.

The worker mutates trajectories only from its own thread. `pause()` stops the engine at a token
boundary and returns once the worker has stored the partial outputs and parked, so the trainer may
then read every pending trajectory safely (interruption capture) and update the engine's weights.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from twofold.config import Config
from twofold.engine.base import GenerationRequest, GenerationResult, InferenceEngine, SamplingParams
from twofold.envs import TextEnv, env_from_config
from twofold.envs.seeding import level_seed
from twofold.rollout.chat import first_prompt_ids, next_turn_ids, observation_messages
from twofold.rollout.trajectory import Trajectory

log = logging.getLogger(__name__)


@dataclass
class Episode:
    traj: Trajectory
    env: TextEnv
    rng: random.Random
    request: GenerationRequest | None = None
    appended: int = 0  # output tokens of the current turn already in traj
    future: Future | None = None
    step_started: float = 0.0
    turn: int = 0


@dataclass
class RolloutCounters:
    env_errors: int = 0
    env_timeouts: int = 0
    nonfinite_dropped: int = 0
    truncated: int = 0
    discarded_tokens: int = 0
    generate_seconds: float = 0.0
    generated_tokens: int = 0
    errors_logged: set = field(default_factory=set)


class RolloutWorker:
    def __init__(
        self,
        engine: InferenceEngine,
        tokenizer,
        cfg: Config,
        *,
        admit: Callable[[], bool],
        on_group: Callable[[list[Trajectory]], None],
        on_episode_start: Callable[[Trajectory], None] = lambda t: None,
        on_new_version: Callable[[Trajectory, int], None] = lambda t, v: None,
        on_trajectory_end: Callable[[Trajectory], None] = lambda t: None,
        start_group: int = 0,
        levels: Iterator[int] | None = None,
        lockstep: bool = False,
        make_env: Callable[[], TextEnv] | None = None,
    ):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.admit, self.on_group = admit, on_group
        self.make_env = make_env or (lambda: env_from_config(cfg.env))  # the Ray runtime's envs live in actors
        self.on_episode_start, self.on_new_version, self.on_trajectory_end = (
            on_episode_start,
            on_new_version,
            on_trajectory_end,
        )
        e = cfg.engine
        self.params = SamplingParams(
            temperature=e.temperature,
            top_p=e.top_p,
            top_k=e.top_k,
            max_new_tokens=e.max_new_tokens,
            stop_token_ids=[tokenizer.eos_token_id],
        )
        self.episodes: dict[int, Episode] = {}
        self.group_members: dict[int, list[Trajectory]] = {}
        self.next_group = start_group
        self.next_uid = start_group * cfg.rollout.group_size
        # the level indices the groups play, in order: start_group, start_group + 1, ... unless a resumed run
        # skips the levels it already trained (`Admission.levels_to_play`)
        self.levels = levels if levels is not None else itertools.count(start_group)
        # lockstep: generate only once every outstanding env step is back, so each engine batch holds the
        # same episodes whatever the thread timing. Sync mode uses it to be reproducible (and resumable
        # bit for bit); async mode never waits for the slowest env step.
        self.lockstep = lockstep
        self.counters = RolloutCounters()
        self.executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="env")
        self._cond = threading.Condition()
        self._pause_requested = False
        self._parked = False
        self._stop = threading.Event()
        self._cpu_threads: Callable[[], int] | None = None  # set by start()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ episodes

    def _start_group(self) -> None:
        gid = self.next_group
        self.next_group += 1
        level = next(self.levels)
        seed = level_seed(self.cfg.seed, level)
        self.group_members[gid] = []
        for k in range(self.cfg.rollout.group_size):
            env = self.make_env()
            obs = env.reset(seed)
            traj = Trajectory(
                uid=self.next_uid, group_id=gid, level_seed=seed, level=level, start_version=self.engine.version
            )
            self.next_uid += 1
            traj.append(first_prompt_ids(self.tokenizer, env, obs), agent=False)
            ep = Episode(traj, env, random.Random(seed * 31 + k))
            ep.request = GenerationRequest(traj.uid, list(traj.token_ids), self._params_for(traj))
            self.episodes[traj.uid] = ep
            self.on_episode_start(traj)

    def _params_for(self, traj: Trajectory) -> SamplingParams:
        room = self.cfg.rollout.max_total_tokens - len(traj.token_ids)
        p = self.params
        return SamplingParams(
            p.temperature, p.top_p, p.top_k, max(1, min(p.max_new_tokens, room)), p.stop, p.stop_token_ids
        )

    def _store_output(self, ep: Episode, output_ids, output_logprobs, output_versions) -> None:
        new = slice(ep.appended, len(output_ids))
        if new.start == new.stop:
            return
        known = ep.traj.agent_versions()
        ep.traj.append(
            output_ids[new], agent=True, logprobs=output_logprobs[new], versions=output_versions[new], turn=ep.turn
        )
        ep.appended = len(output_ids)
        for v in sorted(set(output_versions[new]) - known):
            self.on_new_version(ep.traj, v)

    def _on_generated(self, ep: Episode, res) -> None:
        if res.finish_reason == "paused":
            if self.cfg.rollout.partial_rollout == "continue":
                self._store_output(ep, res.output_ids, res.output_logprobs, res.output_versions)
                ep.request = res.as_continuation(ep.request)
            else:  # regenerate_turn: the new version redoes the whole turn
                ep.traj.discarded_tokens += len(res.output_ids)
                self.counters.discarded_tokens += len(res.output_ids)
                ep.request = GenerationRequest(ep.request.request_id, ep.request.prompt_ids, ep.request.params)
            return
        self._store_output(ep, res.output_ids, res.output_logprobs, res.output_versions)
        ep.request = None
        if not all(math.isfinite(x) for x in res.output_logprobs):
            self.counters.nonfinite_dropped += 1
            self._finish(ep, "nonfinite")
            return
        text = self.tokenizer.decode(res.output_ids, skip_special_tokens=True)
        ep.step_started = time.monotonic()
        ep.future = self.executor.submit(self._env_step, ep, text)

    def _env_step(self, ep: Episode, text: str):
        env_cfg = self.cfg.env
        if env_cfg.step_latency_ms > 0:
            ms = env_cfg.step_latency_ms
            if env_cfg.step_latency_sigma > 0:
                ms *= math.exp(ep.rng.gauss(0.0, env_cfg.step_latency_sigma))
            time.sleep(ms / 1000.0)
        return ep.env.step(text)

    def _on_env_step(self, ep: Episode) -> None:
        fut, ep.future = ep.future, None
        try:
            obs, reward, done, info = fut.result()
        except Exception as exc:  # a broken env fails its episode, never the run
            self.counters.env_errors += 1
            key = (type(ep.env).__name__, type(exc).__name__)
            if key not in self.counters.errors_logged:
                self.counters.errors_logged.add(key)
                log.warning(
                    "env %s raised; the episode is dropped (logged once per error type)",
                    type(ep.env).__name__,
                    exc_info=exc,
                )
            self._finish(ep, "env_error")
            return
        traj = ep.traj
        traj.turn_rewards.append(float(reward))
        traj.format_ok.append(bool(info.get("format_ok", True)))
        ep.turn += 1
        if done:
            traj.success = bool(info.get("success", False))
            self._finish(ep, "done")
            return
        chunk = next_turn_ids(self.tokenizer, observation_messages(obs, info), traj.token_ids[-1], ep.env.tool_schemas)
        if len(traj.token_ids) + len(chunk) + 1 >= self.cfg.rollout.max_total_tokens:
            self.counters.truncated += 1
            self._finish(ep, "truncated")
            return
        traj.append(chunk, agent=False)
        ep.appended = 0
        ep.request = GenerationRequest(traj.uid, list(traj.token_ids), self._params_for(traj))

    def _finish(self, ep: Episode, status: str) -> None:
        ep.traj.status = status
        del self.episodes[ep.traj.uid]
        self.on_trajectory_end(ep.traj)
        members = self.group_members[ep.traj.group_id]
        members.append(ep.traj)
        if len(members) == self.cfg.rollout.group_size:
            del self.group_members[ep.traj.group_id]
            self.on_group(sorted(members, key=lambda t: t.uid))

    def _check_timeouts(self) -> None:
        limit = self.cfg.env.step_timeout_s
        now = time.monotonic()
        for ep in list(self.episodes.values()):
            if ep.future is not None and not ep.future.done() and now - ep.step_started > limit:
                self.counters.env_timeouts += 1
                log.warning(
                    "env step of episode %d exceeded env.step_timeout_s=%.1fs; episode dropped", ep.traj.uid, limit
                )
                ep.future = None  # the thread is abandoned; its result will be ignored
                self._finish(ep, "env_error")

    # ------------------------------------------------------------------ the loop

    def step_once(self) -> None:
        """Admit what may start, generate for every ready episode, absorb finished env steps."""
        while self.admit():
            self._start_group()
        if self.lockstep:
            pending = [ep.future for ep in self.episodes.values() if ep.future is not None]
            if pending:
                wait(pending, timeout=0.05)
                self._absorb_env_steps()
                return
        ready = [ep for ep in self.episodes.values() if ep.request is not None]
        if ready and not self.engine.pause_requested:
            t0 = time.perf_counter()
            self._generate(ready)
            self.counters.generate_seconds += time.perf_counter() - t0
        else:
            pending = [ep.future for ep in self.episodes.values() if ep.future is not None]
            if pending:
                wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
            elif not ready:
                time.sleep(0.002)  # nothing admitted yet: the trainer will raise the admission bound
        self._absorb_env_steps()

    def _generate(self, ready: list[Episode]) -> None:
        """One engine call for the `ready` episodes. Each result is handled as the engine hands it back, so a
        finished reply's env step starts while the batch runs on; under continuous batching (async mode) episodes
        that become ready meanwhile (back from their env step, or newly admitted) join the running batch."""
        in_flight = {ep.traj.uid: ep for ep in ready}

        def joiners(room: int) -> list[GenerationRequest]:
            self._use_cpu_threads()  # one call can run through several train steps: a new share applies here
            if self._stop.is_set() or self._pause_requested:  # let the running batch end
                return []
            while self.admit():
                self._start_group()
            self._absorb_env_steps()
            new = [ep for ep in self.episodes.values() if ep.request is not None and ep.traj.uid not in in_flight]
            in_flight.update((ep.traj.uid, ep) for ep in new[:room])
            return [ep.request for ep in new[:room]]

        def on_result(res: GenerationResult) -> None:
            ep = in_flight.pop(res.request_id)
            self.counters.generated_tokens += len(res.output_ids) - len(ep.request.output_ids)
            self._on_generated(ep, res)

        joining = self.cfg.engine.continuous_batching and not self.lockstep
        self.engine.generate([ep.request for ep in ready], joiners if joining else None, on_result)

    def _absorb_env_steps(self) -> None:
        for ep in list(self.episodes.values()):
            if ep.future is not None and ep.future.done():
                self._on_env_step(ep)
        self._check_timeouts()

    def run_until(self, done: Callable[[], bool]) -> None:
        """Synchronous use: drive the loop in the caller's thread."""
        while not done():
            self.step_once()

    # ------------------------------------------------------------------ background thread (async mode)

    def start(self, cpu_threads: Callable[[], int] | None = None) -> None:
        """Run the loop in a background thread. `cpu_threads`: how many threads its torch CPU kernels use, asked
        before each step of the loop and, under continuous batching, before each token's joiners (this thread's own
        OpenMP team; the trainer's is its own); None: torch's default throughout."""
        self._cpu_threads = cpu_threads
        self._thread = threading.Thread(target=self._run, name="rollout", daemon=True)
        self._thread.start()

    def _use_cpu_threads(self) -> None:
        """This thread's torch CPU threads as `start`'s `cpu_threads` asks now (called on the rollout thread)."""
        wanted = self._cpu_threads() if self._cpu_threads is not None else None
        if wanted is not None and wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._use_cpu_threads()
                with self._cond:
                    if self._pause_requested:
                        self._parked = True
                        self._cond.notify_all()
                        while self._pause_requested and not self._stop.is_set():
                            self._cond.wait(0.1)
                        self._parked = False
                        continue
                self.step_once()
        except BaseException as exc:  # surfaced to the trainer, which stops the run with it
            self.error = exc
            with self._cond:
                self._parked = True
                self._cond.notify_all()

    def pause(self) -> None:
        """Stop generation at a token boundary and wait until the worker has parked."""
        with self._cond:
            self._pause_requested = True
        self.engine.pause()
        if self._thread is None:
            return
        with self._cond:
            while not self._parked and self._thread.is_alive():
                self._cond.wait(0.1)

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()
        self.engine.resume()

    def stop(self) -> None:
        self._stop.set()
        self.resume()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.executor.shutdown(wait=False, cancel_futures=True)
