"""`twofold` command line: train, warmstart, eval, generate.

Every command takes `--config FILE` and any number of `key.sub=value` overrides.
A bad config prints one line naming the field and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from twofold.config import ConfigError, load_config


def _config(args):
    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from twofold.pipeline.runner import Pipeline

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError("--resume", f"{str(run_dir)!r} holds no config.yaml; give a run directory")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        pipeline = Pipeline(cfg, run_dir, resume=True)
    else:
        pipeline = Pipeline(_config(args))
    last = pipeline.run()
    print(f"run directory: {pipeline.run_dir}")
    print(f"metrics:       {pipeline.run_dir / 'metrics.jsonl'} (TensorBoard: {pipeline.run_dir / 'tb'})")
    if last:
        print(f"last step {last['step']}: success {last['success/rate']:.2f}, reward {last['reward/mean']:.3f}, "
              f"{last['time/step']:.2f} s/step")
    return 0


def cmd_warmstart(args) -> int:
    from twofold.pipeline.runner import resolve_model_path

    cfg = _config(args)
    if not cfg.model.warmstart or cfg.model.path:
        raise ConfigError("model.warmstart", "warmstart trains the built-in tiny model; use model.warmstart=true "
                          "and leave model.path empty")
    path = resolve_model_path(cfg)
    report = json.loads((path / "warmstart.json").read_text())
    print(f"checkpoint: {path}")
    print(json.dumps(report, indent=2))
    return 0


def cmd_eval(args) -> int:
    from twofold.pipeline.runner import resolve_model_path
    from twofold.trainer.warmstart import evaluate

    cfg = _config(args)
    path = Path(args.model) if args.model else resolve_model_path(cfg)
    print(json.dumps({"model": str(path), **evaluate(cfg, path, args.episodes or cfg.warmstart.eval_episodes)}, indent=2))
    return 0


def cmd_generate(args) -> int:
    """Sample one episode opening with the engine and show tokens, behaviour log-probs and versions."""
    from twofold.engine import GenerationRequest, SamplingParams, make_engine
    from twofold.envs import make_env
    from twofold.models import load_tokenizer
    from twofold.pipeline.runner import resolve_model_path
    from twofold.rollout.worker import first_prompt_ids

    cfg = _config(args)
    path = resolve_model_path(cfg)
    tok = load_tokenizer(path)
    engine = make_engine(cfg.engine, path, tok, seed=cfg.seed)
    env = make_env(cfg.env.name, options=cfg.env.options)
    prompt = first_prompt_ids(tok, env, env.reset(cfg.seed))
    params = SamplingParams(cfg.engine.temperature, cfg.engine.top_p, cfg.engine.top_k, cfg.engine.max_new_tokens,
                            stop_token_ids=[tok.eos_token_id])
    res = engine.generate([GenerationRequest(0, prompt, params)])[0]
    print(tok.decode(prompt))
    for t, lp, v in zip(res.output_ids, res.output_logprobs, res.output_versions):
        print(f"{tok.decode([t])!r:>16}  logprob {lp:8.4f}  version {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twofold", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=None, help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        p.set_defaults(fn=fn)
        return p

    p = add("train", cmd_train, "Train with RL (sync or async) and write a run directory")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    add("warmstart", cmd_warmstart, "Build (or reuse) the SFT warm-start checkpoint and print its evaluation")
    p = add("eval", cmd_eval, "Valid-action and success rate of a checkpoint on held-out levels")
    p.add_argument("--model", default=None, help="model directory (default: the config's model)")
    p.add_argument("--episodes", type=int, default=None)
    add("generate", cmd_generate, "Sample one reply and show per-token behaviour log-probs and versions")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"twofold: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
