"""The tool-use environment and environment latency."""

import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twofold.config import TOOLUSE_TEMPLATES as TEMPLATES
from twofold.envs import make_env
from twofold.envs.tools import format_call
from twofold.envs.tooluse import ToolUse


def _seed_for(template):
    env = ToolUse()
    return next(s for s in range(500) if (env.reset(s), env.template)[1] == template)


def _play(env, moves):
    for move in moves:
        obs, reward, done, info = env.step(env.reply(move))
        if done:
            return obs, reward, info
    raise AssertionError("episode did not end")


@pytest.mark.parametrize("template", TEMPLATES)
def test_each_template_is_won_by_its_solver(template):
    won = 0
    for seed in range(120):
        env = ToolUse(max_turns=10)
        env.reset(seed)
        if env.template != template:
            continue
        plan = env.solve()
        assert 2 <= len(plan) <= 7  # 1 to 6 tool calls, then the answer
        _, reward, info = _play(env, plan)
        assert reward == 1.0 and info["success"]
        won += 1
    assert won >= 5


def test_plan_lengths_vary_from_one_to_six_calls():
    lengths = set()
    for seed in range(300):
        env = ToolUse()
        env.reset(seed)
        lengths.add(len(env.solve()) - 1)
    assert min(lengths) == 1 and max(lengths) == 6 and len(lengths) >= 5


def test_hand_made_world_tools_and_exact_rewards():
    env = ToolUse()
    env.reset(_seed_for("cancel_latest"))
    # Replace the generated shop by a hand-made one.
    from twofold.envs.tooluse import Order

    env.orders = {
        "K42": Order("K42", "Ana", "lamp", 35, "pending", 12),
        "B17": Order("B17", "Ana", "mug", 8, "pending", 20),
        "C50": Order("C50", "Ana", "rug", 60, "shipped", 25),
    }
    env.customers = {"Ana": ["K42", "B17", "C50"]}
    env.target = "Ana"
    env.expected_answer, env.expected_cancelled, env.plan = env._goal(list(env.orders.values()))
    assert env.expected_cancelled == {"B17"}  # the most recent *pending* order, not C50
    assert env.step(format_call("find_customer", {"name": "Ana"}))[0] == "Ana: orders K42, B17, C50"
    assert env.step(format_call("get_order", {"id": "K42"}))[0] == "K42: lamp, 35 dollars, pending, day 12"
    assert env.step(format_call("cancel_order", {"id": "C50"}))[0] == "C50 is shipped and cannot be cancelled"
    assert env.step(format_call("get_order", {"id": "Z99"}))[0] == 'no order "Z99"'
    obs, reward, done, info = env.step(format_call("cancel_order", {"id": "K42"}))  # the wrong one
    assert (obs, reward, done) == ("K42 cancelled", 0.0, False) and info["format_ok"]
    assert info["messages"] == [{"role": "tool", "content": "K42 cancelled"}]  # a tool turn, not a user one
    env.step(format_call("cancel_order", {"id": "B17"}))
    obs, reward, done, info = env.step("<answer>done</answer>")
    assert (reward, done, info["success"]) == (0.0, True, False)  # K42 must not have been cancelled


def test_question_answer_is_checked_exactly():
    env = ToolUse()
    env.reset(_seed_for("total"))
    right = env.expected_answer
    assert env.step(f"<answer>{int(right) + 1}</answer>")[1] == 0.0
    env.reset(_seed_for("total"))
    assert env.step(f"I think <answer> {right} </answer>")[1:3] == (1.0, True)


@pytest.mark.parametrize(
    "reply,why",
    [
        ('<tool_call>{"name": "get_order", "arguments": {}}</tool_call>', "get_order: 'id' is a required property"),
        ('<tool_call>{"name": "delete_order", "arguments": {"id": "K42"}}</tool_call>', "unknown tool 'delete_order'"),
        ("<tool_call>look at everything</tool_call>", "the tool call is not valid JSON"),
        ('<tool_call>{"name": {"get_order": {"id": "K42"}}}</tool_call>', "a tool's name is a string"),
        ('<tool_call>{"name": ["get_order"], "arguments": {}}</tool_call>', "a tool's name is a string"),
        ("<tool_call>" + "1" * 5000 + "</tool_call>", "JSON that cannot be read"),  # past int's 4,300 digits
        ("<tool_call>" + "[" * 100_000 + "</tool_call>", "JSON that cannot be read"),  # past the recursion limit
        ('<tool_call>{"name": "get_order", "arguments": "' + "1" * 5000 + '"}</tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "get_order", "arguments": {"id": 42}}</tool_call>', "42 is not of type 'string'"),
        (
            '<tool_call>{"name": "get_order", "arguments": {"id": "K42", "x": "1"}}</tool_call>',
            "get_order: Additional properties are not allowed ('x' was unexpected)",
        ),
        ("just chatting", "no <tool_call>...</tool_call> or <answer>...</answer> found"),
        ("<answer>  </answer>", "the answer is empty"),
    ],
)
def test_malformed_tool_calls_get_a_clear_error_and_the_episode_goes_on(reply, why):
    env = ToolUse(format_penalty=-0.1)
    env.reset(3)
    obs, reward, done, info = env.step(reply)
    assert why in obs and obs.startswith("Invalid reply:")
    assert (reward, done, info["format_ok"]) == (-0.1, False, False)
    assert env.step(env.reply(env.solve()[0]))[3]["format_ok"]  # and the next valid call works


def test_calls_in_the_hermes_and_openai_forms_and_several_per_reply():
    env = ToolUse()
    env.reset(_seed_for("count"))
    openai = '{"type": "function", "function": {"name": "find_customer", "arguments": "{\\"name\\": \\"%s\\"}"}}'
    obs, _, _, info = env.step(openai % env.target)
    assert obs.startswith(f"{env.target}: orders") and info["format_ok"]
    first, second = env.customers[env.target][0], list(env.orders)[-1]
    both = format_call("get_order", {"id": first}) + " and " + format_call("get_order", {"id": second})
    obs, _, _, info = env.step(both)
    assert [m["content"].split(":")[0] for m in info["messages"]] == [first, second]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.integers(0, 1000))
def test_fuzz_tool_replies_never_raise(text, seed):
    env = ToolUse()
    env.reset(seed)
    for reply in (
        text,
        f"<tool_call>{text}</tool_call>",
        format_call("get_order", {"id": text}),
        '<tool_call>{"name": "get_order", "arguments": ' + text + "}</tool_call>",
    ):
        obs, reward, done, info = env.step(reply)
        assert isinstance(obs, str) and isinstance(reward, float)


def test_step_latency_sleeps_concurrently_on_the_pool(tiny_path, tokenizer, monkeypatch):
    """8 env steps of 300 ms each on the worker's pool: each step's latency is one sleep of 0.3 s (not a
    spin), and all 8 sleeps are in flight at once (concurrent, not 8 x 0.3 s one after another). The sleep
    is replaced by a barrier of 8, so the check holds however loaded the machine is."""
    import threading

    from conftest import small_config

    from twofold.engine import make_engine
    from twofold.rollout import worker as worker_module
    from twofold.rollout.worker import Episode, RolloutWorker

    barrier, slept, real_sleep = threading.Barrier(8), [], time.sleep

    def sleep(seconds: float) -> None:
        if threading.current_thread().name.startswith("env"):  # the worker's env pool; other sleeps are real
            slept.append(seconds)
            barrier.wait(timeout=60)  # raises BrokenBarrierError unless 8 steps sleep at the same time
        else:
            real_sleep(seconds)

    monkeypatch.setattr(worker_module.time, "sleep", sleep)
    cfg = small_config(**{"env.name": "tooluse", "env.step_latency_ms": 300.0})
    engine = make_engine(cfg.engine, tiny_path, tokenizer, seed=0)
    worker = RolloutWorker(engine, tokenizer, cfg, admit=lambda: False, on_group=lambda g: None)
    episodes = []
    for k in range(8):
        env = make_env("tooluse")
        env.reset(k)
        episodes.append(Episode(None, env, random.Random(k)))
    futures = [
        worker.executor.submit(worker._env_step, ep, format_call("find_customer", {"name": "Ana"})) for ep in episodes
    ]
    results = [f.result() for f in futures]
    worker.stop()
    assert all(r[3]["messages"][0]["role"] == "tool" for r in results)
    assert slept == [0.3] * 8


def test_tiny_tokenizer_learns_the_text_of_an_env_outside_its_fixed_corpus():
    """Tool names become single tokens for tooluse; the grid envs' corpus (and so their cache keys) is unchanged."""
    from twofold.config import EnvConfig
    from twofold.envs import tokenizer_corpus
    from twofold.models import build_tokenizer

    assert tokenizer_corpus(EnvConfig(name="sokoban")) == tokenizer_corpus()
    grid_only = build_tokenizer(tokenizer_corpus(), 512).get_vocab()
    with_tools = build_tokenizer(tokenizer_corpus(EnvConfig(name="tooluse")), 512).get_vocab()
    for word in ("customer", "tool", "order"):
        assert word in with_tools and word not in grid_only


@pytest.mark.parametrize("config", ["configs/tooluse.yaml", "configs/study/tooluse-stale.yaml"])
def test_the_shipped_tool_use_configs_leave_room_for_every_optimal_episode(config):
    # The native tool-call prompt lists the tool schemas: 803 tokens before the task with the default 512-token
    # vocabulary. At rollout.max_total_tokens=1024 the optimal solver won only 48% of episodes: the rest were
    # cut off, in the demonstrations and in the RL rollouts alike.
    import dataclasses

    from twofold.config import load_config
    from twofold.envs import tokenizer_corpus
    from twofold.models import ensure_tiny_model, load_tokenizer
    from twofold.trainer.warmstart import demonstration

    cfg = load_config(Path(__file__).parents[1] / config, ["model.warmstart=false"])
    tokenizer = load_tokenizer(ensure_tiny_model(cfg.model, tokenizer_corpus(cfg.env)))
    optimal = dataclasses.replace(cfg, warmstart=dataclasses.replace(cfg.warmstart, noise=0.0))
    episodes = [demonstration(optimal, tokenizer, i) for i in range(40)]
    assert all(success for _, _, success in episodes)
    assert max(len(ids) for ids, _, _ in episodes) < cfg.rollout.max_total_tokens
