"""Rewards of the dataset env: the built-in `exact` and `math`, and reward functions in the signatures users
already have from twofold, verl and TRL, alone or as a weighted sum.

    reward: exact                                  # the final answer against the ground truth, as text
    reward: math                                   # math-verify's equivalence (1/2 == 0.5 == \\frac{1}{2})
    reward: mypkg.rewards:score                    # a function of your own, in one of the signatures below
    reward: [math, mypkg.rewards:fmt]              # a sum: 1.0 * math + 0.2 * fmt, with
    reward_weights: [1.0, 0.2]                     # one weight per reward (none given: each 1.0)

A function's signature is read with `inspect.signature` when the env is built:
    twofold  f(completion, ground_truth, **row) -> float
    verl     compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | {"score": ...}
    TRL      f(completions, **kwargs) -> list[float]    (one episode: every list has one item; None scores 0)
A parameter named `solution_str` marks verl's, one named `completions` TRL's, anything else is twofold's. A
function receives only the arguments it names, unless it takes **kwargs; its call is tried (bound, not run) on
the first row then, so one that fits none is a ConfigError before any episode.
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twofold.config import ConfigError
from twofold.envs.base import parse_answer

log = logging.getLogger(__name__)

BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
GSM8K = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
BUILT_IN = ("exact", "math")
ACCEPTED = (
    "exact, math, or package.module:function in twofold's signature f(completion, ground_truth, **row) -> float, "
    "verl's compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict with 'score', "
    "or TRL's f(completions, **kwargs) -> list[float]; a list of these sums them (with env.options.reward_weights)"
)


@dataclass(frozen=True)
class Sample:
    """What a reward reads of one finished episode."""

    completion: str  # the reply that ended it
    ground_truth: str
    prompt: str | list[dict]  # the row's prompt: its text, or its opening chat messages
    row: dict  # every column of the dataset row


# --------------------------------------------------------------------------- the built-in rewards


def extract_answer(text: str) -> str | None:
    """The final answer of a reply: <answer>...</answer>, else the last \\boxed{...}, else GSM8K's #### line."""
    for found in (parse_answer(text), *(BOXED.findall(text)[-1:] or [None]), *(GSM8K.findall(text)[-1:] or [None])):
        if found is not None and found.strip():
            return found.strip()
    return None


def normalize(answer: str) -> str:
    """Case, spaces, a trailing period and thousands separators do not matter: '1,024.' == '1024'."""
    text = answer.strip().lower().rstrip(".").replace("$", "")
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", re.sub(r"\s+", " ", text))


def exact_reward(completion: str, ground_truth: str, **row) -> float:
    answer = extract_answer(completion)
    return float(answer is not None and normalize(answer) == normalize(ground_truth))


def math_reward(completion: str, ground_truth: str, **row) -> float:
    """math-verify's equivalence of the reply's final answer (or, without one, of the whole reply) and the ground
    truth, within `MathVerifier`'s deadline on any thread."""
    answer = extract_answer(completion)
    return float(MATH.equal(as_latex(ground_truth), as_latex(answer) if answer is not None else completion))


def as_latex(text: str) -> str:
    """`text` as one expression for math-verify: in $...$ unless it brings its own $ or \\boxed (bare, `3\\pi`
    would read as 3 and `\\sqrt{8}` as nothing)."""
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def math_equal(gold: str, guess: str) -> bool:
    """math-verify's parse and verify with their SIGALRM timeouts off: the caller bounds the time."""
    from math_verify import parse, verify

    gold_parsed, guess_parsed = parse(gold, parsing_timeout=None), parse(guess, parsing_timeout=None)
    return bool(gold_parsed) and bool(guess_parsed) and verify(gold_parsed, guess_parsed, timeout_seconds=None)


# --------------------------------------------------------------------------- math-verify within a deadline

MATH_DEADLINE_S = 10.0
MATH_STARTUP_S = 120.0  # importing sympy on a machine busy with training
MATH_PROCESSES = min(4, os.cpu_count() or 1)  # a check takes milliseconds; each process holds sympy (~90 MB)
_SERVE = "from twofold.envs.rewards import serve_math; serve_math()"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def serve_math() -> None:
    """A math-verify process: one JSON [gold, guess] per line on stdin, b"1" or b"0" per line on stdout."""
    import math_verify  # noqa: F401  (before "ready": starting is not billed to the first check's deadline)

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its warning that the timeout is off: ours bounds it
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print goes to stderr, not into the answers
    answers.write(b"ready\n")
    for line in sys.stdin.buffer:
        gold, guess = json.loads(line)
        answers.write(b"1\n" if math_equal(gold, guess) else b"0\n")


def _read_line(child: subprocess.Popen, timeout_s: float) -> bytes:
    """The child's next line, or b"" if none comes within `timeout_s` (or it exited)."""
    poller = select.poll()  # not select.select, which fails on the descriptors past 1024 a long run may hold
    poller.register(child.stdout, select.POLLIN)
    return child.stdout.readline() if poller.poll(timeout_s * 1000) else b""


class MathVerifier:
    """`math_equal` in child processes, so that a check returns within `deadline_s` on any thread.

    math-verify's own timeout is SIGALRM, which only the main thread may set, and which cannot stop sympy inside
    one long C call (math-verify issue #65: a tower of powers parses for hours). Here a check goes to a child process
    over a pipe; a child that has not answered by the deadline is killed, the check counts as not equal, and a later
    check starts a fresh child. At most `processes` children exist; more callers wait for a free one, and that wait
    is not part of the deadline.
    """

    def __init__(self, deadline_s: float = MATH_DEADLINE_S, processes: int = MATH_PROCESSES):
        self.deadline_s = deadline_s
        self.free = threading.BoundedSemaphore(processes)
        self.lock = threading.Lock()
        self.idle: list[subprocess.Popen] = []
        self.children: set[subprocess.Popen] = set()
        atexit.register(self.close)

    def equal(self, gold: str, guess: str) -> bool:
        with self.free:
            child = self._take()
            try:
                child.stdin.write(json.dumps([gold, guess]).encode() + b"\n")
                child.stdin.flush()
                answer = _read_line(child, self.deadline_s)
            except OSError:  # it was killed meanwhile (by `close`)
                answer = b""
            if answer in (b"1\n", b"0\n"):
                with self.lock:
                    self.idle.append(child)
                return answer == b"1\n"
            self._kill(child)
            log.warning(
                "math-verify gave no answer within %.0f s for %.80r against %.80r; scored as not equal, its process "
                "replaced",
                self.deadline_s,
                guess,
                gold,
            )
            return False

    def _take(self) -> subprocess.Popen:
        while True:
            with self.lock:
                child = self.idle.pop() if self.idle else None
            if child is None:
                return self._start()
            if child.poll() is None:
                return child
            self._kill(child)

    def _start(self) -> subprocess.Popen:
        path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        child = subprocess.Popen(
            [sys.executable, "-c", _SERVE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
        )
        with self.lock:
            self.children.add(child)
        if _read_line(child, MATH_STARTUP_S) != b"ready\n":
            self._kill(child)
            raise RuntimeError(f"math-verify's process did not start within {MATH_STARTUP_S:.0f} s (see its stderr)")
        return child

    def _kill(self, child: subprocess.Popen) -> None:
        with self.lock:
            if child not in self.children:  # `close` and a check's deadline may both end it
                return
            self.children.discard(child)
        child.kill()
        child.communicate()  # reaps it and closes its pipes

    def close(self) -> None:
        """Ends every child (at exit: one stuck in a check would otherwise outlive the run)."""
        with self.lock:
            children, self.idle = list(self.children), []
        for child in children:
            self._kill(child)


MATH = MathVerifier()


# --------------------------------------------------------------------------- signatures of users' functions


@dataclass(frozen=True)
class Signature:
    """One way of calling a reward function: the arguments it gets from a sample, and its score from the result."""

    name: str
    arguments: Callable[[Sample], tuple[tuple, dict]]
    score: Callable[[Any], float]


def _twofold_arguments(s: Sample) -> tuple[tuple, dict]:
    return (s.completion, s.ground_truth), dict(s.row)


def _verl_arguments(s: Sample) -> tuple[tuple, dict]:
    info = {"data_source": s.row.get("data_source"), "extra_info": s.row.get("extra_info")}
    return (), {**info, "solution_str": s.completion, "ground_truth": s.ground_truth}


def _trl_arguments(s: Sample) -> tuple[tuple, dict]:
    """TRL's batch of one: conversational prompts get their completion as a list of one assistant message."""
    completion = s.completion if isinstance(s.prompt, str) else [{"role": "assistant", "content": s.completion}]
    columns = {k: [v] for k, v in s.row.items() if k not in ("prompt", "completion", "completion_ids")}
    return (), {**columns, "prompts": [s.prompt], "completions": [completion]}


def _verl_score(result: Any) -> float:
    return float(result["score"] if isinstance(result, Mapping) else result)


def _trl_score(result: Sequence) -> float:
    if isinstance(result, str) or not isinstance(result, Sequence) or len(result) != 1:
        got = f"a {type(result).__name__}" + (f" of {len(result)}" if isinstance(result, Sequence) else "")
        raise TypeError(f"TRL's reward_funcs return a list of one score per completion (one here); got {got}")
    return 0.0 if result[0] is None else float(result[0])  # TRL: None for "does not apply", summed as 0


# What TRL's GRPOTrainer passes that an env scoring text has not: the reply's token ids, the trainer's state.
TRL_NOT_PASSED = ("completion_ids", "trainer_state")
TWOFOLD = Signature("twofold", _twofold_arguments, float)
VERL = Signature("verl", _verl_arguments, _verl_score)
TRL = Signature("TRL", _trl_arguments, _trl_score)


def signature_of(parameters: Mapping[str, inspect.Parameter]) -> Signature:
    if "solution_str" in parameters:
        return VERL
    if "completions" in parameters:
        return TRL
    return TWOFOLD


def accepted(parameters: Mapping[str, inspect.Parameter], args: tuple, kwargs: dict) -> dict:
    """The keyword arguments a function with `parameters` takes: those it names (all of them, if it takes
    **kwargs), less the ones `args` already fill."""
    P = inspect.Parameter
    filled = [p.name for p in parameters.values() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    named = {p.name for p in parameters.values() if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    takes_any = any(p.kind is P.VAR_KEYWORD for p in parameters.values())
    return {k: v for k, v in kwargs.items() if k not in filled[: len(args)] and (takes_any or k in named)}


@dataclass(frozen=True)
class RewardTerm:
    """One reward function (`spec`, as `env.options.reward` names it), called in its own signature, and its weight in
    the sum."""

    spec: str
    fn: Callable
    parameters: Mapping[str, inspect.Parameter]
    signature: Signature
    weight: float

    def __call__(self, sample: Sample) -> float:
        args, kwargs = self.signature.arguments(sample)
        result = self.fn(*args, **accepted(self.parameters, args, kwargs))
        try:
            return self.signature.score(result)
        except (TypeError, ValueError, KeyError) as e:  # the result's shape, not the function's own failure
            raise TypeError(f"env.options.reward {self.spec} ({self.signature.name} signature): {e}") from None


@dataclass(frozen=True)
class Reward:
    """The weighted sum of `env.options.reward`'s functions."""

    terms: tuple[RewardTerm, ...]
    needs_final_answer: bool  # only built-in rewards: a reply without a readable final answer is a format error

    def __call__(self, sample: Sample) -> float:
        return sum(term.weight * term(sample) for term in self.terms)


def _function(spec: Any) -> Callable:
    if spec == "exact":
        return exact_reward
    if spec == "math":
        return math_reward
    module, _, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not (module and name):
        raise ConfigError("env.options.reward", f"got {spec!r}; accepted: {ACCEPTED}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError("env.options.reward", f"{spec!r}: {e}; accepted: {ACCEPTED}") from None
    if not callable(fn):
        raise ConfigError("env.options.reward", f"{spec!r} is not a function; accepted: {ACCEPTED}")
    return fn


def _term(spec: Any, weight: float, sample: Sample) -> RewardTerm:
    fn = _function(spec)
    try:
        declared = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            "env.options.reward", f"{spec!r} has no readable signature ({e}); accepted: {ACCEPTED}"
        ) from None
    signature = signature_of(declared.parameters)
    args, kwargs = signature.arguments(sample)
    try:
        declared.bind(*args, **accepted(declared.parameters, args, kwargs))
    except TypeError as e:
        required = {n for n, p in declared.parameters.items() if p.default is inspect.Parameter.empty}
        unpassed = [n for n in TRL_NOT_PASSED if n in required and n not in kwargs]
        hint = (
            f"; twofold's envs score text, so TRL's {' and '.join(unpassed)} are not passed: give them a default "
            "or take **kwargs"
            if signature is TRL and unpassed
            else ""
        )
        raise ConfigError(
            "env.options.reward",
            f"{spec!r}{declared}, read as {signature.name}'s signature, does not fit its call ({e}){hint}; "
            f"accepted: {ACCEPTED}",
        ) from None
    return RewardTerm(spec, fn, declared.parameters, signature, weight)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_reward(spec: str | Sequence[str], weights: Sequence[float] | None, sample: Sample) -> Reward:
    """`env.options.reward` (one name or a list) with `env.options.reward_weights`, each function's call tried on
    `sample` (a row with an empty completion) so that a mismatch is an error now rather than at the first episode."""
    specs = _as_list(spec)
    if not specs:
        raise ConfigError("env.options.reward", f"an empty list; accepted: {ACCEPTED}")
    weights = [1.0] * len(specs) if weights is None else _as_list(weights)
    if len(weights) != len(specs) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ConfigError(
            "env.options.reward_weights", f"got {weights!r} for {len(specs)} rewards; give one number per reward"
        )
    terms = tuple(_term(s, float(w), sample) for s, w in zip(specs, weights, strict=True))
    return Reward(terms, needs_final_answer=all(s in BUILT_IN for s in specs))
