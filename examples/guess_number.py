"""Your own environment: a `twofold.envs.TextEnv` subclass, named on the command line as `module:Class`.

    PYTHONPATH=examples twofold train env.name=guess_number:GuessNumber env.max_turns=5 model.warmstart=false

The base class keeps the turns, reads the reply's <answer>...</answer>, and answers a reply it cannot parse
(or an action `_parse` refuses) with `action_help` and the format penalty, so `step` never raises.
`env.options` reach `__init__` as keyword arguments.
"""

from __future__ import annotations

import random

from twofold.envs import TextEnv


class GuessNumber(TextEnv):
    """Find a secret whole number from 1 to `high`; each wrong guess is answered "Higher." or "Lower."."""

    system_prompt = "Find the secret number. Reply with one guess like <answer>7</answer>."

    def __init__(self, high: int = 20, **turns):
        super().__init__(**turns)
        self.high = high
        self.action_help = f"Answer with a whole number from 1 to {high} in <answer>...</answer>."

    def _reset(self, seed: int) -> str:
        self.secret = random.Random(seed).randint(1, self.high)
        return self.render()

    def render(self) -> str:
        return f"I picked a number from 1 to {self.high}. Your guess?"

    def _parse(self, answer: str) -> int | None:
        return int(answer) if answer.isdigit() and 1 <= int(answer) <= self.high else None

    def _apply(self, guess: int) -> tuple[str, float, bool, bool]:
        """(observation, reward, done, success) of a valid guess."""
        if guess == self.secret:
            return "Correct!", 1.0, True, True
        return ("Higher." if guess < self.secret else "Lower."), 0.0, False, False
