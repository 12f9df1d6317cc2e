"""Native tool calls: plain Python functions as tools, in the format the model's chat template renders.

A tool is a function with type hints and a Google-style docstring (`Args:`); its JSON schema comes from
transformers' own `get_json_schema`, and the prompt lists the schemas through the tokenizer's chat template
(`apply_chat_template(..., tools=schemas)`), as the model saw them in training. The model calls tools in
the Hermes/Qwen form

    <tool_call>{"name": "get_order", "arguments": {"id": "K42"}}</tool_call>

(several per reply allowed) or as an OpenAI-style JSON reply ({"name": ..., "arguments": ...}, or
{"type": "function", "function": {"name": ..., "arguments": "<json string>"}}). Arguments are checked against
the schema (`jsonschema`); a malformed call (bad JSON, an unknown tool, a missing or mistyped argument) is
never an exception: the caller gets the reason, which the env turns into an observation and the format
penalty. Results go back as `role: "tool"` messages, rendered by the same template.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from twofold.config import ConfigError
from twofold.envs.base import parse_answer

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


def tool_schema(fn: Callable) -> dict:
    """The OpenAI-style function schema of `fn` (transformers' `get_json_schema`), with a clear error."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # transformers raises its own types for missing hints or docstrings
        raise ValueError(
            f"tool {getattr(fn, '__name__', fn)!r} has no usable schema ({e}); give every argument "
            "a type hint and a Google-style docstring with an Args: section"
        ) from None


def load_tools(specs: list[str] | tuple[str, ...]) -> list[Callable]:
    """Tools by import path: 'package.module:function', or 'package.module:NAME' for a list of functions. A tool
    function may carry a `preflight()` that raises `ConfigError` when it cannot run here (the sandboxed `python`
    tool does); it is called as the tools load, with the env."""
    tools: list[Callable] = []
    for spec in specs:
        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(
                "env.options.tools", f"cannot import {spec!r} ({e}); write package.module:function"
            ) from None
        found = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        if not all(callable(f) for f in found):
            raise ConfigError("env.options.tools", f"{spec!r} is not a function (or a list of functions)")
        for tool in found:  # a tool that cannot run on this machine says so now, not at its first call
            preflight = getattr(tool, "preflight", None)
            if preflight is not None:
                preflight()
        tools += found
    return tools


class Toolbox:
    """Tools by name: their schemas for the prompt, reply parsing, argument checks and calls."""

    def __init__(self, functions: list[Callable]):
        self.functions = {f.__name__: f for f in functions}
        self.schemas = [tool_schema(f) for f in functions]
        # an argument the function does not take is a malformed call, not a TypeError inside the tool
        self._parameters = {
            s["function"]["name"]: {"additionalProperties": False, **s["function"]["parameters"]} for s in self.schemas
        }

    def parse(self, text: str) -> tuple[list[ToolCall] | None, str]:
        """The calls in a reply, or (None, why) when a call is malformed; ([], "") when there is none."""
        bodies = TOOL_CALL.findall(text)
        if not bodies:
            stripped = text.strip()
            if not (stripped.startswith("{") and stripped.endswith("}")):
                return [], ""
            bodies = [stripped]  # a bare JSON reply: the OpenAI form
        calls = []
        for body in bodies:
            call, why = self._one(body)
            if call is None:
                return None, why
            calls.append(call)
        return calls, ""

    def _one(self, body: str) -> tuple[ToolCall | None, str]:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            return None, f"the tool call is not valid JSON ({e.msg} at character {e.pos})"
        except (ValueError, RecursionError):  # an integer of over 4,300 digits, or nesting deeper than the stack
            return None, "the tool call is JSON that cannot be read (a huge number or deep nesting)"
        if isinstance(obj, dict) and isinstance(obj.get("function"), dict):  # {"type": "function", "function": ...}
            obj = obj["function"]
        if not isinstance(obj, dict) or "name" not in obj:
            return None, 'a tool call is {"name": ..., "arguments": {...}}'
        name, args = obj["name"], obj.get("arguments", {})
        if not isinstance(name, str):  # a model may write any JSON there; an object or list cannot be looked up
            return None, f"a tool's name is a string; the tools are {', '.join(self.functions)}"
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
                return None, f"the arguments of {name!r} are not valid JSON"
        if name not in self.functions:
            return None, f"unknown tool {name!r}; the tools are {', '.join(self.functions)}"
        if not isinstance(args, dict):
            return None, f"the arguments of {name!r} must be an object"
        try:
            jsonschema.validate(args, self._parameters[name])
        except jsonschema.ValidationError as e:
            return None, f"{name}: {e.message}"
        return ToolCall(name, args), ""

    def call(self, call: ToolCall) -> str:
        """Run one call; its result as text (an exception inside the tool is a result too: the model sees it)."""
        try:
            result = self.functions[call.name](**call.arguments)
        except Exception as e:
            return f"error: {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result)


def format_call(name: str, arguments: dict) -> str:
    """A call in the Hermes/Qwen form, as a model writes it (demonstrations, the solver)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


class ToolEnv:
    """Mixin for a `TextEnv` whose agent calls tools natively and ends with a final `<answer>`.

    Subclasses implement `tools()` (the functions, usually bound methods over the episode's world) and
    `_answer(text)` -> (observation, reward, done, success) for the final answer. A reply with calls runs
    them all and answers with one `role: "tool"` message per call (in `info["messages"]`); a malformed call
    or a reply with neither calls nor an answer costs the format penalty and says why.
    """

    @property
    def toolbox(self) -> Toolbox:
        if getattr(self, "_toolbox", None) is None:
            self._toolbox = Toolbox(self.tools())
        return self._toolbox

    @property
    def tool_schemas(self) -> list[dict]:
        return self.toolbox.schemas

    def tools(self) -> list[Callable]:
        raise NotImplementedError

    def parse_reply(self, text: str):
        calls, why = self.toolbox.parse(text)
        if calls is None:
            return None, why
        if calls:
            return ("calls", calls), ""
        answer = parse_answer(text)
        if answer is None:
            return None, "no <tool_call>...</tool_call> or <answer>...</answer> found"
        return (("answer", answer), "") if answer else (None, "the answer is empty")

    def _apply(self, action):
        if action[0] == "answer":
            return self._answer(action[1])
        results = [self.toolbox.call(call) for call in action[1]]
        self._messages = [{"role": "tool", "content": r} for r in results]
        return "\n".join(results), 0.0, False, False

    def step(self, action_text: str):
        self._messages = None
        obs, reward, done, info = super().step(action_text)
        if self._messages is not None:
            info["messages"] = self._messages
        return obs, reward, done, info

    def reply(self, move) -> str:
        """A solver move as the model writes it: a (name, arguments) call, or the final answer."""
        if isinstance(move, tuple):
            return format_call(*move)
        return f"<answer>{move}</answer>"
