"""The README's own-environment example (examples/guess_number.py) works as `env.name: module:Class`."""

from pathlib import Path

import pytest

from twofold.config import ConfigError
from twofold.envs import make_env

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_guess_number_answers_higher_lower_and_correct(on_path):
    """`env.options` reach `__init__` (high=8); a guess below the secret gets "Higher.", above "Lower.", both 0
    reward; the secret ends the episode with reward 1 and success; an unreadable or out-of-range reply gets the
    format penalty (-0.1 by default) and the action help, and the episode goes on."""
    env = make_env("guess_number:GuessNumber", max_turns=6, options={"high": 8})
    assert env.reset(3) == "I picked a number from 1 to 8. Your guess?"
    secret = env.secret
    assert 1 <= secret <= 8
    obs, reward, done, info = env.step("<answer>9</answer>")
    assert (reward, done, info["format_ok"]) == (-0.1, False, False) and "from 1 to 8" in obs
    if secret > 1:
        assert env.step("<answer>1</answer>")[:3] == ("Higher.", 0.0, False)
    if secret < 8:
        assert env.step("<answer>8</answer>")[:3] == ("Lower.", 0.0, False)
    obs, reward, done, info = env.step(f"I think <answer>{secret}</answer>")
    assert (obs, reward, done, info["success"]) == ("Correct!", 1.0, True, True)


def test_an_option_the_class_does_not_take_is_a_named_error(on_path):
    with pytest.raises(ConfigError, match="env.options.*size"):
        make_env("guess_number:GuessNumber", options={"size": 4})
