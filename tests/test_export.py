"""`twofold export`: a run's checkpoint as a Hugging Face folder whose log-probs are the trainer's."""

import json
import shutil

import pytest
import torch
from conftest import small_config
from peft import AutoPeftModelForCausalLM
from torch.distributed.checkpoint.api import CheckpointException
from transformers import AutoModelForCausalLM, AutoTokenizer

from twofold.cli import main
from twofold.config import load_config
from twofold.logprobs import policy_logprobs
from twofold.models import save_random_model
from twofold.pipeline.export import EXPORT_INFO, export_run
from twofold.pipeline.loop import Pipeline
from twofold.pipeline.resolve import recorded_model_path
from twofold.pipeline.rundir import EXPORT_CONFIG, MODEL_FOLDER

SEQUENCES = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7], [11, 12, 13, 14, 15, 16, 17, 18]])


def logprobs(model) -> torch.Tensor:
    with torch.no_grad():
        return policy_logprobs(model.eval(), SEQUENCES, torch.ones_like(SEQUENCES))


def train(tmp_path, tiny_path, **overrides):
    """Two async steps (discounted returns, so the weights move); the trainer's log-probs after the last."""
    cfg = small_config(mode="async", **{"advantage.estimator": "discounted", "run.keep_checkpoints": 3, **overrides})
    pipe = Pipeline(cfg, tmp_path / "run", model_path=tiny_path)
    pipe.run()
    return tmp_path / "run", logprobs(pipe.trainer.model)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_path):
    return train(tmp_path_factory.mktemp("full"), tiny_path, **{"model.path": str(tiny_path)})


def test_exported_model_scores_as_the_trainer_did(full_run, tmp_path, tiny_path):
    run_dir, trainer_logprobs = full_run
    out = export_run(run_dir, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logprobs(model) - trainer_logprobs).abs().max() <= 1e-6
    assert (logprobs(AutoModelForCausalLM.from_pretrained(tiny_path)) - trainer_logprobs).abs().max() > 1e-4
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and model.generation_config.eos_token_id == tokenizer.eos_token_id
    info = json.loads((out / EXPORT_INFO).read_text())
    assert (info["step"], info["version"], info["contents"]) == (2, 2, "full model")


def test_an_earlier_step_exports_its_own_weights(full_run, tmp_path):
    run_dir, trainer_logprobs = full_run
    out = export_run(run_dir, tmp_path / "step1", step=1)
    assert json.loads((out / EXPORT_INFO).read_text())["step"] == 1
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logprobs(model) - trainer_logprobs).abs().max() > 1e-4


def test_export_loads_the_folder_the_run_recorded_not_model_path_resolved_again(full_run, tmp_path, tiny_path):
    # From another working folder, model.path can resolve elsewhere (the packaged SmolLM2 into another .cache/,
    # the tiny model built and warm-started anew): the run's record of its folder is what export loads.
    run_dir, trainer_logprobs = full_run
    assert (run_dir / MODEL_FOLDER).read_text().strip() == str(load_config(run_dir / "config.yaml").model.path)
    moved = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("run.lock"))
    # here model.path now names a model of another shape, into which the checkpoint cannot load
    other = save_random_model(tmp_path / "other", vocab_size=256, hidden_size=32, num_layers=1, num_heads=2)
    config = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(config.replace(load_config(moved / "config.yaml").model.path, str(other)))
    out = export_run(moved, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logprobs(model) - trainer_logprobs).abs().max() <= 1e-6
    # a resume that overrides model.path means another model: the record is not used
    recorded = (moved / MODEL_FOLDER).read_text().strip()
    assert str(recorded_model_path(moved, load_config(moved / "config.yaml"))) == recorded
    assert recorded_model_path(moved, load_config(moved / "config.yaml", [f"model.path={tiny_path}"])) is None
    (moved / MODEL_FOLDER).write_text(f"{tmp_path / 'gone'}\n")  # a record whose folder is gone: resolved again
    with pytest.raises(CheckpointException, match="Size mismatch"):
        export_run(moved, tmp_path / "out2")


def test_export_refuses_a_used_folder_a_missing_step_and_a_folder_that_is_no_run(full_run, tmp_path):
    run_dir, _ = full_run
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_run(run_dir, tmp_path / "used")
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match=r"step 7 .* kept steps: 1, 2"):
        export_run(run_dir, tmp_path / "none", step=7)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        export_run(tmp_path / "used", tmp_path / "none")


def test_lora_exports_adapters_and_merged_weights(tmp_path, tiny_path, monkeypatch):
    """The run names its model relative to where it started; the adapters name their base absolutely, so they
    load from anywhere (peft reads the base from `adapter_config.json`)."""
    monkeypatch.chdir(tiny_path.parent)
    run_dir, trainer_logprobs = train(tmp_path, tiny_path, **{"model.path": tiny_path.name, "model.lora.r": 4})
    adapters = export_run(run_dir, tmp_path / "adapters")
    assert (adapters / "adapter_config.json").is_file() and not (adapters / "model.safetensors").exists()
    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(adapters, dtype=torch.float32)
    assert (logprobs(model) - trainer_logprobs).abs().max() <= 1e-6
    merged = export_run(run_dir, tmp_path / "merged", merge=True)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert (logprobs(model) - trainer_logprobs).abs().max() <= 1e-5  # W + s B A rounds once per weight
    assert json.loads((merged / EXPORT_INFO).read_text())["contents"] == "merged lora"


def test_the_cli_exports_and_evaluates_the_exported_model(full_run, tmp_path, capsys):
    run_dir, _ = full_run
    assert main(["export", str(run_dir), str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert main(["export", str(run_dir), str(tmp_path / "cli")]) == 2  # the folder is used now
    assert "not empty" in capsys.readouterr().err
    config = str(run_dir / "config.yaml")
    assert main(["eval", "--config", config, "--model", str(tmp_path / "cli"), "--episodes", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(tmp_path / "cli") and 0 <= report["success_rate"] <= 1
    assert report["config"] == config
    # without --config, on the config of the run it was exported from (its env, its reward), not the defaults:
    # the export's own copy, so that the folder can go anywhere
    moved = shutil.copytree(tmp_path / "cli", tmp_path / "elsewhere" / "model")
    assert main(["eval", "--model", str(moved), "--episodes", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == str(moved / EXPORT_CONFIG) and report["env"] == load_config(config).env.name
    assert (moved / EXPORT_CONFIG).read_text() == (run_dir / "config.yaml").read_text()
    # an export without the copy (made before it) whose run has gone: an error naming --config, not FrozenLake
    (moved / EXPORT_CONFIG).unlink()
    info = json.loads((moved / EXPORT_INFO).read_text())
    (moved / EXPORT_INFO).write_text(json.dumps({**info, "run_dir": str(tmp_path / "gone")}))
    assert main(["eval", "--model", str(moved), "--episodes", "4"]) == 2
    assert "--config" in capsys.readouterr().err


def test_export_final_writes_the_export_at_the_end_of_a_run(tmp_path, tiny_path):
    cfg = small_config(**{"model.path": str(tiny_path), "run.export_final": True, "trainer.steps": 1})
    Pipeline(cfg, tmp_path / "run", model_path=tiny_path).run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["export"] == str(tmp_path / "run" / "export")
    assert json.loads((tmp_path / "run" / "export" / EXPORT_INFO).read_text())["step"] == 1
