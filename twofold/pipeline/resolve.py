"""Model resolution: which checkpoint a run starts from."""

from __future__ import annotations

import logging
from pathlib import Path

from twofold.config import Config, ConfigError, load_config, with_absolute_paths
from twofold.envs import env_from_config, tokenizer_corpus
from twofold.envs.seeding import level_seed
from twofold.modelpath import allow_model_code, resolve_model_source
from twofold.models import ensure_tiny_model, load_tokenizer
from twofold.pipeline.rundir import MODEL_FOLDER
from twofold.rollout.chat import first_prompt_ids
from twofold.trainer.warmstart import ensure_warmstart

log = logging.getLogger(__name__)


def resolve_model_path(
    cfg: Config, progress: bool = True, *, check_budget: bool = False, run_dir: Path | None = None
) -> Path:
    """The local folder of the model to start from: for a run being resumed or exported (`run_dir`), the folder it
    recorded (`recorded_model_path`); else `model.path` (a folder, a GGUF file or a Hub ID), else the tiny model
    (warm-started when configured). `check_budget`, for the commands that run episodes on this machine: refuse a
    token budget the env's first prompt fills (`check_first_prompt_fits`), before any warm start."""
    recorded = recorded_model_path(run_dir, cfg)
    if recorded is not None:
        if check_budget:
            check_first_prompt_fits(cfg, recorded)
        return recorded
    if cfg.model.path:
        folder = resolve_model_source(cfg.model.path, cfg.model.revision)
        allow_model_code(folder, cfg.model.trust_remote_code)
        if check_budget:
            check_first_prompt_fits(cfg, folder)
        return folder
    base = ensure_tiny_model(cfg.model, tokenizer_corpus(cfg.env))
    if check_budget:
        check_first_prompt_fits(cfg, base)  # before a warm start, which can take minutes
    if not cfg.model.warmstart:
        return base
    return ensure_warmstart(cfg, base, progress=progress)


def recorded_model_path(run_dir: Path | None, cfg: Config) -> Path | None:
    """The folder a run's model was loaded from, as the run recorded it (`MODEL_FOLDER`), when it is still there
    and `cfg` names the same model as the run's config.yaml (a resume that overrides `model.path` or
    `model.revision` resolves the new one); None otherwise. Resuming and exporting load it rather than resolve
    `model.path` again, which from another working folder (another `.cache/`) would convert a GGUF file or build
    and warm-start the tiny model anew. A model that brings its own code is allowed (or refused) as on resolving."""
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is None or not (run_dir / MODEL_FOLDER).is_file() or not (run_dir / "config.yaml").is_file():
        return None
    started = load_config(run_dir / "config.yaml").model
    if (started.path, started.revision) != (with_absolute_paths(cfg).model.path, cfg.model.revision):
        return None
    folder = Path((run_dir / MODEL_FOLDER).read_text().strip())
    if not (folder / "config.json").is_file():
        return None
    allow_model_code(folder, cfg.model.trust_remote_code)
    return folder


def check_first_prompt_fits(cfg: Config, folder: Path) -> None:
    """Refuse a token budget that the env's first prompt (the first level's) fills: every reply would be cut to one
    token and every episode score the format penalty, with nothing else to say why. Warn where it leaves room for
    less than one reply of `engine.max_new_tokens`, or, in a multi-turn env, for less than two (a second reply
    follows an observation, and an episode cut before it ends unscored). The system prompt listing tool schemas
    is what usually outgrows a budget set for a single turn."""
    env = env_from_config(cfg.env)
    prompt = len(first_prompt_ids(load_tokenizer(folder), env, env.reset(level_seed(cfg.seed, 0))))
    budget, reply, turns = cfg.rollout.max_total_tokens, cfg.engine.max_new_tokens, cfg.env.max_turns
    each_turn = "" if turns == 1 else f"; a {turns}-turn episode needs room for each turn's reply and observation too"
    if prompt >= budget:
        raise ConfigError(
            "rollout.max_total_tokens",
            f"{budget}, but the env's first prompt alone (system prompt, tool schemas, first observation) is "
            f"{prompt} tokens, so no reply fits: raise it to at least {prompt + reply} "
            f"(the prompt and one reply of engine.max_new_tokens={reply}){each_turn}",
        )
    replies = min(turns, 2)
    if budget - prompt < replies * reply:
        log.warning(
            "rollout.max_total_tokens=%d leaves %d tokens after the env's first prompt (%d tokens), less than %d "
            "replies of engine.max_new_tokens=%d: replies are cut there%s",
            budget,
            budget - prompt,
            prompt,
            replies,
            reply,
            each_turn,
        )
