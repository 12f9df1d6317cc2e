"""A single-turn verifiable task (RLVR style): evaluate a small integer expression."""

from __future__ import annotations

import random

from twofold.config import ArithmeticOptions, check_ranges
from twofold.envs.base import TextEnv, register


@register("arithmetic")
class Arithmetic(TextEnv):
    system_prompt = "Compute the value of the expression. Answer with the integer only, like <answer>42</answer>."
    action_help = "Answer with an integer, like <answer>42</answer>."

    options_schema = ArithmeticOptions

    def __init__(
        self, num_terms: int = ArithmeticOptions.num_terms, max_value: int = ArithmeticOptions.max_value, **kw
    ):
        kw["max_turns"] = 1  # one question, one answer
        super().__init__(**kw)
        check_ranges(ArithmeticOptions(num_terms=num_terms, max_value=max_value), "env.options.")
        self.num_terms, self.max_value = num_terms, max_value

    def _reset(self, seed: int) -> str:
        rng = random.Random(seed)
        parts = [str(rng.randint(0, self.max_value))]
        for _ in range(self.num_terms - 1):
            parts += [rng.choice("+-*"), str(rng.randint(0, self.max_value))]
        self.expression = " ".join(parts)
        self.value = self._evaluate(parts)
        return self.render()

    @staticmethod
    def _evaluate(parts: list[str]) -> int:
        """Integer arithmetic with * before + and -, no eval()."""
        terms, ops = [int(parts[0])], []
        for op, num in zip(parts[1::2], parts[2::2], strict=True):  # parts alternate: value (op value)*
            if op == "*":
                terms[-1] *= int(num)
            else:
                ops.append(op)
                terms.append(int(num))
        total = terms[0]
        for op, t in zip(ops, terms[1:], strict=True):
            total = total + t if op == "+" else total - t
        return total

    def _parse(self, answer: str) -> int | None:
        text = answer.strip()
        if text.lstrip("-").isdigit() and len(text) < 12:
            return int(text)
        return None

    def _apply(self, action: int) -> tuple[str, float, bool, bool]:
        ok = action == self.value
        return ("Correct." if ok else f"Wrong: the value is {self.value}."), float(ok), True, ok

    def render(self) -> str:
        return f"{self.expression} = ?"

    def solve(self) -> list[str]:
        return [str(self.value)]

    def random_answer(self, rng) -> str:
        return str(self.value + rng.randint(-5, 5))
