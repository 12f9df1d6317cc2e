"""FrozenLake as a multi-turn text task, on gymnasium's FrozenLake-v1 dynamics."""

from __future__ import annotations

from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv, generate_random_map

from twofold.config import FrozenLakeOptions, check_ranges
from twofold.envs.base import GridMoveEnv, bfs_moves, register


def solve_lake(desc: list[str], start: tuple[int, int]) -> list[int] | None:
    """Shortest move sequence (BFS) from `start` to G that never enters H, ignoring slipperiness."""
    n_rows, n_cols = len(desc), len(desc[0])

    def successors(cell):
        r, c = cell
        for move, (dr, dc) in GridMoveEnv.DELTAS.items():
            nr, nc = min(max(r + dr, 0), n_rows - 1), min(max(c + dc, 0), n_cols - 1)
            if desc[nr][nc] != "H":
                yield move, (nr, nc)

    return bfs_moves(start, lambda cell: desc[cell[0]][cell[1]] == "G", successors)


@register("frozenlake")
class FrozenLake(GridMoveEnv):
    system_prompt = (
        "You walk on a frozen lake. P is you, G the goal, H a hole, F safe ice. "
        "Reach G without stepping into an H. Each turn, answer with one move: "
        "<answer>Left</answer>, <answer>Down</answer>, <answer>Right</answer> or <answer>Up</answer>."
    )

    options_schema = FrozenLakeOptions

    def __init__(
        self,
        size: int = FrozenLakeOptions.size,
        frozen_prob: float = FrozenLakeOptions.frozen_prob,
        slippery: bool = FrozenLakeOptions.slippery,
        **kw,
    ):
        super().__init__(**kw)
        check_ranges(FrozenLakeOptions(size=size, frozen_prob=frozen_prob, slippery=slippery), "env.options.")
        self.size, self.frozen_prob, self.slippery = size, frozen_prob, slippery
        self.desc: list[str] = []

    def _reset(self, seed: int) -> str:
        self.desc = generate_random_map(self.size, self.frozen_prob, seed=seed)
        self.lake = FrozenLakeEnv(desc=self.desc, is_slippery=self.slippery)
        self.state, _ = self.lake.reset(seed=seed)
        return self.render()

    def set_map(self, desc: list[str]) -> str:
        """Start on a hand-made map (tests, custom level sets)."""
        self.desc = list(desc)
        self.lake = FrozenLakeEnv(desc=self.desc, is_slippery=self.slippery)
        self.state, _ = self.lake.reset(seed=0)
        self.turn, self.done = 0, False
        return self.render()

    @property
    def position(self) -> tuple[int, int]:
        return divmod(int(self.state), len(self.desc[0]))

    def _apply(self, action: int) -> tuple[str, float, bool, bool]:
        self.state, reward, terminated, truncated, _ = self.lake.step(action)
        r, c = self.position
        if self.desc[r][c] == "H":
            return f"You fell into a hole.\n{self.render()}", 0.0, True, False
        if reward > 0:
            return f"You reached the goal!\n{self.render()}", 1.0, True, True
        return self.render(), 0.0, bool(terminated or truncated), False

    def render(self) -> str:
        pr, pc = self.position
        rows = []
        for r, line in enumerate(self.desc):
            cells = ["P" if (r, c) == (pr, pc) else ("F" if ch == "S" else ch) for c, ch in enumerate(line)]
            rows.append(" ".join(cells))
        return "\n".join(rows)

    def solve(self) -> list[str] | None:
        path = solve_lake(self.desc, self.position)
        return None if path is None else [self.MOVES[m] for m in path]
