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


def resolve_in_child(home, *sources: list[str]) -> list[str]:
    """huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported: resolve in a fresh process (in `home`), as
    a run would. Each source is [ID] or [ID, revision]; one line back per source: the resolved path, or the
    config error a run would stop with."""
    code = (
        "import json, sys; from twofold.config import ConfigError; from twofold.modelpath import resolve_model_source\n"
        "for source in json.loads(sys.argv[1]):\n"
        "    try: print(resolve_model_source(*source))\n"
        "    except ConfigError as e: print(f'ConfigError: {e}')"
    )
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", code, json.dumps(sources)]
    child = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, cwd=home)
    assert child.returncode == 0, child.stderr
    return child.stdout.splitlines()


def test_a_folder_is_used_as_it_is(tiny_path):
    assert resolve_model_source(str(tiny_path)) == tiny_path


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory, tiny_path):
    """One child (one interpreter's imports) resolves every Hub ID of the tests below, in a cache that holds
    `org/tiny` only: (its repo folder, the home the child ran in, {source: the line it printed})."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = hub_cache(home, tiny_path)
    sources = [["org/tiny"], ["org/tiny", "v1"], ["Qwen/Qwen2.5-0.5B-Instruct"]]
    return repo, home, dict(zip(map(tuple, sources), resolve_in_child(home, *sources), strict=True))


def test_a_hub_id_resolves_to_its_cached_snapshot_at_a_revision(offline_hub):
    repo, _, resolved = offline_hub
    assert resolved["org/tiny",] == str(repo / "snapshots" / COMMIT_MAIN)
    assert resolved["org/tiny", "v1"] == str(repo / "snapshots" / COMMIT_V1)


def test_an_uncached_hub_id_offline_says_how_to_fetch_it(offline_hub):
    _, home, resolved = offline_hub
    line = resolved["Qwen/Qwen2.5-0.5B-Instruct",]
    assert line.startswith("ConfigError: config field 'model.path'") and "HF_HUB_OFFLINE" in line
    assert "`hf download Qwen/Qwen2.5-0.5B-Instruct`" in line
    # a mistyped relative folder looks like a Hub ID: the line says which folder was looked for too
    assert f"is no local folder ({home / 'Qwen' / 'Qwen2.5-0.5B-Instruct'})" in line


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
