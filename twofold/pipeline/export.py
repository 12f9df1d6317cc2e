"""`twofold export RUN_DIR OUT`: a trained run as a Hugging Face folder that leaves twofold.

    OUT/config.json, model.safetensors     the trained weights (float32: the trainer's master weights)
    OUT/tokenizer*, chat_template.jinja    the run's tokenizer and chat template
    OUT/generation_config.json             eos and pad from the tokenizer
    OUT/twofold_export.json                which run, step and version it came from
    OUT/twofold_config.yaml                the run's config: `twofold eval --model OUT` scores the model on its
                                           task and reward wherever the folder goes, as long as the data file
                                           it names (an absolute path) and any reward module are there too

Under LoRA the folder holds the adapters (peft's `adapter_config.json`, `adapter_model.safetensors`) beside
the tokenizer, loadable with `PeftModel.from_pretrained(base, OUT)`; `merge=True` writes the merged weights
instead, a plain model. Any checkpoint exports, a sharded one included (DCP reshards on load).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from twofold.config import load_config
from twofold.models import is_lora, load_policy, load_tokenizer
from twofold.pipeline.checkpoint import RUN_STATE, checkpoint_at, load_model_weights
from twofold.pipeline.resolve import resolve_model_path
from twofold.pipeline.rundir import EXPORT_CONFIG, EXPORT_INFO


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, merge: bool = False) -> Path:
    """Write the weights of `run_dir`'s checkpoint of `step` (default: the newest) to `out` (see the module
    docstring). `out` must not exist yet, or be empty: nothing is overwritten."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; export into a new folder")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml): give the run.dir of a run")
    cfg = load_config(run_dir / "config.yaml")
    checkpoint = checkpoint_at(run_dir, step)
    # absolute: LoRA adapters name their base by it (peft's `base_model_name_or_path`), read from wherever they go
    model_path = resolve_model_path(cfg, progress=False, run_dir=run_dir).resolve()
    policy = load_policy(model_path, cfg.model)
    load_model_weights(policy, checkpoint)
    lora = is_lora(policy)
    model = policy.merge_and_unload() if lora and merge else policy
    tokenizer = load_tokenizer(model_path)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not (lora and not merge):  # a plain model: its generation config stops where the chat template does
        generation = model.generation_config
        generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        generation.save_pretrained(tmp)
    run_state = json.loads((checkpoint / RUN_STATE).read_text())
    info = {
        "run_dir": str(run_dir.resolve()),
        "checkpoint": checkpoint.name,
        "step": run_state["step"],
        "version": run_state["version"],
        "old_logit_source": cfg.oldlogits.source,
        "base_model": str(model_path),
        "contents": "lora adapters" if lora and not merge else ("merged lora" if lora else "full model"),
    }
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    shutil.copyfile(run_dir / "config.yaml", tmp / EXPORT_CONFIG)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
