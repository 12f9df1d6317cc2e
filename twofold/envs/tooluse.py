"""A customer-service tool-use task: look up customers and orders, cancel orders, answer.

Each episode is a small generated shop (a few customers, each with 1-3 orders) and one goal in text.
The agent calls tools natively, in the format its chat template renders (`twofold.envs.tools`):

    <tool_call>{"name": "find_customer", "arguments": {"name": "Ana"}}</tool_call>  -> "Ana: orders K42, B17"
    <tool_call>{"name": "get_order", "arguments": {"id": "K42"}}</tool_call>      -> "K42: lamp, 35 dollars, ..."
    <tool_call>{"name": "cancel_order", "arguments": {"id": "K42"}}</tool_call>   -> "K42 cancelled"
    <answer>...</answer>                                                         -> ends the episode

Templates need 1 to 6 tool calls, so episode lengths vary widely. The reward is exact: 1 when the
answer matches (questions) or the final database equals the expected one (actions), else 0.
A malformed tool call costs `format_penalty` and gets an observation saying what is wrong; the
episode goes on. A well-formed call that fails (an unknown id) is a normal tool result.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from twofold.config import TOOLUSE_TEMPLATES, ToolUseOptions, check_ranges
from twofold.envs.base import TextEnv, register
from twofold.envs.tools import ToolEnv

NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lea")
ITEMS = ("lamp", "chair", "kettle", "rug", "desk", "mug", "clock", "shelf")
STATUSES = ("pending", "shipped", "delivered")


@dataclass
class Order:
    id: str
    customer: str
    item: str
    amount: int
    status: str
    day: int


@register("tooluse")
class ToolUse(ToolEnv, TextEnv):
    system_prompt = (
        "You are a shop assistant. Use the tools to find what you need, one or more calls per turn, "
        "then give the final answer in <answer>...</answer> (a word or number for questions, done for actions)."
    )
    action_help = "Call a tool in <tool_call>...</tool_call> or finish with <answer>...</answer>."

    options_schema = ToolUseOptions

    def __init__(
        self, num_customers: int = ToolUseOptions.num_customers, templates: Sequence[str] = TOOLUSE_TEMPLATES, **kw
    ):
        super().__init__(**kw)
        check_ranges(ToolUseOptions(num_customers=num_customers, templates=list(templates)), "env.options.")
        if not templates or any(t not in TOOLUSE_TEMPLATES for t in templates):
            raise TypeError(f"templates must be a non-empty subset of {TOOLUSE_TEMPLATES}")
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
        lookups = [("find_customer", {"name": self.target})] + [("get_order", {"id": o.id}) for o in mine]
        latest = max(mine, key=lambda o: o.day)
        pending = [o for o in mine if o.status == "pending"]
        if self.template == "status":
            return self.orders[self.question_order].status, set(), [("get_order", {"id": self.question_order})]
        if self.template == "count":
            return str(len(mine)), set(), lookups[:1]
        if self.template == "total":
            return str(sum(o.amount for o in mine)), set(), lookups
        if self.template == "latest_item":
            return latest.item, set(), lookups
        if self.template == "cancel_latest":
            target = max(pending, key=lambda o: o.day)
            return None, {target.id}, lookups + [("cancel_order", {"id": target.id})]
        return None, {o.id for o in pending}, lookups + [("cancel_order", {"id": o.id}) for o in pending]

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

    # ------------------------------------------------------------------ tools and the answer

    def tools(self):
        return [self.find_customer, self.get_order, self.cancel_order]

    def find_customer(self, name: str) -> str:
        """Look up a customer by name and list the ids of their orders.

        Args:
            name: The customer's first name, as written in the task.
        """
        self.calls_made.add(("find_customer", name))
        ids = self.customers.get(name)
        return f"{name}: orders {', '.join(ids)}" if ids else f'no customer named "{name}"'

    def get_order(self, id: str) -> str:
        """Look up an order: item, amount in dollars, status and day.

        Args:
            id: The order id, for example K42.
        """
        self.calls_made.add(("get_order", id))
        order = self.orders.get(id)
        if order is None:
            return f'no order "{id}"'
        return f"{order.id}: {order.item}, {order.amount} dollars, {order.status}, day {order.day}"

    def cancel_order(self, id: str) -> str:
        """Cancel an order; only pending orders can be cancelled.

        Args:
            id: The order id, for example K42.
        """
        self.calls_made.add(("cancel_order", id))
        order = self.orders.get(id)
        if order is None:
            return f'no order "{id}"'
        if order.status != "pending":
            return f"{order.id} is {order.status} and cannot be cancelled"
        order.status = "cancelled"
        self.cancelled.add(order.id)
        return f"{order.id} cancelled"

    def _answer(self, answer: str) -> tuple[str, float, bool, bool]:
        if self.expected_answer is not None:
            ok = answer.lower() == self.expected_answer.lower()
        else:
            ok = self.cancelled == self.expected_cancelled
        return ("Correct." if ok else "Not correct."), float(ok), True, ok

    # ------------------------------------------------------------------ solver and demonstrations

    def solve(self) -> list:
        """The plan's calls not made yet (cancellations not done yet), then the answer."""
        todo = []
        for name, args in self.plan:
            done = (
                args["id"] in self.cancelled
                if name == "cancel_order"
                else (name, next(iter(args.values()))) in self.calls_made
            )
            if not done:
                todo.append((name, args))
        return todo + [self.expected_answer or "done"]

    def random_answer(self, rng):
        if rng.random() < 0.5:
            name = rng.choice(("find_customer", "get_order", "cancel_order"))
            if name == "find_customer":
                return name, {"name": rng.choice(list(self.customers))}
            return name, {"id": rng.choice(list(self.orders))}
        return rng.choice([self.expected_answer or "done", "done", str(rng.randint(1, 200)), rng.choice(STATUSES)])
