"""`env.name: dataset`: train on your own prompts and answers (JSONL, Parquet or CSV), single-turn or with tools.

    env:
      name: dataset
      max_turns: 1                         # single-turn (RLVR); more with tools
      options:
        path: data/train.parquet           # a file, a folder or a glob, read with Hugging Face `datasets`
        layout: auto                       # or verl, trl (detected from the columns)
        reward: exact                      # or math, your own function, or a list (`twofold.envs.rewards`)
        reward_weights: null               # a list's weights, one per reward; null: each 1.0
        tools: [mypkg.tools:search]        # optional: native tool calls (`twofold.envs.tools`)
        eval_fraction: 0.1                 # rows held out for `twofold eval`

Layouts, as users already have them:
    verl   `prompt` (chat messages), `reward_model.ground_truth`, `data_source` (optional)
    trl    `prompt` (a string or chat messages), `messages` or `question` (GSM8K's), and `solution` / `answer` /
           `ground_truth`; a ground truth with GSM8K's `#### ...` line is that line's answer
The answer is read from `<answer>...</answer>`, `\\boxed{...}` or GSM8K's `#### ...` (exact and math
rewards); with only those rewards, a reply with none costs the format penalty. A reward function of your own
may have twofold's, verl's or TRL's signature (`twofold.envs.rewards`). Success means reward >=
`success_threshold`.

Rows: episode k of seed s draws from the train split (or the eval split, for `twofold eval`'s level seeds),
shuffled by seed and by epoch, so every source of a comparison sees the same rows in the same order.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twofold.config import DATASET_LAYOUTS, ConfigError, DatasetOptions, check_ranges
from twofold.envs.base import TextEnv, register
from twofold.envs.rewards import GSM8K, Sample, extract_answer, load_reward
from twofold.envs.seeding import split_of_level
from twofold.envs.tools import ToolEnv, load_tools

ANSWER_COLUMNS = ("ground_truth", "solution", "answer")
PROMPT_COLUMNS = ("prompt", "messages", "question")  # TRL's, and GSM8K's question/answer
# file suffix -> the Hugging Face `datasets` builder that reads it
READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _files(path: str) -> list[str]:
    p = Path(path)
    found = sorted(str(f) for f in p.iterdir()) if p.is_dir() else sorted(glob.glob(path))
    readable = [f for f in found if Path(f).suffix in READERS]
    if not readable:
        others = f" (found {', '.join(Path(f).name for f in found[:3])})" if found else ""
        raise ConfigError("env.options.path", f"no .jsonl, .json, .parquet or .csv file at {path!r}{others}")
    if not p.is_dir() and len(readable) < len(found):
        unread = [Path(f).name for f in found if Path(f).suffix not in READERS]
        raise ConfigError("env.options.path", f"cannot read {unread[:3]}: write JSONL, JSON, Parquet or CSV")
    if len({READERS[Path(f).suffix] for f in readable}) > 1:
        raise ConfigError("env.options.path", f"{path!r} mixes file formats; point at one kind")
    return readable


def detect_layout(columns: list[str]) -> str:
    if "prompt" in columns and "reward_model" in columns:
        return "verl"
    if any(c in columns for c in PROMPT_COLUMNS) and any(c in columns for c in ANSWER_COLUMNS):
        return "trl"
    raise ConfigError(
        "env.options.layout",
        f"cannot tell the layout from the columns {columns}: verl's needs "
        "prompt and reward_model (with ground_truth); TRL's needs prompt, messages or question, and solution, "
        "answer or ground_truth. Rename the columns to these (no option maps other names)",
    )


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def row_of(row: dict, layout: str) -> tuple[list[dict], str]:
    """(opening messages, ground truth) of one row in `layout`."""
    if layout == "verl":
        truth = (row.get("reward_model") or {}).get("ground_truth")
        if truth is None:
            raise ConfigError("env.options.path", "a verl row has no reward_model.ground_truth")
        return _as_messages(row["prompt"]), str(truth)
    messages = _as_messages(_prompt(row))
    truth = next((row[c] for c in ANSWER_COLUMNS if row.get(c) is not None), None)
    if truth is None and messages and messages[-1]["role"] == "assistant":  # an SFT-style conversation
        truth, messages = messages[-1]["content"], messages[:-1]
    if truth is None:
        raise ConfigError("env.options.path", f"a row has none of the answer columns {ANSWER_COLUMNS}")
    return messages, _final_answer(str(truth))


def _final_answer(truth: str) -> str:
    """GSM8K's answer column is the worked solution with "#### 72" as its last line: the truth is 72. Any other
    text (a "#### Step 2" heading inside a solution included) is the truth as it is."""
    lines = truth.strip().splitlines()
    final = GSM8K.match(lines[-1].strip()) if lines else None
    return final.group(1) if final else truth


def _prompt(row: dict):
    """The row's prompt: its first column of PROMPT_COLUMNS that has a value."""
    found = next((c for c in PROMPT_COLUMNS if row.get(c) is not None), None)
    if found is None:
        raise ConfigError("env.options.path", f"a row has none of the prompt columns {PROMPT_COLUMNS}")
    return row[found]


@functools.lru_cache(maxsize=8)
def load_rows(path: str, layout: str) -> tuple[str, tuple[dict, ...]]:
    """(the layout, every row as a dict), read once per process with Hugging Face `datasets`."""
    import datasets
    import pyarrow

    datasets.disable_progress_bars()  # one read per process; its bars would interleave with the run's
    files = _files(path)
    if all(Path(f).stat().st_size == 0 for f in files):
        raise ConfigError("env.options.path", f"{path!r} has no rows (empty file)")
    kind = READERS[Path(files[0]).suffix]
    try:
        # a CSV file's columns as text: the reader would otherwise guess types, and "007", "3.10" or a column of
        # integers with one blank cell would come back as 7, 3.1 or 5.0, no longer the ground truth written
        features = (
            datasets.Features({c: datasets.Value("string") for c in _csv_header(files[0])}) if kind == "csv" else None
        )
        data = datasets.load_dataset(kind, data_files=files, split="train", features=features)
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as e:  # the reader's own error
        raise ConfigError("env.options.path", f"{path!r} is not readable as {kind}: {e.__cause__ or e}") from e
    layout = detect_layout(data.column_names) if layout == "auto" else layout
    rows = tuple(data.to_list())
    if not rows:
        raise ConfigError("env.options.path", f"{path!r} has no rows")
    for i, row in enumerate(rows):  # a missing value is an error now, naming its row, not at some episode
        try:
            row_of(row, layout)
        except ConfigError as e:
            raise ConfigError(e.field, f"row {i} of {path!r}: {e.message}") from None
    return layout, rows


def _csv_header(file: str) -> list[str]:
    """The column names on a CSV file's first line."""
    with open(file, newline="") as f:
        return next(csv.reader(f), [])


def sample_of(row: dict, layout: str, completion: str = "") -> Sample:
    """What a reward reads of an episode on `row` that ended with `completion`."""
    messages, truth = row_of(row, layout)
    prompt = _prompt(row)
    return Sample(completion, truth, prompt if isinstance(prompt, str) else messages, row)


# An env is built for every episode, so what depends only on the data is computed once per process (a
# shuffle of a 1,000-row dataset took longer than the episode's own work on the peers' benchmark).
@functools.lru_cache(maxsize=8)
def split_rows(n: int, eval_fraction: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(train, eval) row indices: a fixed random eval share, the same on every run."""
    order = list(range(n))
    random.Random(0).shuffle(order)
    held = min(n - 1, math.ceil(n * eval_fraction)) if eval_fraction > 0 and n > 1 else 0
    return tuple(sorted(order[held:])), tuple(sorted(order[:held]))


@functools.lru_cache(maxsize=64)
def epoch_order(rows: tuple[int, ...], key: str) -> tuple[int, ...]:
    """`rows` shuffled by `key` (run seed, split and epoch): the order episodes draw them in."""
    order = list(rows)
    random.Random(key).shuffle(order)
    return tuple(order)


@register("dataset")
class DatasetEnv(ToolEnv, TextEnv):
    action_help = "Give the final answer in <answer>...</answer>."

    options_schema = DatasetOptions

    def __init__(
        self,
        path: str = DatasetOptions.path,
        layout: str = DatasetOptions.layout,
        reward: str | Sequence[str] = DatasetOptions.reward,
        reward_weights: Sequence[float] | None = DatasetOptions.reward_weights,
        answer: str = DatasetOptions.answer,
        tools: Sequence[str] = (),
        eval_fraction: float = DatasetOptions.eval_fraction,
        system_prompt: str = DatasetOptions.system_prompt,
        success_threshold: float = DatasetOptions.success_threshold,
        **kw,
    ):
        super().__init__(**kw)
        if not path:
            raise ConfigError("env.options.path", "the dataset env needs a file, folder or glob: env.options.path=...")
        if layout not in DATASET_LAYOUTS:
            raise ConfigError("env.options.layout", f"got {layout!r}; valid values: {', '.join(DATASET_LAYOUTS)}")
        check_ranges(DatasetOptions(eval_fraction=eval_fraction), "env.options.")
        self.layout, self.rows = load_rows(path, layout)
        self.splits = dict(zip(("train", "eval"), split_rows(len(self.rows), eval_fraction), strict=True))
        if answer not in ("tagged", "free"):
            raise ConfigError("env.options.answer", f"got {answer!r}; valid values: tagged, free")
        self.reward = load_reward(reward, reward_weights, sample_of(self.rows[0], self.layout))
        self.needs_final_answer = self.reward.needs_final_answer and answer == "tagged"
        self.tool_functions = load_tools(list(tools))
        self.system_prompt, self.success_threshold = system_prompt, success_threshold

    @classmethod
    def data_fingerprint(cls, options: dict) -> str | None:
        """SHA-256 of the data files' bytes: a warm start is rebuilt when the file at the same path changes."""
        digest = hashlib.sha256()
        for f in _files(options.get("path", "")):
            digest.update(Path(f).read_bytes())
        return digest.hexdigest()[:16]

    @property
    def tool_schemas(self) -> list[dict] | None:
        return self.toolbox.schemas if self.tool_functions else None

    def tools(self):
        return self.tool_functions

    def _reset(self, seed: int) -> str:
        split, run_seed, k = split_of_level(seed)
        rows = self.splits[split] or self.splits["train"]
        epoch, index = divmod(k, len(rows))
        self.row = self.rows[epoch_order(rows, f"{run_seed}-{split}-{epoch}")[index]]
        self.messages, self.ground_truth = row_of(self.row, self.layout)
        return self.messages[-1]["content"]

    def first_messages(self, observation: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages

    def render(self) -> str:
        return self.messages[-1]["content"]

    def parse_reply(self, text: str):
        if self.tool_functions:
            calls, why = self.toolbox.parse(text)
            if calls is None:
                return None, why
            if calls:
                return ("calls", calls), ""
        if self.needs_final_answer and extract_answer(text) is None:
            return None, "no final answer found: write it in <answer>...</answer> or \\boxed{...}"
        return ("answer", text), ""

    def _answer(self, completion: str) -> tuple[str, float, bool, bool]:
        reward = self.reward(sample_of(self.row, self.layout, completion))
        ok = reward >= self.success_threshold
        return ("Correct." if ok else "Not correct."), reward, True, ok

    def solve(self) -> list:
        return [self.ground_truth]

    def random_answer(self, rng) -> str:
        return row_of(self.rows[rng.randrange(len(self.rows))], self.layout)[1]


# --------------------------------------------------------------------------- an example dataset


def word_problems(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Arithmetic word problems with integer answers: (question, answer)."""
    rng = random.Random(seed)
    names, things = ("Ana", "Ben", "Cleo", "Dev", "Eva", "Finn"), ("apples", "books", "coins", "shells", "stamps")
    out = []
    for _ in range(n):
        name, thing = rng.choice(names), rng.choice(things)
        a, b = rng.randint(2, 40), rng.randint(2, 20)
        kind = rng.randrange(3)
        if kind == 0:
            out.append(
                (f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?", str(a + b))
            )
        elif kind == 1:
            out.append((f"{name} has {a + b} {thing} and gives {b} away. How many {thing} are left?", str(a)))
        else:
            out.append((f"{name} buys {b} boxes of {a} {thing}. How many {thing} is that?", str(a * b)))
    return out


def larger_number_problems(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Which of two numbers (1-99, distinct) is larger, asked the way an instruct model answers in a sentence or
    a bare number: (question, answer). Small instruct models get a share of these right from the start, so RL
    has a signal to work with."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(range(1, 100), 2)
        out.append((f"Which number is larger, {a} or {b}? Reply with only the number.", str(max(a, b))))
    return out


# `twofold dataset example --task` (config.DATASET_EXAMPLES): the problems, the instruction appended to each,
# and what they are.
EXAMPLE_TASKS = {
    "word_problems": (word_problems, " Answer in <answer>...</answer>.", "arithmetic word problems"),
    "larger_number": (larger_number_problems, "", "which-number-is-larger questions"),
}


def write_example(
    path: str | Path, layout: str = "verl", n: int = 500, seed: int = 0, task: str = "word_problems"
) -> Path:
    """An example task (`EXAMPLE_TASKS`) in verl's or TRL's layout, as JSONL (.jsonl) or Parquet (.parquet)."""
    problems, instruction, _ = EXAMPLE_TASKS[task]
    rows: list[dict[str, Any]] = []
    for i, (question, answer) in enumerate(problems(n, seed)):
        if layout == "verl":
            rows.append(
                {
                    "data_source": f"twofold/{task}",
                    "ability": "math",
                    "extra_info": {"index": i},
                    "prompt": [{"role": "user", "content": question + instruction}],
                    "reward_model": {"style": "rule", "ground_truth": answer},
                }
            )
        else:
            rows.append({"prompt": question + instruction, "solution": answer})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
