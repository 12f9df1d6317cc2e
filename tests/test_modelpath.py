"""`model.path` as a folder, a GGUF file or a Hub ID, each resolved to a local Hugging Face folder."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from twofold.config import ConfigError, load_config
from twofold.modelpath import resolve_model_source

COMMIT_MAIN, COMMIT_V1 = "a" * 40, "b" * 40


def hub_cache(home, tiny_path):
    """huggingface_hub's cache layout for `org/tiny`: two commits, `main` and the tag `v1`, laid out by hand."""
    repo = home / "hub" / "models--org--tiny"
    for commit, ref in ((COMMIT_MAIN, "main"), (COMMIT_V1, "v1")):
        shutil.copytree(tiny_path, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


def resolve_in_child(home, *sources: list[str]) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported: resolve in a fresh process (in `home`), as
    a run would. Each source is [ID] or [ID, revision]; the child prints one resolved path per line."""
    code = (
        "import json, sys; from twofold.modelpath import resolve_model_source\n"
        "for source in json.loads(sys.argv[1]): print(resolve_model_source(*source))"
    )
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", code, json.dumps(sources)]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, cwd=home)


def test_a_folder_is_used_as_it_is(tiny_path):
    assert resolve_model_source(str(tiny_path)) == tiny_path


def test_a_hub_id_resolves_to_its_cached_snapshot_at_a_revision(tmp_path, tiny_path):
    repo = hub_cache(tmp_path, tiny_path)
    resolved = resolve_in_child(tmp_path, ["org/tiny"], ["org/tiny", "v1"])
    assert resolved.returncode == 0, resolved.stderr
    assert resolved.stdout.splitlines() == [str(repo / "snapshots" / COMMIT_MAIN), str(repo / "snapshots" / COMMIT_V1)]


def test_an_uncached_hub_id_offline_says_how_to_fetch_it(tmp_path):
    missing = resolve_in_child(tmp_path, ["Qwen/Qwen2.5-0.5B-Instruct"])
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert "config field 'model.path'" in last and "HF_HUB_OFFLINE" in last
    assert "`hf download Qwen/Qwen2.5-0.5B-Instruct`" in last
    # a mistyped relative folder looks like a Hub ID: the line says which folder was looked for too
    assert f"is no local folder ({tmp_path / 'Qwen' / 'Qwen2.5-0.5B-Instruct'})" in last


def test_model_path_is_checked_at_load(tmp_path, tiny_path):
    assert load_config(None, [f"model.path={tiny_path}", "model.warmstart=false"]).model.path == str(tiny_path)
    assert load_config(None, ["model.path=org/name", "model.warmstart=false"]).model.revision == ""
    with pytest.raises(ConfigError, match="model.path.*no folder or .gguf file"):
        load_config(None, [f"model.path={tmp_path / 'absent.gguf'}", "model.warmstart=false"])
    with pytest.raises(ConfigError, match="model.path.*neither a folder"):
        resolve_model_source(str(tmp_path / "a" / "b" / "c"))


CONFIG_CODE = """from transformers import Qwen2Config


class CustomConfig(Qwen2Config):
    model_type = "twofold-custom"
"""
MODEL_CODE = """from transformers import Qwen2ForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(Qwen2ForCausalLM):
    config_class = CustomConfig
"""
LOAD_IN_CHILD = """
import sys
from twofold.config import ConfigError, load_config
from twofold.engine import make_engine
from twofold.engine.base import GenerationRequest, SamplingParams
from twofold.models import load_policy, load_tokenizer
from twofold.pipeline.resolve import resolve_model_path

for trust in sys.argv[2:]:  # one line each
    overrides = [f"model.path={sys.argv[1]}", "model.warmstart=false", f"model.trust_remote_code={trust}"]
    cfg = load_config(None, overrides)
    try:
        path = resolve_model_path(cfg)
    except ConfigError as e:
        print("refused:", e)
        continue
    policy, tokenizer = load_policy(path, cfg.model), load_tokenizer(path)
    engine = make_engine(cfg.engine, path, tokenizer)
    out = engine.generate([GenerationRequest(0, [1, 2, 3], SamplingParams(max_new_tokens=2))])[0]
    print(type(policy).__name__, type(engine.model).__name__, len(out.output_ids))
"""


def test_a_model_with_its_own_code_runs_only_when_trusted(tmp_path, tiny_path):
    """A folder whose config.json maps the Auto classes to its own files: refused by default, naming the key;
    trusted, its classes load the policy, the tokenizer and the engine, with no other flag."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_path, folder)
    (folder / "configuration_custom.py").write_text(CONFIG_CODE)
    (folder / "modeling_custom.py").write_text(MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "twofold-custom"
    config["architectures"] = ["CustomForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))

    # refused, then trusted: one fresh process, as a run is
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    args = [sys.executable, "-c", LOAD_IN_CHILD, str(folder), "false", "true"]
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    refused, trusted = done.stdout.strip().splitlines()
    assert (
        refused.startswith("refused: config field 'model.trust_remote_code'")
        and "modeling_custom.CustomForCausalLM" in refused
    )
    assert trusted == "CustomForCausalLM CustomForCausalLM 2"
