"""How a multi-turn episode becomes tokens: every message is rendered by the tokenizer's own chat template.

The first prompt is the env's opening messages with the env's tool schemas (`tools=`), as the model saw
tools in training. Later turns (a user message, or `role: "tool"` results) are rendered the way the
template renders them inside a conversation: the text the template adds for them after a stub exchange,
plus whatever the template puts after the end-of-turn token (ChatML's newline). The agent's own replies
are never re-rendered: its sampled tokens stay as they were, ending with the end-of-turn token. The same
functions build rollouts and warm-start demonstrations, so SFT and RL see identical token sequences.
"""

from __future__ import annotations

import functools
import json
import logging

log = logging.getLogger(__name__)

_STUB = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "twofold_probe", "description": "-", "parameters": {"type": "object", "properties": {}}},
}
# The tool block of Hermes-style templates (Qwen2.5's; this one as the tiny model's `models.CHAT_TEMPLATE` renders
# it), whose <tool_call> form `envs.tools` parses; for templates that drop `tools=`.
TOOLS_IN_SYSTEM_MESSAGE = (
    "# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n<tools>\n{schemas}"
    "</tools>\n\nFor each call, return a JSON object with the function name and arguments within "
    '<tool_call></tool_call> tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>"
)


def template_renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template puts `tools=` in the prompt. Many do not (SmolLM2's, Llama 2's, most
    base models'): they render the conversation as if no tool were given, and the model would never learn of them.
    Says so once per tokenizer and template."""
    return _renders_tools(tokenizer, str(tokenizer.chat_template))


@functools.lru_cache(maxsize=8)
def _renders_tools(tokenizer, template: str) -> bool:
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "u"}], tools=[_PROBE_TOOL], add_generation_prompt=True, tokenize=False
    )
    if "twofold_probe" in probe:
        return True
    log.warning(
        "the chat template of %s ignores tools=; the tool schemas go into the system message in the Hermes form "
        "(<tools>...</tools>, calls as <tool_call>{...}</tool_call>) instead",
        getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
    )
    return False


def with_tools_in_system_message(messages: list[dict], tools: list[dict]) -> list[dict]:
    """`messages` with the schemas of `tools` (TOOLS_IN_SYSTEM_MESSAGE) after the system message's text, or as a
    system message of their own when there is none."""
    text = TOOLS_IN_SYSTEM_MESSAGE.format(schemas="\n".join(json.dumps(t) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, generation_prompt: bool = True) -> str:
    """`messages` through the tokenizer's chat template, with `tools` as the template lists them, or in the system
    message where the template drops them (`template_renders_tools`)."""
    if tools and not template_renders_tools(tokenizer):
        messages, tools = with_tools_in_system_message(messages, tools), None
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=generation_prompt, tokenize=False
    )


def first_prompt_ids(tokenizer, env, observation: str) -> list[int]:
    """The episode's opening tokens: the env's first messages (system prompt, first observation), its tools,
    and the assistant header."""
    text = render(tokenizer, env.first_messages(observation), getattr(env, "tool_schemas", None))
    return tokenizer.encode(text, add_special_tokens=False)


def turn_text(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The text the template adds for `messages` (and the next assistant header) after an assistant turn,
    starting right after that turn's end-of-turn token."""
    base = render(tokenizer, _STUB, tools, generation_prompt=False)
    full = render(tokenizer, _STUB + messages, tools)
    if not full.startswith(base):
        raise ValueError(
            "the chat template renders a conversation differently once more messages follow; "
            "twofold needs a template that only appends"
        )
    eos = tokenizer.eos_token
    glue = base[base.rindex(eos) + len(eos) :] if eos and eos in base else ""  # e.g. ChatML's "\n"
    return glue + full[len(base) :]


def next_turn_ids(tokenizer, messages: list[dict], last_token: int, tools: list[dict] | None = None) -> list[int]:
    """Tokens after an agent turn: close the turn if the reply did not, then `messages` (a user message, or
    the tool results of its calls) and the next assistant header."""
    close = [] if last_token == tokenizer.eos_token_id else [tokenizer.eos_token_id]
    return close + tokenizer.encode(turn_text(tokenizer, messages, tools), add_special_tokens=False)


def observation_messages(observation: str, info: dict) -> list[dict]:
    """What an env step answers, as messages: tool results when the env says so, else one user message."""
    return info.get("messages") or [{"role": "user", "content": observation}]
