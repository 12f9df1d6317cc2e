"""Rewards of the dataset env: the built-ins, users' functions in twofold's, verl's and TRL's signatures, weighted
sums, errors at env construction, and math-verify from worker threads within a deadline."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import small_config

from twofold.cli import main
from twofold.config import ConfigError
from twofold.envs import make_env
from twofold.envs.dataset import write_example
from twofold.envs.rewards import MathVerifier, exact_reward, extract_answer, math_reward
from twofold.envs.seeding import level_seed

ROOT = Path(__file__).resolve().parents[1]

QUESTION = "What is 3 + 4?"
RIGHT = "<answer>7</answer>"  # 18 characters


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One row of the same question in verl's layout, TRL's conversational one and TRL's plain-text one."""
    root = tmp_path_factory.mktemp("rewards")
    rows = {
        "verl": {
            "data_source": "lab",
            "prompt": [{"role": "user", "content": QUESTION}],
            "reward_model": {"ground_truth": "7"},
            "extra_info": {"bonus": 0.5},
        },
        "chat": {"prompt": [{"role": "user", "content": QUESTION}], "solution": "7"},
        "plain": {"prompt": QUESTION, "solution": "7"},
    }
    for name, row in rows.items():
        (root / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    return {name: root / f"{name}.jsonl" for name in rows}


def env(path, **options):
    return make_env("dataset", max_turns=1, options={"path": str(path), "eval_fraction": 0.0, **options})


def step(path, reply=RIGHT, **options):
    """(reward, info) of one episode answered with `reply`."""
    e = env(path, **options)
    e.reset(level_seed(0, 0))
    _, reward, _, info = e.step(reply)
    return reward, info


# --------------------------------------------------------------------------- users' functions, as they write them


def own_reward(completion, ground_truth, solution, **row):
    """twofold's signature, reading a column by name: 1 for a row whose solution is the truth, a cent per character."""
    return float(solution == ground_truth) - 0.01 * len(completion)


def verl_float(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature returning a float: 1 for the truth in the reply, plus the lab's bonus from extra_info."""
    return float(ground_truth in solution_str) + (extra_info["bonus"] if data_source == "lab" else 0.0)


def verl_dict(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature returning a dict: its score is 0.25 + half for the truth in the reply."""
    return {"score": 0.25 + 0.5 * float(ground_truth in solution_str), "acc": ground_truth in solution_str}


def verl_bare(solution_str, ground_truth):
    """verl's built-in scorers (gsm8k.compute_score) name neither data_source nor extra_info."""
    return float(solution_str.endswith(f"{ground_truth}</answer>"))


def trl_accuracy(completions, solution, prompts, **kwargs):
    """TRL's signature on conversational data: each completion is a list of one assistant message."""
    assert prompts == [[{"role": "user", "content": QUESTION}]]
    return [float(c[0]["content"] == f"<answer>{s}</answer>") for c, s in zip(completions, solution, strict=True)]


def trl_length(completions, **kwargs):
    """TRL's signature on plain-text data: each completion is the reply's text; a hundredth per character."""
    return [len(c) / 100 for c in completions]


def trl_not_applicable(completions, **kwargs):
    """TRL's None: this reward does not apply to the sample."""
    return [None for _ in completions]


def half(completion, ground_truth, **row):
    return 0.5


@pytest.mark.parametrize(
    "layout,reward,expected",
    [
        ("plain", "test_rewards:own_reward", 0.82),  # 1 (solution == truth) - 0.01 * 18 characters
        ("verl", "test_rewards:verl_float", 1.5),  # 1 (7 is in the reply) + 0.5 (the lab's bonus)
        ("verl", "test_rewards:verl_dict", 0.75),  # 0.25 + 0.5 * 1
        ("verl", "test_rewards:verl_bare", 1.0),
        ("chat", "test_rewards:trl_accuracy", 1.0),  # completions == [[{"role": "assistant", "content": RIGHT}]]
        ("plain", "test_rewards:trl_length", 0.18),  # completions == [RIGHT]: 18 characters / 100
        ("chat", "test_rewards:trl_not_applicable", 0.0),
    ],
)
def test_a_reward_function_is_called_in_its_own_signature(data, layout, reward, expected):
    assert step(data[layout], reward=reward)[0] == pytest.approx(expected)


def test_a_list_of_rewards_is_their_weighted_sum(data):
    weighted = {"reward": ["exact", "test_rewards:half"], "reward_weights": [1.0, 0.2]}
    assert step(data["plain"], **weighted)[0] == pytest.approx(1.1)  # 1.0 * 1 + 0.2 * 0.5
    assert step(data["plain"], reward=["exact", "test_rewards:half"])[0] == pytest.approx(1.5)  # weights of 1
    # With a function of your own in the list every reply is scored, one without a final answer too ...
    reward, info = step(data["plain"], reply="seven", **weighted)
    assert reward == pytest.approx(0.1) and info["format_ok"]  # 1.0 * 0 + 0.2 * 0.5
    # ... while the built-in rewards alone need one to grade: without it, the format penalty.
    reward, info = step(data["plain"], reply="seven", reward=["exact", "math"])
    assert reward == -0.1 and not info["format_ok"]


def trl_scalar(completions, **kwargs):
    """A TRL-signature function that returns one float instead of a list of them."""
    return 1.0


def verl_dict_without_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}


@pytest.mark.parametrize(
    "layout,reward,says",
    [
        ("chat", "test_rewards:trl_scalar", "TRL signature): TRL's reward_funcs return a list of one score per "
         "completion (one here); got a float"),
        ("verl", "test_rewards:verl_dict_without_score", "verl signature): 'score'"),
    ],
)  # fmt: skip
def test_a_result_of_the_wrong_shape_names_the_function_and_what_its_signature_returns(data, layout, reward, says):
    with pytest.raises(TypeError) as e:
        step(data[layout], reward=reward)
    assert str(e.value) == f"env.options.reward {reward} ({says}"


def bad_signature(text):
    return 1.0


def verl_needs_secret(data_source, solution_str, ground_truth, secret):
    return 1.0


def trl_needs_ids(prompts, completions, completion_ids, **kwargs):
    return [1.0]


def trl_with_ids_default(prompts, completions, completion_ids=None, trainer_state=None, **kwargs):
    return [0.5]


@pytest.mark.parametrize(
    "options,field,says",
    [
        ({"reward": "test_rewards:bad_signature"}, "env.options.reward", "(text), read as twofold's signature"),
        ({"reward": "test_rewards:verl_needs_secret"}, "env.options.reward", "missing a required argument: 'secret'"),
        (
            {"reward": "test_rewards:trl_needs_ids"},
            "env.options.reward",
            "TRL's completion_ids are not passed: give them a default or take **kwargs",
        ),
        ({"reward": "no_such_module:f"}, "env.options.reward", "No module named 'no_such_module'"),
        ({"reward": "test_rewards:no_such_function"}, "env.options.reward", "no_such_function"),
        ({"reward": "maths"}, "env.options.reward", "got 'maths'"),
        ({"reward": ["math", "exact"], "reward_weights": [1.0]}, "env.options.reward_weights", "for 2 rewards"),
    ],
)
def test_a_reward_that_cannot_be_called_is_an_error_when_the_env_is_built(data, options, field, says):
    with pytest.raises(ConfigError) as e:
        env(data["verl"], **options)
    assert e.value.field == field and says in e.value.message and "\n" not in str(e.value)
    if field == "env.options.reward":  # the accepted forms, each named
        assert all(form in e.value.message for form in ("twofold's", "verl's compute_score(", "TRL's f(completions"))


def test_a_trl_function_with_defaults_for_what_twofold_does_not_pass_is_called(data):
    assert step(data["verl"], reward="test_rewards:trl_with_ids_default")[0] == 0.5


def test_twofold_train_refuses_a_reward_of_no_known_signature_before_any_model_loads(
    tmp_path, tiny_path, monkeypatch, capsys
):
    # The env workers build the env in their own threads (or actors), after the model has loaded; `train()`
    # builds it once first, so the user gets the one line, at once, not a failed worker minutes later.
    (tmp_path / "one_argument_rewards.py").write_text("def score(text):\n    return 1.0\n")
    monkeypatch.syspath_prepend(tmp_path)  # as PYTHONPATH would
    data = write_example(tmp_path / "data.jsonl", "verl", n=8)
    code = main(
        ["train", "--config", str(ROOT / "configs" / "dataset.yaml")]
        + [f"env.options.path={data}", "env.options.reward=one_argument_rewards:score", f"run.dir={tmp_path / 'run'}"]
        + [f"model.path={tiny_path}", "model.warmstart=false"]  # as with a real model: no warm start to build
    )
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.strip().count("\n") == 0 and "env.options.reward" in err and "(text)" in err
    assert not (tmp_path / "run").exists()  # no model loaded, nothing trained


# --------------------------------------------------------------------------- the built-ins, math from any thread


def test_final_answers_are_read_from_tags_boxes_and_gsm8k_lines():
    assert extract_answer("so <answer> 42 </answer>") == "42"
    assert extract_answer("thus \\boxed{\\frac{1}{2}} and done") == "\\frac{1}{2}"
    assert extract_answer("work...\n#### 1,024") == "1,024"
    assert extract_answer("no answer at all") is None
    # exact: spacing, case, a trailing period and thousands separators do not count
    assert (
        exact_reward("<answer>1,024.</answer>", "1024") == 1.0 and exact_reward("<answer>1025</answer>", "1024") == 0.0
    )


def test_math_is_checked_from_worker_threads():
    cases = [
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("<answer>0.25</answer>", "1/2", 0.0),
        ("so\n#### 12", "12", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),  # a bare LaTeX truth (MATH's form) is read as one expression
        ("<answer>3\\pi</answer>", "3\\pi", 1.0),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:  # math-verify's SIGALRM would raise ValueError here
        scores = list(pool.map(lambda case: math_reward(case[0], case[1]), cases))
    assert scores == [expected for _, _, expected in cases]


def test_a_math_check_that_never_ends_is_cut_at_its_deadline():
    # math-verify issue #65: parsing this runs for hours, past any SIGALRM
    tower = "\\dfrac{5^{\\left(5^{\\left(5^{\\left(5^5\\right)}\\right)} - 4\\right)} - 5}{16}"
    verifier = MathVerifier(deadline_s=1.0, processes=1)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(verifier.equal, f"${tower}$", "$1$").result(timeout=120) is False
            assert pool.submit(verifier.equal, "$1/2$", "$0.5$").result(timeout=120) is True  # a fresh process
    finally:
        verifier.close()
    assert not verifier.children


def test_training_with_math_counts_no_env_errors(tmp_path):
    from twofold.pipeline.loop import Pipeline
    from twofold.pipeline.rundir import read_metrics

    path = tmp_path / "sums.jsonl"
    rows = [{"prompt": f"What is {i} + 2?", "solution": str(i + 2)} for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # With a function of your own beside math, every reply of the untrained model is scored by math (in the
    # rollout's env threads), not only the rare one with a readable final answer: reward = math + 0.5.
    options = {"path": str(path), "reward": ["math", "test_rewards:half"], "eval_fraction": 0.0}
    cfg = small_config(
        mode="async",
        **{
            "env.name": "dataset",
            "env.max_turns": 1,
            "env.options": options,
            "trainer.steps": 1,
            "advantage.estimator": "reinforce",
            "run.tensorboard": False,
        },
    )
    Pipeline(cfg, tmp_path / "run").run()
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["rollout/env_errors"] == 0.0 and 0.5 <= row["reward/mean"] <= 1.5
