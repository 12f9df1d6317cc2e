"""A customer-service tool-use task: look up customers and orders, cancel orders, answer.

Each episode is a small generated shop (a few customers, each with 1-3 orders) and one goal in text.
The agent calls one tool per turn and ends with a final answer:

    <tool>find_customer(name="Ana")</tool>       -> "Ana: orders K42, B17"
    <tool>get_order(id="K42")</tool>             -> "K42: lamp, 35 dollars, pending, day 12"
    <tool>cancel_order(id="K42")</tool>          -> "K42 cancelled" (only pending orders can be)
    <answer>...</answer>                         -> ends the episode

Templates need 1 to 6 tool calls, so episode lengths vary widely. The reward is exact: 1 when the
answer matches (questions) or the final database equals the expected one (actions), else 0.
A malformed tool call costs `format_penalty` and gets an observation saying what is wrong; the
episode goes on. A well-formed call that fails (an unknown id) is a normal tool result.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from twofold.envs.base import TextEnv, parse_answer, register

NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lea")
ITEMS = ("lamp", "chair", "kettle", "rug", "desk", "mug", "clock", "shelf")
STATUSES = ("pending", "shipped", "delivered")
TOOL = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
CALL = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$", re.DOTALL)
ARG = re.compile(r'\s*(\w+)\s*=\s*"([^"]*)"\s*(?:,|$)')
TOOLS = {"find_customer": "name", "get_order": "id", "cancel_order": "id"}
TEMPLATES = ("status", "count", "total", "latest_item", "cancel_latest", "cancel_pending")


@dataclass
class Order:
    id: str
    customer: str
    item: str
    amount: int
    status: str
    day: int


def parse_call(text: str) -> tuple[tuple[str, str] | None, str]:
    """`name(key="value")` -> ((name, value), "") or (None, why it is malformed)."""
    m = CALL.match(text)
    if not m:
        return None, f'cannot read {text.strip()[:40]!r} as a tool call; write like get_order(id="K42")'
    name, args = m.group(1), m.group(2).strip()
    if name not in TOOLS:
        return None, f"unknown tool {name!r}; the tools are {', '.join(TOOLS)}"
    found = ARG.findall(args)
    rebuilt = ", ".join(f'{k}="{v}"' for k, v in found)
    if len(found) != 1 or found[0][0] != TOOLS[name] or rebuilt != re.sub(r"\s*=\s*", "=", args).strip():
        return None, f'{name} takes exactly one argument: {name}({TOOLS[name]}="...")'
    return (name, found[0][1]), ""


@register("tooluse")
class ToolUse(TextEnv):
    system_prompt = (
        "You are a shop assistant. Use one tool per turn, then give the final answer.\n"
        'Tools: <tool>find_customer(name="Ana")</tool>, <tool>get_order(id="K42")</tool>, '
        '<tool>cancel_order(id="K42")</tool>. Finish with <answer>...</answer> '
        "(a word or number for questions, done for actions)."
    )
    action_help = 'Call a tool like <tool>get_order(id="K42")</tool> or finish with <answer>...</answer>.'

    def __init__(self, num_customers: int = 4, templates: list[str] | tuple[str, ...] = TEMPLATES, **kw):
        super().__init__(**kw)
        bad = [t for t in templates if t not in TEMPLATES]
        if num_customers < 1 or not templates or bad:
            raise TypeError(f"num_customers must be >= 1 and templates a non-empty subset of {TEMPLATES}")
        self.num_customers, self.templates = num_customers, tuple(templates)

    # ------------------------------------------------------------------ world and goal

    def _reset(self, seed: int) -> str:
        rng = random.Random(seed)
        self.template = rng.choice(self.templates)
        names = rng.sample(NAMES, self.num_customers)
        self.orders: dict[str, Order] = {}
        self.customers: dict[str, list[str]] = {}
        for name in names:
            ids = []
            for _ in range(rng.randint(1, 3)):
                oid = f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(10, 99)}"
                while oid in self.orders:
                    oid = f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(10, 99)}"
                self.orders[oid] = Order(
                    oid, name, rng.choice(ITEMS), rng.randint(5, 99), rng.choice(STATUSES), rng.randint(1, 30)
                )
                ids.append(oid)
            self.customers[name] = ids
        self.target = rng.choice(names)
        mine = [self.orders[o] for o in self.customers[self.target]]
        days = rng.sample(range(1, 31), len(mine))  # distinct days: "most recent" is unambiguous
        for o, d in zip(mine, days, strict=True):
            o.day = d
        if self.template in ("cancel_latest", "cancel_pending"):
            pending = [o for o in mine if o.status == "pending"]
            if not pending:
                rng.choice(mine).status = "pending"
            while self.template == "cancel_pending" and sum(o.status == "pending" for o in mine) > 2:
                next(o for o in mine if o.status == "pending").status = "shipped"  # at most 6 calls
        self.question_order = rng.choice(mine).id
        self.expected_answer, self.expected_cancelled, self.plan = self._goal(mine)
        self.calls_made: set[tuple[str, str]] = set()
        self.cancelled: set[str] = set()
        return self.render()

    def _goal(self, mine: list[Order]) -> tuple[str | None, set[str], list[str]]:
        """(expected answer or None for actions, ids that must end cancelled, the solver's tool calls)."""
        lookups = [f'find_customer(name="{self.target}")'] + [f'get_order(id="{o.id}")' for o in mine]
        latest = max(mine, key=lambda o: o.day)
        pending = [o for o in mine if o.status == "pending"]
        if self.template == "status":
            return self.orders[self.question_order].status, set(), [f'get_order(id="{self.question_order}")']
        if self.template == "count":
            return str(len(mine)), set(), lookups[:1]
        if self.template == "total":
            return str(sum(o.amount for o in mine)), set(), lookups
        if self.template == "latest_item":
            return latest.item, set(), lookups
        if self.template == "cancel_latest":
            target = max(pending, key=lambda o: o.day)
            return None, {target.id}, lookups + [f'cancel_order(id="{target.id}")']
        return None, {o.id for o in pending}, lookups + [f'cancel_order(id="{o.id}")' for o in pending]

    def render(self) -> str:
        goal = {
            "status": f"What is the status of order {self.question_order}?",
            "count": f"How many orders does {self.target} have?",
            "total": f"What is the total amount in dollars of all orders of {self.target}?",
            "latest_item": f"What item did {self.target} order most recently?",
            "cancel_latest": f"{self.target} asks: cancel my most recent pending order.",
            "cancel_pending": f"{self.target} asks: cancel all my pending orders.",
        }[self.template]
        return f"Task: {goal}"

    # ------------------------------------------------------------------ acting

    def parse_reply(self, text: str):
        calls = TOOL.findall(text)
        answer = parse_answer(text)
        if calls and answer is None:
            call, why = parse_call(calls[-1])
            return (("tool", *call), "") if call else (None, why)
        if answer is not None:
            return (("answer", answer.strip()), "") if answer.strip() else (None, "the answer is empty")
        return None, "no <tool>...</tool> or <answer>...</answer> found"

    def _apply(self, action) -> tuple[str, float, bool, bool]:
        if action[0] == "answer":
            if self.expected_answer is not None:
                ok = action[1].lower() == self.expected_answer.lower()
            else:
                ok = self.cancelled == self.expected_cancelled
            return ("Correct." if ok else "Not correct."), float(ok), True, ok
        _, name, arg = action
        self.calls_made.add((name, arg))
        return f"Result: {self._run_tool(name, arg)}", 0.0, False, False

    def _run_tool(self, name: str, arg: str) -> str:
        if name == "find_customer":
            ids = self.customers.get(arg)
            return f"{arg}: orders {', '.join(ids)}" if ids else f'no customer named "{arg}"'
        order = self.orders.get(arg)
        if order is None:
            return f'no order "{arg}"'
        if name == "get_order":
            return f"{order.id}: {order.item}, {order.amount} dollars, {order.status}, day {order.day}"
        if order.status != "pending":
            return f"{order.id} is {order.status} and cannot be cancelled"
        order.status = "cancelled"
        self.cancelled.add(order.id)
        return f"{order.id} cancelled"

    # ------------------------------------------------------------------ solver and demonstrations

    def reply(self, move: str) -> str:
        """Tool calls go in <tool>, anything else is the final answer."""
        return f"<tool>{move}</tool>" if CALL.match(move) else f"<answer>{move}</answer>"

    def solve(self) -> list[str]:
        """The plan's calls not made yet (cancellations not done yet), then the answer."""
        todo = []
        for call in self.plan:
            (name, arg), _ = parse_call(call)
            done = arg in self.cancelled if name == "cancel_order" else (name, arg) in self.calls_made
            if not done:
                todo.append(call)
        return todo + [self.expected_answer or "done"]

    def random_answer(self, rng) -> str:
        if rng.random() < 0.5:
            name = rng.choice(tuple(TOOLS))
            arg = rng.choice(list(self.customers) if name == "find_customer" else list(self.orders))
            return f'{name}({TOOLS[name]}="{arg}")'
        return rng.choice([self.expected_answer or "done", "done", str(rng.randint(1, 200)), rng.choice(STATUSES)])
