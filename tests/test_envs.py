import dataclasses
import inspect
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twofold.config import ConfigError
from twofold.envs import env_class, make_env, parse_answer
from twofold.envs.sokoban import BOX_OFF, BOX_ON, SOLVED, STEP_PENALTY


def act(move):
    return f"I think so. <answer>{move}</answer>"


def test_parse_answer_forms():
    assert parse_answer("blah <answer> Left </answer>") == "Left"
    assert parse_answer("<answer>Up</answer> then <answer>Down</answer>") == "Down"
    assert parse_answer("Left") is None and parse_answer("<answer>Left") is None


def test_frozenlake_winning_sequence_and_hole():
    env = make_env("frozenlake")
    env.set_map(["SFF", "FHF", "FFG"])
    for move in ["Right", "Right", "Down"]:
        obs, r, done, info = env.step(act(move))
        assert not done and r == 0.0
    obs, r, done, info = env.step(act("Down"))
    assert done and r == 1.0 and info["success"] and "goal" in obs
    env.set_map(["SFF", "FHF", "FFG"])
    env.step(act("Down"))
    obs, r, done, info = env.step(act("Right"))
    assert done and r == 0.0 and not info["success"] and "hole" in obs


def test_frozenlake_wall_keeps_position():
    env = make_env("frozenlake")
    env.set_map(["SF", "FG"])
    obs, r, done, _ = env.step(act("Up"))
    assert env.position == (0, 0) and not done and obs.splitlines()[0] == "P F"


def test_invalid_reply_costs_format_penalty_and_continues_or_ends():
    env = make_env("frozenlake", format_penalty=-0.25)
    env.reset(0)
    obs, r, done, info = env.step("go left")
    assert r == -0.25 and not done and not info["format_ok"] and "no <answer>" in obs
    obs, r, done, info = env.step("<answer>Jump</answer>")
    assert r == -0.25 and "'Jump' is not a valid action" in obs
    env = make_env("frozenlake", invalid_action="end")
    env.reset(0)
    assert env.step("nothing")[2] is True


def test_max_turns_ends_episode():
    env = make_env("frozenlake", max_turns=2)
    env.set_map(["SF", "FG"])
    assert not env.step(act("Up"))[2]
    assert env.step(act("Up"))[2]


def test_sokoban_push_rules_and_rewards():
    env = make_env("sokoban")
    env.set_level(["#####", "#PBT#", "#####"])
    obs, r, done, info = env.step(act("Right"))
    assert done and info["success"] and r == pytest.approx(STEP_PENALTY + BOX_ON + SOLVED)
    env.set_level(["######", "#PB_T#", "######"])
    obs, r, done, _ = env.step(act("Left"))
    assert "wall" in obs and r == pytest.approx(STEP_PENALTY)
    env.set_level(["#####", "#PB##", "#T__#", "#####"])
    obs, r, done, _ = env.step(act("Right"))  # box against a wall does not move
    assert "does not move" in obs and env.player == (1, 1)
    env.set_level(["######", "#P*_T#", "######"])
    obs, r, done, _ = env.step(act("Right"))  # pushing off a target
    assert r == pytest.approx(STEP_PENALTY + BOX_OFF) and not done


def test_sokoban_two_boxes_in_a_row_do_not_move():
    env = make_env("sokoban")
    env.set_level(["######", "#PBB_#", "#TT__#", "######"])
    obs, _, _, _ = env.step(act("Right"))
    assert "does not move" in obs


@pytest.mark.parametrize("name", ["frozenlake", "sokoban"])
def test_generated_levels_are_solved_by_the_solver(name):
    for seed in range(25):
        env = make_env(name, max_turns=100)
        env.reset(seed)
        plan = env.solve()
        assert plan is not None
        for move in plan:
            obs, r, done, info = env.step(act(move))
        assert done and info["success"], (name, seed)


def test_frozenlake_reset_is_deterministic_by_seed():
    a, b = make_env("frozenlake"), make_env("frozenlake")
    assert a.reset(7) == b.reset(7)


def test_arithmetic_checks_exact_answer():
    env = make_env("arithmetic")
    obs = env.reset(3)
    value = env.solve()[0]
    assert eval(obs.replace("= ?", "")) == int(value)
    assert env.step(f"<answer>{value}</answer>")[1:3] == (1.0, True)
    env.reset(3)
    assert env.step(f"<answer>{int(value) + 1}</answer>")[1] == 0.0


def test_unknown_env_lists_known_ones_and_custom_class_loads():
    with pytest.raises(ConfigError, match="known: arithmetic, dataset, frozenlake, sokoban, tooluse, or package"):
        make_env("maze")
    env = make_env("twofold.envs.frozenlake:FrozenLake")
    assert env.reset(0)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["frozenlake", "sokoban", "arithmetic"]),
    st.lists(st.text(max_size=60), min_size=1, max_size=10),
    st.integers(0, 50),
)
def test_fuzz_step_never_raises(name, replies, seed):
    env = make_env(name, max_turns=4)
    env.reset(seed)
    for text in replies:
        obs, r, done, info = env.step(text)
        assert isinstance(obs, str) and set(info) >= {"success", "format_ok"}
    env.step(random.choice(["<answer>Left</answer>", "<answer>4</answer>"]))


def test_solver_success_rate_is_optimal_rate_of_the_level_set():
    from conftest import small_config

    from twofold.trainer.warmstart import solver_success_rate

    # A 4x4 lake goes from (0,0) to (3,3): no path is shorter than 6 moves.
    cfg = small_config(**{"env.options": {"size": 4}, "env.max_turns": 5})
    assert solver_success_rate(cfg, 10) == 0.0
    cfg = small_config(**{"env.options": {"size": 4}, "env.max_turns": 16})
    assert solver_success_rate(cfg, 10) == 1.0
    # Random moves only: a 4x4 lake is rarely crossed in 16 turns, never always.
    assert solver_success_rate(cfg, 10, noise=1.0) < 1.0


def test_env_settings_and_options_default_to_the_config_schema():
    env = make_env("sokoban")
    assert (env.max_turns, env.format_penalty, env.invalid_action) == (8, -0.1, "continue")  # EnvConfig's
    assert (env.size, env.num_boxes, env.reverse_steps, env.inner_walls) == (6, 1, 30, 1)  # SokobanOptions'
    for name in ("arithmetic", "dataset", "frozenlake", "sokoban", "tooluse"):
        schema = env_class(name).options_schema
        params = inspect.signature(env_class(name)).parameters
        for f in dataclasses.fields(schema):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            given = params[f.name].default
            assert (list(given) if isinstance(default, list) else given) == default, (name, f.name)


def test_a_misspelt_option_is_an_error_naming_it_and_the_closest_one():
    with pytest.raises(ConfigError) as e:
        make_env("dataset", options={"pth": "rows.jsonl"})
    assert e.value.field == "env.options.pth"
    assert e.value.message.startswith("dataset takes no option 'pth'; did you mean 'path'? its options: path, ")
    with pytest.raises(ConfigError, match="takes no option 'colour'; its options: size, "):
        make_env("frozenlake", options={"colour": "blue"})


@pytest.mark.parametrize(
    "name,options,field",
    [
        ("frozenlake", {"size": 1}, "env.options.size"),
        ("sokoban", {"num_boxes": 0}, "env.options.num_boxes"),
        ("arithmetic", {"num_terms": 1}, "env.options.num_terms"),
        ("tooluse", {"num_customers": 0}, "env.options.num_customers"),
    ],
)
def test_an_option_out_of_its_range_is_an_error_naming_it(name, options, field):
    with pytest.raises(ConfigError) as e:
        make_env(name, options=options)
    assert e.value.field == field and "must be >=" in e.value.message
