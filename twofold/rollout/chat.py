"""How a multi-turn episode becomes tokens: every message is rendered by the tokenizer's own chat template.

The first prompt is the env's opening messages with the env's tool schemas (`tools=`), as the model saw
tools in training. Later turns (a user message, or `role: "tool"` results) are rendered the way the
template renders them inside a conversation: the text the template adds for them after a stub exchange,
plus whatever the template puts after the end-of-turn token (ChatML's newline). The agent's own replies
are never re-rendered: its sampled tokens stay as they were, ending with the end-of-turn token. The same
functions build rollouts and warm-start demonstrations, so SFT and RL see identical token sequences.
"""

from __future__ import annotations

_STUB = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, generation_prompt: bool = True) -> str:
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
