"""`env.name: dataset`: users' own files in verl's and TRL's layouts, splits, tools, a training run (rewards:
test_rewards.py)."""

import json
import logging

import pytest
from conftest import small_config

from twofold.config import DATASET_EXAMPLES, ConfigError
from twofold.envs import make_env
from twofold.envs.dataset import EXAMPLE_TASKS, larger_number_problems, split_rows, write_example
from twofold.envs.seeding import EVAL_SEED_OFFSET, level_seed
from twofold.envs.tools import format_call
from twofold.models import load_tokenizer
from twofold.pipeline import resolve
from twofold.pipeline.resolve import resolve_model_path
from twofold.rollout.chat import first_prompt_ids


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    out = {
        "verl": write_example(root / "verl.parquet", "verl", n=60),
        "trl": write_example(root / "trl.jsonl", "trl", n=60),
    }
    # TRL's conversational form: messages, with the answer in its own column
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(20)]
    (root / "chat").mkdir()
    (root / "chat" / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (root / "chat" / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    out["chat"] = root / "chat"
    return out


def env(path, **options):
    return make_env("dataset", max_turns=options.pop("max_turns", 1), options={"path": str(path), **options})


@pytest.mark.parametrize("name,layout", [("verl", "verl"), ("trl", "trl"), ("chat", "trl")])
def test_each_layout_is_detected_and_scored(files, name, layout):
    e = env(files[name])
    obs = e.reset(level_seed(0, 3))
    assert e.layout == layout and obs == e.first_messages(obs)[-1]["content"]
    assert e.first_messages(obs)[-1]["role"] == "user"
    _, reward, done, info = e.step(f"Let me think. <answer>{e.ground_truth}</answer>")
    assert (reward, done, info["success"], info["format_ok"]) == (1.0, True, True, True)


def test_a_glob_and_a_folder_of_files_read_the_same_rows(files):
    folder, glob = env(files["chat"]), env(str(files["chat"] / "part-*.jsonl"))
    assert len(folder.rows) == len(glob.rows) == 20


def test_missing_columns_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "label": "2"}) + "\n")
    with pytest.raises(ConfigError, match="env.options.layout.*columns \\['question', 'label'\\].*solution") as e:
        env(bad)
    assert e.value.field == "env.options.layout"
    verl_without_truth = tmp_path / "v.jsonl"
    verl_without_truth.write_text(json.dumps({"prompt": [{"role": "user", "content": "?"}], "reward_model": {}}) + "\n")
    with pytest.raises(ConfigError, match="reward_model.ground_truth"):
        env(verl_without_truth)
    with pytest.raises(ConfigError, match="env.options.path"):
        env(tmp_path / "nothing-here-*.parquet")


def test_gsm8k_columns_and_csv_files_read_as_they_come(tmp_path):
    """GSM8K's own columns: `question` is the prompt and the `answer` column's worked solution ends in "#### 72",
    whose 72 is the ground truth. A CSV file reads like the others; its integer answers are compared as text."""
    gsm8k = tmp_path / "gsm8k.jsonl"
    solution = "She sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"
    gsm8k.write_text(json.dumps({"question": "How many clips?", "answer": solution}) + "\n")
    e = env(gsm8k)
    e.reset(level_seed(0, 0))
    assert (e.layout, e.ground_truth, e.first_messages("")[-1]["content"]) == ("trl", "72", "How many clips?")
    assert e.step("<answer>72</answer>")[1] == 1.0
    # "####" only on the last line is GSM8K's final answer; a markdown heading inside a solution is not
    steps = tmp_path / "steps.jsonl"
    steps.write_text(
        json.dumps({"prompt": "Show it.", "solution": "#### Step 1\nx = 2\n\n#### Step 2\nx + 1 = 3."}) + "\n"
    )
    e = env(steps)
    e.reset(level_seed(0, 0))
    assert e.ground_truth == "#### Step 1\nx = 2\n\n#### Step 2\nx + 1 = 3."
    # a row whose prompt column is empty takes the next prompt column it has
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": None, "question": "How many?", "answer": "3"}) + "\n")
    e = env(mixed)
    assert e.first_messages(e.reset(level_seed(0, 0)))[-1]["content"] == "How many?"
    # CSV cells are text as written: not 7, 3.1 or 5.0
    table = tmp_path / "sums.csv"
    table.write_text("prompt,answer\nWhat is 2 + 5?,007\nWhat is 3 + 0.10?,3.10\nWhat is 2 + 3?,5\n")
    e = env(table, eval_fraction=0.0)
    assert sorted(r["answer"] for r in e.rows) == ["007", "3.10", "5"]
    e.reset(level_seed(0, 0))
    assert e.step(f"<answer>{e.ground_truth}</answer>")[1] == 1.0 and e.ground_truth in ("007", "3.10", "5")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", "", "has no rows"),
        ("notes.txt", "hello\n", "no .jsonl, .json, .parquet or .csv file"),
        ("broken.jsonl", '{"prompt": "1+1?", "answer": "2"}\n{"prompt": \n', "not readable as json"),
        ("broken.parquet", "PAR1 not really", "not readable as parquet"),
        ("blank.csv", "prompt,answer\nWhat is 1 + 1?,2\nWhat is 2 + 2?,\n", "row 1 of .* none of the answer columns"),
    ],
)
def test_files_that_cannot_be_read_are_named_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message) as e:
        env(tmp_path / name)
    assert e.value.field == "env.options.path"


def test_a_reply_without_a_final_answer_costs_the_format_penalty(files):
    e = env(files["verl"], max_turns=2)
    e.reset(level_seed(0, 0))
    obs, reward, done, info = e.step("I am not sure.")
    assert reward == e.format_penalty and not done and not info["format_ok"] and "no final answer" in obs


def test_splits_are_disjoint_and_epochs_reshuffle(files):
    train, held = split_rows(60, 0.1)
    assert len(held) == 6 and not set(train) & set(held) and len(train) + len(held) == 60
    e = env(files["verl"])

    def rows(seed, ks):
        out = []
        for k in ks:
            e.reset(level_seed(seed, k))
            out.append(e.rows.index(e.row))
        return out

    epoch0, epoch1 = rows(0, range(54)), rows(0, range(54, 108))
    assert sorted(epoch0) == sorted(epoch1) == list(train)  # every train row once per epoch
    assert epoch0 != epoch1  # in another order
    assert rows(0, range(10)) == epoch0[:10] and rows(1, range(10)) != epoch0[:10]  # by seed, repeatably
    assert set(rows(EVAL_SEED_OFFSET, range(12))) == set(held)  # `twofold eval`'s levels: the held-out rows


def lookup_population(city: str) -> str:
    """Look up a city's population.

    Args:
        city: The city's name.
    """
    return {"Oslo": "709000", "Lima": "10000000"}.get(city, "unknown")


def test_a_dataset_with_tools_runs_native_tool_calls(tmp_path):
    path = tmp_path / "cities.jsonl"
    path.write_text(json.dumps({"prompt": "How many people live in Oslo?", "answer": "709000"}) + "\n")
    e = env(path, max_turns=3, tools=["test_dataset:lookup_population"], eval_fraction=0.0)
    e.reset(level_seed(0, 0))
    assert [s["function"]["name"] for s in e.tool_schemas] == ["lookup_population"]
    obs, reward, done, info = e.step(format_call("lookup_population", {"city": "Oslo"}))
    assert info["messages"] == [{"role": "tool", "content": "709000"}] and not done
    _, reward, done, _ = e.step("<answer>709000</answer>")
    assert (reward, done) == (1.0, True)
    assert env(files_of(tmp_path)).tool_schemas is None  # without tools the prompt stays plain


def test_a_budget_the_first_prompt_fills_is_refused_before_any_warm_start(tmp_path, tiny_path, caplog, monkeypatch):
    """The tool schemas in the system prompt outgrow a single-turn budget: with no room for a reply every episode
    would end at one token with the format penalty. The check names the field and the budget a reply needs; in
    this 3-turn env a budget with room for less than two replies warns (an episode cut before its second reply
    ends unscored). Commands that only read a run (export, plan) do not check; the tiny model is checked before
    its warm start is built."""
    path = tmp_path / "cities.jsonl"
    path.write_text(json.dumps({"prompt": "How many people live in Oslo?", "answer": "709000"}) + "\n")
    options = {"path": str(path), "tools": ["test_dataset:lookup_population"], "eval_fraction": 0.0}
    e = env(path, max_turns=3, **{k: v for k, v in options.items() if k != "path"})
    prompt = len(first_prompt_ids(load_tokenizer(tiny_path), e, e.reset(level_seed(0, 0))))
    assert prompt > 100  # the schema alone is longer than the question

    def cfg(budget, **more):
        return small_config(
            **{"model.path": str(tiny_path), "env.name": "dataset", "env.max_turns": 3, "env.options": options}
            | {"rollout.max_total_tokens": budget, "engine.max_new_tokens": 8}
            | more
        )

    full = f"first prompt alone .* is {prompt} tokens.* at least {prompt + 8} .*3-turn episode needs room"
    with pytest.raises(ConfigError, match=full):
        resolve_model_path(cfg(prompt), check_budget=True)
    assert resolve_model_path(cfg(prompt)) == tiny_path  # not asked to check: export and plan only read the run
    with caplog.at_level(logging.WARNING, logger="twofold.pipeline.resolve"):
        assert resolve_model_path(cfg(prompt + 15), check_budget=True) == tiny_path
    assert f"leaves 15 tokens after the env's first prompt ({prompt} tokens), less than 2 replies" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twofold.pipeline.resolve"):
        resolve_model_path(cfg(prompt + 16), check_budget=True)
    assert caplog.text == ""

    def no_warm_start(*args, **kwargs):
        raise AssertionError("the warm start was built before the budget was checked")

    monkeypatch.setattr(resolve, "ensure_warmstart", no_warm_start)
    with pytest.raises(ConfigError, match="first prompt alone"):
        resolve_model_path(cfg(200, **{"model.path": "", "model.warmstart": True}), check_budget=True)


def files_of(tmp_path):
    return write_example(tmp_path / "plain.jsonl", "trl", n=10)


def test_training_on_a_dataset(tmp_path, files):
    from twofold.pipeline.loop import Pipeline
    from twofold.pipeline.rundir import read_metrics

    cfg = small_config(
        mode="async",
        **{
            "env.name": "dataset",
            "env.max_turns": 1,
            "env.options": {"path": str(files["verl"])},
            "trainer.steps": 2,
            "advantage.estimator": "reinforce",
            "run.tensorboard": False,
        },
    )
    Pipeline(cfg, tmp_path / "run").run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["rollout/turns_mean"] == 1.0


def test_larger_number_example_asks_for_the_larger_of_two(tmp_path):
    assert set(EXAMPLE_TASKS) == set(DATASET_EXAMPLES)
    for question, answer in larger_number_problems(50, seed=3):
        a, b = (int(x) for x in question.removeprefix("Which number is larger, ").split("?")[0].split(" or "))
        assert a != b and answer == str(max(a, b))
    rows = [json.loads(line) for line in write_example(tmp_path / "l.jsonl", n=3, task="larger_number").open()]
    assert rows[0]["data_source"] == "twofold/larger_number"
    assert rows[0]["prompt"][0]["content"].endswith("Reply with only the number.")


def test_free_answers_are_read_whole_and_tagged_ones_need_their_tag(tmp_path):
    path = write_example(tmp_path / "l.jsonl", n=20, task="larger_number")
    free = env(path, reward="math", answer="free")
    free.reset(level_seed(0, 0))
    reply = f"The larger number is {free.ground_truth}."
    assert free.parse_reply(reply)[0] == ("answer", reply)
    tagged = env(path, reward="math")
    tagged.reset(level_seed(0, 0))
    assert tagged.parse_reply(reply)[0] is None  # no <answer>: a format error
    with pytest.raises(ConfigError, match="env.options.answer"):
        env(path, answer="loose")
