"""Episodes become tokens through the tokenizer's chat template: the same tokens as before for plain user
turns, tool schemas in the prompt, tool results as role-"tool" turns."""

from transformers import AutoTokenizer

from twofold.envs import make_env
from twofold.models import CHAT_TEMPLATE
from twofold.rollout.chat import (
    first_prompt_ids,
    next_turn_ids,
    observation_messages,
    render,
    template_renders_tools,
    turn_text,
)


def old_first_prompt_ids(tokenizer, env, observation):
    """The encoding before chat rendering moved to the template (kept here as the reference)."""
    messages = [{"role": "system", "content": env.system_prompt}] if env.system_prompt else []
    text = tokenizer.apply_chat_template(
        messages + [{"role": "user", "content": observation}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def old_observation_ids(tokenizer, observation, last_token):
    close = [] if last_token == tokenizer.eos_token_id else [tokenizer.eos_token_id]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": observation}], add_generation_prompt=True, tokenize=False
    )
    return close + tokenizer.encode("\n", add_special_tokens=False) + tokenizer.encode(text, add_special_tokens=False)


def test_plain_user_turns_keep_their_tokens(tokenizer):
    env = make_env("frozenlake", options={"size": 3})
    obs = env.reset(7)
    assert first_prompt_ids(tokenizer, env, obs) == old_first_prompt_ids(tokenizer, env, obs)
    nxt, _, _, info = env.step("<answer>Down</answer>")
    for last in (tokenizer.eos_token_id, 5):  # a reply that ended its turn, and one cut at max tokens
        assert next_turn_ids(tokenizer, observation_messages(nxt, info), last) == old_observation_ids(
            tokenizer, nxt, last
        )


SCHEMA = {
    "type": "function",
    "function": {
        "name": "get_order",
        "description": "Look up an order.",
        "parameters": {
            "type": "object",
            "properties": {"id": {"type": "string", "description": "the order id"}},
            "required": ["id"],
        },
    },
}


def test_tool_results_render_as_tool_turns(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    schema = SCHEMA
    text = turn_text(
        tokenizer, [{"role": "tool", "content": "K42: lamp"}, {"role": "tool", "content": "B17: mug"}], [schema]
    )
    # ChatML: the newline after <|im_end|>, then the results grouped in one user turn, then the assistant header
    assert text == (
        "\n<|im_start|>user\n<tool_response>\nK42: lamp\n</tool_response>\n<tool_response>\nB17: mug\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        tools=[schema],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and '"name": "get_order"' in prompt
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_that_drops_tools_gets_them_in_the_system_message(tokenizer, smollm2_path):
    """SmolLM2's own template renders `tools=` as nothing. twofold then writes the schemas into the system message
    in the Hermes form; both templates are ChatML, so the prompt is, character for character, the one the tiny
    model's Hermes-style template (`models.CHAT_TEMPLATE`) makes with `tools=`. With a system message of its own
    the template's default one ("You are a helpful AI assistant named SmolLM...") gives way to the tools'."""
    smollm2 = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    dropped = smollm2.apply_chat_template(messages, tools=[SCHEMA], add_generation_prompt=True, tokenize=False)
    assert dropped == smollm2.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert not template_renders_tools(smollm2) and template_renders_tools(tokenizer)
    hermes = tokenizer.apply_chat_template(messages, tools=[SCHEMA], add_generation_prompt=True, tokenize=False)
    assert render(smollm2, messages, [SCHEMA]) == hermes
    assert render(tokenizer, messages, [SCHEMA]) == hermes  # a template that lists tools is left to do it
    alone = render(smollm2, messages[1:], [SCHEMA])
    assert alone.startswith("<|im_start|>system\n# Tools") and "SmolLM" not in alone
    # later turns: the same text after the agent's turn whichever way the tools went in
    results = [{"role": "tool", "content": "K42: lamp"}]
    assert turn_text(smollm2, results, [SCHEMA]) == turn_text(smollm2, results)
