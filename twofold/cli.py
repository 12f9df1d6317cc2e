"""`twofold` command line: train, plan, compare, report, bench, warmstart, eval, generate, export, config, dataset.

Every command that runs takes `--config FILE` and any number of `key.sub=value` overrides;
`twofold config --help KEY` describes a key. A bad config prints one line naming the field and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from twofold.config import (
    CONFIG_KEYS,
    DATASET_EXAMPLES,
    DATASET_LAYOUTS,
    OLD_LOGIT_SOURCES,
    Config,
    ConfigError,
    describe_type,
    describe_valid,
    did_you_mean,
    dump_config,
    load_config,
    parse_bytes,
    schema_fields,
)
from twofold.pipeline.plan import Machine, format_plan, memory_plan, planned_config, read_model_shapes, verdict
from twofold.pipeline.progress import PARENT_PID_VAR, RankLost, die_with_parent
from twofold.pipeline.rundir import EXPORT_CONFIG, EXPORT_INFO


def _config(args):
    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    parent = os.environ.pop(PARENT_PID_VAR, None)
    if parent:  # a cell of `twofold compare`: SIGKILL of the grid takes it down too
        die_with_parent(int(parent))
    run_dir = Path(args.resume) if args.resume else None
    if run_dir is not None:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError("--resume", f"{str(run_dir)!r} holds no config.yaml; give a run directory")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        cfg = _config(args)
    from twofold.pipeline.train import train  # after the config: a typo is reported in a second, not after torch

    run_dir, last = train(cfg, run_dir, resume=run_dir is not None)
    print(f"run directory: {run_dir}")
    print(f"metrics:       {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tb'})")
    if last:
        print(
            f"last step {last['step']}: success {last['success/rate']:.2f}, reward {last['reward/mean']:.3f}, "
            f"{last['time/step']:.2f} s/step"
        )
    return 0


def cmd_plan(args) -> int:
    """Print the memory plan of a config on a machine described by --gpus, --gpu-memory, --host-memory (and
    --disk-free, for disk snapshots); exit 1 when it does not fit. A model folder's config.json is the one file
    read."""
    cfg = planned_config(args.config, args.overrides)
    gpu_memory = parse_bytes(args.gpu_memory, "--gpu-memory")
    disk_free = parse_bytes(args.disk_free, "--disk-free")
    machine = Machine(args.gpus, gpu_memory or 0, parse_bytes(args.host_memory, "--host-memory"), disk_free=disk_free)
    folder = Path(cfg.model.path).expanduser()
    if not (cfg.model.path and folder.is_dir()):
        # the tiny model, a .gguf file or a Hub ID, resolved as a run would; the tiny model's shapes do not
        # depend on its warm start, so none is trained for a plan
        from twofold.pipeline.resolve import resolve_model_path

        unwarmed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, warmstart=False))
        folder = resolve_model_path(unwarmed, progress=False)
    plan = memory_plan(cfg, read_model_shapes(folder), machine)
    print(format_plan(plan))
    if plan.fits:
        return 0
    print(f"twofold: {verdict(plan)}", file=sys.stderr)
    return 1


def _grid_config(args, default_out: str):
    overrides = list(args.overrides) + ([f"trainer.steps={args.steps}"] if args.steps else [])
    cfg = load_config(args.config, overrides)
    return cfg, Path(args.out or f"runs/{default_out}-{cfg.env.name}")


def _finish_grid(status: dict[str, int | None]) -> int:
    failed = [name for name, rc in status.items() if rc]
    unfinished = [name for name, rc in status.items() if rc is None]
    if failed:
        print(
            f"{len(failed)} run(s) failed: {', '.join(failed)} (see train.log in each); "
            f"re-run the same command to retry them",
            file=sys.stderr,
        )
    if unfinished:
        print(
            f"grid stopped: {len(unfinished)} run(s) not finished ({', '.join(unfinished)}); "
            f"re-run the same command to resume them",
            file=sys.stderr,
        )
    return 1 if failed or unfinished else 0


def cmd_compare(args) -> int:
    cfg, out = _grid_config(args, "compare")
    from twofold.study.grid import compare_cells, logged_runs, run_grid
    from twofold.study.heldout import HeldoutSpec
    from twofold.study.report import write_report

    sources = [s for s in args.sources.split(",") if s]
    cells = compare_cells(sources, args.seeds, cfg.seed, args.audit, warmstart_per_seed=args.warmstart_per_seed)
    heldout = HeldoutSpec(args.heldout, args.heldout_seed) if args.heldout else None
    status = run_grid(cfg, cells, out, parallel=args.parallel, progress=cfg.run.progress, heldout=heldout)
    html_path, markdown = write_report(logged_runs(out, cells), out / "report", margin=args.margin)
    print(markdown)
    print(f"report: {html_path}")
    return _finish_grid(status)


def cmd_report(args) -> int:
    from twofold.study.report import write_report

    paths = [Path(p) for p in args.run_dirs]
    out = Path(args.out) if args.out else (paths[0] if len(paths) == 1 else Path("runs")) / "report"
    try:
        html_path, markdown = write_report(paths, out, margin=args.margin)
    except FileNotFoundError as e:
        raise ConfigError("RUN_DIR", str(e)) from None
    print(markdown)
    print(f"report: {html_path}")
    return 0


def cmd_bench(args) -> int:
    cfg, out = _grid_config(args, "throughput")
    from twofold.study.grid import logged_runs, run_grid, throughput_cells
    from twofold.study.report import group_runs, load_runs, markdown_table, throughput_table

    cells = throughput_cells([int(w) for w in args.staleness.split(",") if w], args.seeds, cfg.seed)
    status = run_grid(cfg, cells, out, progress=cfg.run.progress)
    runs = load_runs(logged_runs(out, cells))
    table = markdown_table(throughput_table(group_runs(runs)))
    (out / "throughput.md").write_text(table)
    print(table)
    print(
        "ideal speedup = (G + T) / max(G, T) from the sync run's generation G and trainer time T; "
        "'of ideal' = (speedup - 1) / (ideal - 1)"
    )
    return _finish_grid(status)


def cmd_warmstart(args) -> int:
    cfg = _config(args)
    from twofold.pipeline.resolve import resolve_model_path

    if not cfg.model.warmstart or cfg.model.path:
        raise ConfigError(
            "model.warmstart",
            "warmstart trains the built-in tiny model; use model.warmstart=true and leave model.path empty",
        )
    path = resolve_model_path(cfg, progress=cfg.run.progress, check_budget=True)
    report = json.loads((path / "warmstart.json").read_text())
    print(f"checkpoint: {path}")
    print(json.dumps(report, indent=2))
    return 0


def _exported_run_config(model: str | None) -> Path | None:
    """The config of the run a `twofold export` folder came from: the folder's own copy, else (an export from
    before the copy) the run's config.yaml; None for a model that is no export."""
    folder = Path(model) if model else None
    if folder is None or not (folder / EXPORT_INFO).is_file():
        return None
    if (folder / EXPORT_CONFIG).is_file():
        return folder / EXPORT_CONFIG
    run_config = Path(json.loads((folder / EXPORT_INFO).read_text())["run_dir"]) / "config.yaml"
    if not run_config.is_file():  # scoring it on the default task instead would say nothing about it
        raise ConfigError(
            "--config",
            f"{folder} is an export of a run whose config is gone ({run_config}): "
            "give the config it trained with as --config",
        )
    return run_config


def cmd_eval(args) -> int:
    # An exported model is scored on its own run's task and reward unless --config names another.
    config = args.config or _exported_run_config(args.model)
    cfg = load_config(config, args.overrides)
    from twofold.modelpath import allow_model_code, resolve_model_source
    from twofold.pipeline.resolve import resolve_model_path
    from twofold.trainer.warmstart import evaluate

    episodes = args.episodes or cfg.warmstart.eval_episodes
    if args.solver:
        from twofold.trainer.warmstart import solver_success_rate

        print(
            json.dumps(
                {
                    "levels": f"{cfg.env.name} eval set, {episodes} levels",
                    "optimal_success_rate": solver_success_rate(cfg, episodes, 0.0),
                    f"noisy_solver_success_rate (noise {cfg.warmstart.noise})": solver_success_rate(
                        cfg, episodes, cfg.warmstart.noise
                    ),
                },
                indent=2,
            )
        )
        return 0
    if args.model:
        path = resolve_model_source(args.model, cfg.model.revision)
        allow_model_code(path, cfg.model.trust_remote_code)
    else:
        path = resolve_model_path(cfg, check_budget=True)
    where = {"model": str(path), "config": str(config) if config else "defaults", "env": cfg.env.name}
    print(json.dumps({**where, **evaluate(cfg, path, episodes)}, indent=2))
    return 0


def cmd_export(args) -> int:
    from twofold.pipeline.export import export_run

    try:
        out = export_run(args.run_dir, args.out, step=args.step, merge=args.merge)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"twofold: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def cmd_generate(args) -> int:
    """Sample one episode opening with the engine and show tokens, behaviour log-probs and versions."""
    cfg = _config(args)
    from twofold.engine import GenerationRequest, SamplingParams, make_engine
    from twofold.envs import env_from_config
    from twofold.models import load_tokenizer
    from twofold.pipeline.resolve import resolve_model_path
    from twofold.rollout.chat import first_prompt_ids

    path = resolve_model_path(cfg, check_budget=True)
    tok = load_tokenizer(path)
    engine = make_engine(cfg.engine, path, tok, seed=cfg.seed)
    env = env_from_config(cfg.env)
    prompt = first_prompt_ids(tok, env, env.reset(cfg.seed))
    params = SamplingParams(
        cfg.engine.temperature,
        cfg.engine.top_p,
        cfg.engine.top_k,
        cfg.engine.max_new_tokens,
        stop_token_ids=[tok.eos_token_id],
    )
    res = engine.generate([GenerationRequest(0, prompt, params)])[0]
    print(tok.decode(prompt))
    for t, lp, v in zip(res.output_ids, res.output_logprobs, res.output_versions, strict=True):
        print(f"{tok.decode([t])!r:>16}  logprob {lp:8.4f}  version {v}")
    return 0


def cmd_dataset_example(args) -> int:
    from twofold.envs.dataset import EXAMPLE_TASKS, write_example

    path = write_example(args.out, layout=args.layout, n=args.n, seed=args.seed, task=args.task)
    print(
        f"{path}: {args.n} {EXAMPLE_TASKS[args.task][2]} in {args.layout}'s layout; train on them with "
        f"env.name=dataset env.options.path={path} env.max_turns=1"
    )
    return 0


# --------------------------------------------------------------------------- twofold config


def _yaml_value(value) -> str:
    """A value as it is written in a config file: 40, '', null, [q_proj, v_proj]."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).split("\n...")[0].strip()


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _describe_field(key: str, f: dataclasses.Field, tp) -> str:
    """Every line `config --help KEY` prints for one field: name, type, default, valid values, help."""
    lines = [key, f"  type:    {describe_type(tp)}", f"  default: {_yaml_value(_default(f))}"]
    if describe_valid(tp, f.metadata):
        lines.append(f"  valid:   {describe_valid(tp, f.metadata)}")
    return "\n".join([*lines, f"  {f.metadata['help']}"])


def _field_line(name: str, f: dataclasses.Field, tp) -> str:
    """One line of a section's listing: name, type and default, the first sentence of the help."""
    if dataclasses.is_dataclass(tp):
        kind = "section"
    else:
        valid = describe_valid(tp, f.metadata)
        kind = f"{describe_type(tp)} = {_yaml_value(_default(f))}" + (f" ({valid})" if valid else "")
    summary = f.metadata["help"].split(". ")[0].rstrip(".")
    return f"  {name:<26} {kind:<32} {summary}"


def _section_lines(prefix: str, cls: type) -> list[str]:
    """One line per field of the section `cls` (its sub-sections as one line each)."""
    return [_field_line(f.name, f, tp) for key, f, tp in schema_fields(cls, prefix) if "." not in key[len(prefix) :]]


def _env_options() -> dict[str, type]:
    """{env name: the dataclass of its `env.options`} of the registered envs that document theirs."""
    from twofold.envs import env_class, known_envs  # the envs import gymnasium: only when asked for

    return {name: env_class(name).options_schema for name in known_envs() if env_class(name).options_schema}


_MORE = "`twofold config --help {}KEY` describes one in full."


def describe_key(key: str) -> str:
    """The text of `twofold config --help KEY`: a field in full, a section's fields one line each, or (no KEY)
    the top level."""
    if not key:
        usage = "twofold config --help KEY | twofold config show [CONFIG] [key.sub=value ...]"
        return "\n".join([usage, "", "Top-level keys and sections:", *_section_lines("", Config), _MORE.format("")])
    fields = {k: (f, tp) for k, f, tp in schema_fields()}
    if key in fields:
        f, tp = fields[key]
        if dataclasses.is_dataclass(tp):
            return "\n".join([f"{key}: {f.metadata['help']}", *_section_lines(f"{key}.", tp), _MORE.format(f"{key}.")])
        if key != "env.options":
            return _describe_field(key, f, tp)
        built_in = [f"{name}:\n" + "\n".join(_section_lines("", cls)) for name, cls in _env_options().items()]
        heading = "Options of the built-in envs, by env.name:"
        return "\n\n".join([_describe_field(key, f, tp), heading, *built_in, _MORE.format("env.options.")])
    if key.startswith("env.options."):
        return _describe_env_option(key)
    raise ConfigError(key, f"unknown key; {did_you_mean(key, CONFIG_KEYS)}`twofold config --help` lists the sections")


def _describe_env_option(key: str) -> str:
    """`env.options.KEY` of every built-in env that takes it (`size` means one thing for FrozenLake, another
    for Sokoban)."""
    options = [(name, schema_fields(cls, "env.options.")) for name, cls in _env_options().items()]
    found = [(name, k, f, tp) for name, fields in options for k, f, tp in fields]
    matches = [_describe_field(f"{k} (env.name={name})", f, tp) for name, k, f, tp in found if k == key]
    if not matches:
        hint = did_you_mean(key, {k for _, k, _, _ in found})
        raise ConfigError(key, f"unknown key; {hint}`twofold config --help env.options` lists them")
    return "\n\n".join(matches)


def cmd_config_help(args) -> int:
    print(describe_key(args.key or ""))
    return 0


def cmd_config_show(args) -> int:
    files = ([args.config] if args.config else []) + [item for item in args.items if "=" not in item]
    if len(files) > 1:
        raise ConfigError("--config", f"give one config file, got {', '.join(files)}")
    cfg = load_config(files[0] if files else None, [item for item in args.items if "=" in item])
    from twofold.envs import check_options, env_class  # the envs import gymnasium: only once the config is read

    check_options(env_class(cfg.env.name), cfg.env)  # the env's own option names, as `twofold train` checks them
    print(dump_config(cfg), end="")
    return 0


# --------------------------------------------------------------------------- the parser

CONFIG_EPILOG = (
    "Config keys: `twofold config --help KEY` describes one (e.g. trainer.steps); "
    "`twofold config show CONFIG [key.sub=value ...]` prints the resolved config."
)


def _add_config_command(sub) -> None:
    config = sub.add_parser(
        "config",
        add_help=False,
        help="Config keys: `config --help KEY` describes one, `config show` prints a resolved config",
        description="Describe config keys, or print a resolved config as YAML.",
    )
    config.add_argument(
        "-h", "--help", nargs="?", const="", dest="key", metavar="KEY", help="describe KEY (a field or a section)"
    )
    config.set_defaults(fn=cmd_config_help)
    actions = config.add_subparsers(dest="action", metavar="ACTION")
    p = actions.add_parser("help", help="describe KEY: type, default, valid values, help; a section lists its fields")
    p.add_argument("key", nargs="?", default="", metavar="KEY")
    p.set_defaults(fn=cmd_config_help)
    p = actions.add_parser("show", help="print the resolved config (defaults <- CONFIG <- overrides) as YAML")
    p.add_argument("--config", default=None, help="YAML config (see configs/)")
    p.add_argument("items", nargs="*", metavar="CONFIG | key.sub=value", help="a config file and overrides")
    p.set_defaults(fn=cmd_config_show)


def _with_config(subparsers, name: str, fn, help_text: str) -> argparse.ArgumentParser:
    """A command that reads a config: `--config FILE` and any number of `key.sub=value` overrides."""
    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=CONFIG_EPILOG)
    p.add_argument("--config", default=None, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(fn=fn)
    return p


def _add_training_commands(sub) -> None:
    p = _with_config(sub, "train", cmd_train, "Train with RL (sync or async) and write a run directory")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p = _with_config(
        sub, "plan", cmd_plan, "Memory plan: bytes per device and part on a machine; exit 1 if it overflows"
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the machine (default 1; 0: a CPU machine)")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of each GPU, e.g. 80GiB (default) or 24GB")
    p.add_argument("--host-memory", default="1TiB", help="host memory, e.g. 1TiB (default) or 512GB")
    p.add_argument(
        "--disk-free",
        default="",
        help="free disk space where the run writes, e.g. 50GiB, checked against disk snapshots "
        "(oldlogits.snapshot_device=disk); default: not checked",
    )
    p = _with_config(
        sub, "compare", cmd_compare, "Train every old-logit source x seed (same data) and write a comparison report"
    )
    p.add_argument("--sources", default=",".join(OLD_LOGIT_SOURCES), help="old-logit sources to compare")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="train steps per run (default: the config's)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (timings are fair only with 1)")
    p.add_argument(
        "--audit",
        action="store_true",
        help="also one audit run per approximate source, measuring its error against exact old log-probs",
    )
    p.add_argument(
        "--warmstart-per-seed",
        action="store_true",
        help="start the cells of seed S from the warm start of warmstart.seed=S (default: one warm start for all)",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=0,
        metavar="EPISODES",
        help="after training, score each cell's final checkpoint on EPISODES held-out levels (RUN_DIR/heldout.json)",
    )
    p.add_argument(
        "--heldout-seed",
        type=int,
        default=1000,
        help="evaluation seed of --heldout: every cell plays the same levels (default 1000)",
    )
    p.add_argument("--out", default=None, help="grid folder (default runs/compare-ENV); re-use it to resume")
    _add_margin(p)


def _add_margin(p) -> None:
    p.add_argument(
        "--margin",
        type=float,
        default=0.05,
        help="non-inferiority margin of the recommendation: the final success a cheaper source may lose against "
        "the best exact source (paired 95%% t lower bound above -margin)",
    )


def _add_study_commands(sub) -> None:
    p = sub.add_parser("report", help="HTML + Markdown report over run directories (or grid folders)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="report folder (default RUN_DIR/report)")
    _add_margin(p)
    p.set_defaults(fn=cmd_report)
    bench = sub.add_parser(
        "bench", help="Benchmarks: `bench throughput` runs sync vs async at several staleness windows"
    )
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    p = _with_config(
        benchmarks, "throughput", cmd_bench, "sync vs async samples/s and tokens/s, time split, ideal overlap bound"
    )
    p.add_argument(
        "--staleness",
        default="1,2,4",
        help="async staleness windows to run (max_staleness); a config's rollout.start_ahead is kept, so where it "
        "is set the windows differ in the lag they tolerate, not in how far ahead groups start",
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs of each mode, seeds from the config's on: the table pools them and gives each seed's speedup "
        "range (agent runs differ from seed to seed by more than async changes). 1 names the cells by mode "
        "alone, more add -seedN: a folder started with one does not resume under the other",
    )
    p.add_argument("--out", default=None, help="grid folder (default runs/throughput-ENV)")


def _add_model_commands(sub) -> None:
    _with_config(
        sub, "warmstart", cmd_warmstart, "Build (or reuse) the SFT warm-start checkpoint and print its evaluation"
    )
    p = _with_config(sub, "eval", cmd_eval, "Valid-action and success rate of a checkpoint on held-out levels")
    p.add_argument(
        "--model",
        default=None,
        help="a model folder (e.g. `twofold export`'s: without --config it is scored on its run's own config), "
        ".gguf file or Hub ID (default: the config's)",
    )
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument(
        "--solver",
        action="store_true",
        help="instead of a model, report the reference solver's optimal (and noisy) success rate",
    )
    _with_config(sub, "generate", cmd_generate, "Sample one reply and show per-token behaviour log-probs and versions")
    p = sub.add_parser(
        "export", help="Write a run's trained model as a Hugging Face folder (LoRA: its adapters, or merged weights)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT", help="a new (or empty) folder")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    p.add_argument("--merge", action="store_true", help="LoRA: merge the adapters into the base weights")
    p.set_defaults(fn=cmd_export)


def _add_dataset_command(sub) -> None:
    data = sub.add_parser(
        "dataset", help="Datasets: `dataset example OUT` writes an example task's rows in verl's or TRL's layout"
    )
    p = data.add_subparsers(dest="what", required=True, metavar="WHAT").add_parser(
        "example", help="an example task's rows as JSONL (.jsonl) or Parquet (.parquet)"
    )
    p.add_argument("out", metavar="OUT")
    p.add_argument("--layout", choices=[layout for layout in DATASET_LAYOUTS if layout != "auto"], default="verl")
    p.add_argument(
        "--task",
        choices=DATASET_EXAMPLES,
        default="word_problems",
        help="word_problems (answers in <answer> tags) or larger_number (a bare number; SmolLM2's starting task)",
    )
    p.add_argument("--n", type=int, default=500, help="rows to write")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed (another seed: other rows)")
    p.set_defaults(fn=cmd_dataset_example)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twofold", description=__doc__.split("\n")[0], epilog=CONFIG_EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_study_commands(sub)
    _add_model_commands(sub)
    _add_config_command(sub)
    _add_dataset_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"twofold: {e}", file=sys.stderr)
        return 2
    except RankLost as e:  # one line, like a config error: which rank died, and how to resume
        print(f"twofold: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
