"""The text-environment interface and registry.

An environment speaks text: `reset(seed)` gives the first observation, `step(action_text)` takes
the agent's whole reply and returns (observation, reward, done, info) with `info["success"]` and
`info["format_ok"]`. The agent answers like `Some thought. <answer>Left</answer>`; a reply that
cannot be parsed, or names an action the env does not know, costs `format_penalty`, and the new
observation says why. `step` never raises on any string.
"""

from __future__ import annotations

import importlib
import inspect
import re
from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from twofold.config import ConfigError, EnvConfig, did_you_mean

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer> in `text`, stripped; None if there is none."""
    found = ANSWER.findall(text)
    return found[-1].strip() if found else None


def bfs_moves(start, is_goal, successors, max_states: int = 200_000) -> list[int] | None:
    """Shortest list of moves from `start` to a state where `is_goal` holds (breadth-first search).

    `successors(state)` yields (move, next_state); states must be hashable.
    """
    parent = {start: None}
    queue = deque([start])
    while queue and len(parent) <= max_states:
        state = queue.popleft()
        if is_goal(state):
            path = []
            while parent[state] is not None:
                state, move = parent[state]
                path.append(move)
            return path[::-1]
        for move, nxt in successors(state):
            if nxt not in parent:
                parent[nxt] = (state, move)
                queue.append(nxt)
    return None


class TextEnv(ABC):
    """Turn bookkeeping shared by every env: parsing, format penalty, max turns.

    Subclasses implement `_reset(seed) -> observation`, `_parse(answer) -> action or None` (or
    `parse_reply(text)` for replies that are not a single <answer>),
    `_apply(action) -> (observation, reward, done, success)` and `action_help` (what a valid answer is).
    """

    system_prompt: str = ""
    action_help: str = ""
    # JSON schemas of the env's tools for the chat template (`tools=`); None: an env without tools
    tool_schemas: list[dict] | None = None
    # The dataclass (help, defaults, ranges) of the keyword options the env takes from `env.options`, for
    # `twofold config --help env.options`; None: undocumented options
    options_schema: type | None = None

    def __init__(
        self,
        max_turns: int = EnvConfig.max_turns,
        format_penalty: float = EnvConfig.format_penalty,
        invalid_action: str = EnvConfig.invalid_action,
    ):
        self.max_turns = max_turns
        self.format_penalty = format_penalty
        self.invalid_action = invalid_action
        self.turn = 0
        self.done = True

    def reset(self, seed: int) -> str:
        self.turn = 0
        self.done = False
        return self._reset(seed)

    @classmethod
    def data_fingerprint(cls, options: dict) -> str | None:
        """What identifies the data behind these options beyond the options themselves (a dataset file's
        content), for caches keyed on the env; None for envs that generate their own episodes."""
        return None

    def first_messages(self, observation: str) -> list[dict]:
        """The conversation an episode opens with: the system prompt and the first observation as a user turn
        (a dataset row may bring its own messages)."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": observation}]

    def step(self, action_text: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self.done:
            return "The episode is over.", 0.0, True, {"success": False, "format_ok": False}
        self.turn += 1
        action, why = self.parse_reply(action_text if isinstance(action_text, str) else "")
        if action is None:
            obs = f"Invalid reply: {why}. {self.action_help}\n{self.render()}"
            reward, success, format_ok = self.format_penalty, False, False
            self.done = self.invalid_action == "end"
        else:
            obs, reward, self.done, success = self._apply(action)
            format_ok = True
        if self.turn >= self.max_turns:
            self.done = True
        return obs, float(reward), self.done, {"success": bool(success), "format_ok": format_ok}

    def parse_reply(self, text: str) -> tuple[Any | None, str]:
        """(action, "") for a valid reply, else (None, why it is not valid)."""
        answer = parse_answer(text)
        if answer is None:
            return None, "no <answer>...</answer> found"
        action = self._parse(answer)
        return (action, "") if action is not None else (None, f"'{answer[:40]}' is not a valid action")

    def reply(self, move: str) -> str:
        """The full reply text for a solver move (what `solve` and `random_answer` return)."""
        return f"<answer>{move}</answer>"

    @abstractmethod
    def _reset(self, seed: int) -> str: ...

    def _parse(self, answer: str) -> Any | None:
        """The action named by the text inside <answer>, or None (envs overriding parse_reply skip it)."""
        return None

    @abstractmethod
    def _apply(self, action: Any) -> tuple[str, float, bool, bool]: ...

    @abstractmethod
    def render(self) -> str: ...

    def solve(self) -> list[str] | None:
        """Moves (see `reply`) that solve the episode from the current state, if known."""
        return None

    def random_answer(self, rng) -> str:
        """A uniformly random valid move (the noisy solver's random move)."""
        raise NotImplementedError


class GridMoveEnv(TextEnv):
    """Grid worlds steered with the four moves Left, Down, Right, Up (gymnasium's FrozenLake order)."""

    MOVES = ("Left", "Down", "Right", "Up")
    DELTAS = {0: (0, -1), 1: (1, 0), 2: (0, 1), 3: (-1, 0)}
    action_help = (
        "Answer with <answer>Left</answer>, <answer>Down</answer>, <answer>Right</answer> or <answer>Up</answer>."
    )

    def _parse(self, answer: str) -> int | None:
        key = answer.strip().lower()
        for i, name in enumerate(self.MOVES):
            if key == name.lower():
                return i
        return None

    def random_answer(self, rng) -> str:
        return self.MOVES[rng.randrange(4)]


_REGISTRY: dict[str, type[TextEnv]] = {}


def register(name: str):
    """Class decorator: make an env available to configs as `env.name: <name>`."""

    def deco(cls):
        _REGISTRY[name] = cls
        return cls

    return deco


def known_envs() -> list[str]:
    return sorted(_REGISTRY)


def env_class(name: str) -> type[TextEnv]:
    """A registered name, or `package.module:ClassName` for a user's own env class."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError("env.name", f"cannot import {name!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, TextEnv)):
            raise ConfigError("env.name", f"{name!r} is not a twofold.envs.TextEnv subclass")
        return cls
    raise ConfigError(
        "env.name", f"unknown env {name!r}; known: {', '.join(known_envs())}, or package.module:ClassName for your own"
    )


def env_options(cls: type[TextEnv]) -> list[str] | None:
    """The keyword arguments `cls(...)` takes, following `**kwargs` up the classes it passes them to; None when
    the chain ends open (any key goes)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        parameters = inspect.signature(klass.__dict__["__init__"]).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None


def check_options(cls: type[TextEnv], env_cfg: EnvConfig) -> None:
    """Refuse an `env.options` key that `cls` does not take, naming the closest one it does."""
    taken = env_options(cls)
    if taken is None:
        return
    known = [n for n in taken if n not in ("max_turns", "format_penalty", "invalid_action")]  # env.* settings
    for key in env_cfg.options:
        if key not in known:
            hint = did_you_mean(key, known)
            raise ConfigError(
                f"env.options.{key}", f"{env_cfg.name} takes no option {key!r}; {hint}its options: {', '.join(known)}"
            )


def env_from_config(env_cfg: EnvConfig) -> TextEnv:
    """The env a config's `env` section describes (name, turns, penalties, options)."""
    cls = env_class(env_cfg.name)
    check_options(cls, env_cfg)
    try:
        return cls(
            max_turns=env_cfg.max_turns,
            format_penalty=env_cfg.format_penalty,
            invalid_action=env_cfg.invalid_action,
            **env_cfg.options,
        )
    except TypeError as e:
        raise ConfigError("env.options", f"{env_cfg.name}: {e}") from None


def make_env(name: str, **settings: Any) -> TextEnv:
    """The env `name` with `EnvConfig`'s settings, any of them given here instead (max_turns=..., options={...})."""
    return env_from_config(EnvConfig(name=name, **settings))
