import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from twofold.cli import main
from twofold.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_bytes,
    schema_fields,
    validate,
    with_absolute_paths,
)
from twofold.envs import env_class, known_envs
from twofold.models import load_model, load_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS.parent)) for p in CONFIGS.rglob("*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(CONFIGS.parent / path)  # every field known and within its bounds
    name = Path(path).stem
    if name in ("frozenlake", "sokoban", "dataset", "tooluse"):
        assert cfg.env.name == name
    if name == "smollm2":  # the real model, exact old logits, exported at the end (README)
        assert (cfg.model.path, cfg.oldlogits.source, cfg.run.export_final) == (
            "smollm2-135m-instruct",
            "snapshot",
            True,
        )


@pytest.mark.parametrize(
    ("variant", "field", "value"),
    [
        ("confirm-frozenlake-stale-noreset", "ewma_auto_reset", False),
        ("explore-frozenlake-stale-cooldown", "ewma_reset_cooldown", 8),
    ],
)
def test_a_registered_reset_arm_differs_from_its_base_in_one_field(variant, field, value):
    """The pre-registered EWMA reset arms (docs/results.md) are confirm-frozenlake-stale.yaml but for one
    oldlogits field, so a paired difference between them is that field's effect."""
    base = load_config("configs/study/confirm-frozenlake-stale.yaml")
    arm = load_config(f"configs/study/{variant}.yaml")
    assert getattr(arm.oldlogits, field) == value != getattr(base.oldlogits, field)
    assert dataclasses.replace(arm, oldlogits=base.oldlogits) == base


def test_overrides_are_typed():
    cfg = load_config(
        "configs/frozenlake.yaml",
        [
            "mode=sync",
            "max_staleness=4",
            "oldlogits.source=snapshot",
            "trainer.lr=0.001",
            "env.options.size=5",
            "oldlogits.audit=false",
        ],
    )
    assert (cfg.mode, cfg.max_staleness, cfg.oldlogits.source, cfg.trainer.lr, cfg.env.options["size"]) == (
        "sync",
        4,
        "snapshot",
        0.001,
        5,
    )


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 (PyYAML) reads 3e-3 as the string '3e-3'; a float field must still take it
    cfg = load_config("configs/frozenlake.yaml", ["trainer.lr=3e-3", "loss.catastrophic=1E-5"])
    assert cfg.trainer.lr == 0.003 and cfg.loss.catastrophic == 1e-5
    with pytest.raises(ConfigError, match="trainer.lr"):
        load_config("configs/frozenlake.yaml", ["trainer.lr=3e"])
    with pytest.raises(ConfigError, match="trainer.steps"):  # an int field stays strict
        load_config("configs/frozenlake.yaml", ["trainer.steps=1e3"])


def test_a_size_field_takes_a_number_of_bytes_and_other_strings_stay_strict():
    # YAML reads `engine.prefix_cache=0` (the help's "0 keeps nothing") as the integer 0
    cfg = load_config("configs/frozenlake.yaml", ["engine.prefix_cache=0", "oldlogits.snapshot_budget=4096"])
    assert parse_bytes(cfg.engine.prefix_cache, "engine.prefix_cache") == 0
    assert parse_bytes(cfg.oldlogits.snapshot_budget) == 4096
    for bad in ("engine.prefix_cache=-1", "engine.prefix_cache=0.5", "engine.prefix_cache=true"):
        with pytest.raises(ConfigError, match="engine.prefix_cache"):
            load_config("configs/frozenlake.yaml", [bad])
    # YAML 1.1 reads 0123456 as octal 42798: a revision of digits must be quoted, not silently another string
    with pytest.raises(ConfigError, match="model.revision"):
        load_config("configs/frozenlake.yaml", ["model.revision=0123456"])
    assert load_config("configs/frozenlake.yaml", ["model.revision='0123456'"]).model.revision == "0123456"


@pytest.mark.parametrize(
    "override,field",
    [
        ("trainer.stepz=3", "trainer.stepz"),
        ("engine.dtype=float8", "engine.dtype"),
        ("trainer.steps=abc", "trainer.steps"),
        ("loss.eps_low=1.5", "loss.eps_low"),
        ("trainer.lr_warmup_steps=-1", "trainer.lr_warmup_steps"),
        ("model.path=/nonexistent/model", "model.path"),
        ("oldlogits.snapshot_budget=lots", "oldlogits.snapshot_budget"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("configs/frozenlake.yaml", [override])
    assert e.value.field == field and field in str(e.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys here: .*steps"):
        load_config(None, ["trainer.stepz=3"])


def test_incompatible_sync_interrupt():
    with pytest.raises(ConfigError, match="oldlogits.source"):
        load_config(None, ["mode=sync", "oldlogits.source=interrupt"])


def test_parse_bytes():
    assert parse_bytes("256MB") == 256_000_000 and parse_bytes("1GiB") == 2**30 and parse_bytes("") is None


def test_cli_bad_key_is_one_line_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "twofold.cli", "train", "--config", "configs/frozenlake.yaml", "engine.dtype=fp8"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "engine.dtype" in out.stderr and "bfloat16" in out.stderr


def test_config_file_that_is_not_utf8_is_one_line_naming_config(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seed: 0\nenv: {name: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as e:
        load_config(bad)
    assert e.value.field == "--config"
    # the command's whole answer (a fresh process's is test_cli_bad_key_is_one_line_exit_2's)
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--config" in err and "not UTF-8" in err


def test_one_sided_band_and_deep_catastrophic_threshold_are_accepted():
    cfg = load_config(None, ["loss.discrepancy_low=0", "loss.discrepancy_action=truncate", "loss.catastrophic=1e-10"])
    assert cfg.loss.discrepancy_low == 0 and cfg.loss.catastrophic == 1e-10
    with pytest.raises(ConfigError, match="loss.catastrophic"):  # with no lower bound the veto still needs < 1
        load_config(None, ["loss.discrepancy_low=0", "loss.catastrophic=1.5"])
    with pytest.raises(ConfigError, match="loss.catastrophic"):
        load_config(None, ["loss.discrepancy_low=0.5", "loss.catastrophic=0.6"])


def test_model_path_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model.path"):
        load_model(tmp_path)


def test_tokenizer_without_chat_template(tiny_path, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="chat template"):
        load_tokenizer(tmp_path)


values = st.one_of(
    st.integers(-5, 5000), st.floats(-2, 2, allow_nan=False), st.text(max_size=8), st.booleans(), st.none()
)
sections = {
    "trainer": ["steps", "lr", "ppo_epochs", "num_minibatches"],
    "loss": ["eps_low", "discrepancy_low", "aggregation", "dual_clip"],
    "engine": ["dtype", "temperature", "top_p", "max_new_tokens"],
    "rollout": ["group_size", "max_total_tokens"],
    "oldlogits": ["source", "snapshot_budget", "ewma_beta"],
    "": ["mode", "max_staleness", "seed", "bogus"],
}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(sections)), st.data(), values)
def test_fuzz_config_errors_are_named(section, data, value):
    key = data.draw(st.sampled_from(sections[section]))
    d = {section: {key: value}} if section else {key: value}
    try:
        cfg = config_from_dict(d)
    except ConfigError as e:
        assert e.field.endswith(key) or e.field.split(".")[0] in (
            "loss",
            "trainer",
            "rollout",
            "oldlogits",
            "engine",
            "model",
            "max_staleness",
        )
    else:
        assert isinstance(cfg, Config)


def _schema():
    """{section: [keys]} of the real config, with "" for top-level scalars."""
    out, default = {"": []}, Config()
    for f in dataclasses.fields(Config):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = [g.name for g in dataclasses.fields(value)]
        else:
            out[""].append(f.name)
    return out


SCHEMA = _schema()
any_value = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["sync", "async", "snapshot", "ewma", "token", "mask", "1GiB", "-1", "nan"]),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


@st.composite
def config_dicts(draw):
    """Whole config dictionaries: several sections at once, real and bogus keys, any YAML-able values."""
    d = {}
    for section in draw(st.lists(st.sampled_from(sorted(SCHEMA)), max_size=5, unique=True)):
        keys = draw(st.lists(st.sampled_from(SCHEMA[section] + ["bogus"]), min_size=1, max_size=4, unique=True))
        entries = {k: draw(any_value) for k in keys}
        if section:
            d[section] = entries if draw(st.integers(0, 9)) else draw(any_value)  # sometimes not even a mapping
        else:
            d.update(entries)
    return d


@settings(max_examples=300, deadline=None)
@given(config_dicts())
def test_fuzz_whole_config_dicts_give_named_errors(d):
    try:
        cfg = config_from_dict(d)
    except ConfigError as e:
        top, last = e.field.split(".")[0], e.field.split(".")[-1]
        # Names a real field, or the unknown key the user wrote (listing the valid ones); never an internal.
        assert top in SCHEMA or top in SCHEMA[""] or (last == "bogus" and "valid keys here" in str(e)), e.field
        assert str(e).startswith(f"config field '{e.field}'") and len(str(e)) > len(e.field) + 20
    else:
        assert isinstance(cfg, Config)
        assert validate(cfg) is cfg


# --------------------------------------------------------------------------- help, show, did-you-mean


def _nested_dataclasses(cls, seen):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp) and tp not in seen:
            seen.append(tp)
            _nested_dataclasses(tp, seen)
    return seen


def test_every_field_of_every_config_dataclass_has_help():
    option_schemas = [env_class(name).options_schema for name in known_envs() if env_class(name).options_schema]
    classes = _nested_dataclasses(Config, [Config]) + option_schemas
    assert {"LoraConfig", "RayConfig", "WandbConfig", "FrozenLakeOptions", "DatasetOptions"} <= {
        c.__name__ for c in classes
    }
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"


def test_every_range_in_the_schema_is_enforced_at_load():
    # Just past each bound is an error naming the field: ge 1 -> 0, gt 0 -> 0, le 1 -> 2 (int) or 1.5, lt 1 -> 1.
    checked = 0
    for key, f, tp in schema_fields():
        step = 1 if tp is int else 0.5
        past = {"ge": -step, "gt": 0, "le": step, "lt": 0}
        for bound in past.keys() & f.metadata.keys():
            with pytest.raises(ConfigError) as e:
                load_config(None, [f"{key}={f.metadata[bound] + past[bound]}"])
            assert e.value.field == key and "must be" in e.value.message
            checked += 1
    assert checked > 50


def _cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_config_help_of_a_field_gives_type_default_choices_and_help(capsys):
    rc, out, _ = _cli(capsys, "config", "--help", "trainer.steps")
    assert rc == 0 and out.splitlines()[:4] == ["trainer.steps", "  type:    int", "  default: 40", "  valid:   >= 1"]
    assert "Train steps of the run" in out
    rc, out, _ = _cli(capsys, "config", "help", "engine.dtype")
    assert rc == 0 and "type:    str" in out and "default: bfloat16" in out
    assert "valid:   float32 | bfloat16 | float16" in out and "Engine numerics" in out


def test_config_help_of_a_section_lists_its_fields_one_line_each(capsys):
    rc, out, _ = _cli(capsys, "config", "--help", "advantage")
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith("advantage: ")
    assert [line.split()[0] for line in lines[1:4]] == ["estimator", "normalize_std", "gamma"]
    assert "str = grpo (grpo | reinforce | discounted)" in lines[1] and "float = 1.0 (in (0, 1])" in lines[3]


def test_config_help_of_an_env_option_names_each_env_that_takes_it(capsys):
    rc, out, _ = _cli(capsys, "config", "--help", "env.options.size")
    assert rc == 0 and "(env.name=frozenlake)" in out and "(env.name=sokoban)" in out
    assert "default: 4" in out and "default: 6" in out


def test_config_show_prints_the_resolved_config_with_overrides(capsys):
    rc, out, _ = _cli(capsys, "config", "show", "configs/sokoban.yaml", "trainer.steps=7", "env.max_turns=3")
    shown = yaml.safe_load(out)
    assert rc == 0 and shown["trainer"]["steps"] == 7 and shown["env"]["max_turns"] == 3
    assert shown["env"]["name"] == "sokoban" and shown["trainer"]["lr_warmup_steps"] == 0  # file, then defaults
    rc, out, _ = _cli(capsys, "config", "show", "--config", "configs/sokoban.yaml")
    assert rc == 0 and yaml.safe_load(out)["trainer"]["steps"] == 30
    # the env's own options are checked as `twofold train` checks them
    rc, out, err = _cli(capsys, "config", "show", "configs/sokoban.yaml", "env.options.num_boxs=2")
    assert rc != 0 and out == "" and "env.options.num_boxs" in err and "did you mean 'num_boxes'?" in err


def test_a_misspelt_key_gets_a_suggestion(tmp_path, capsys):
    with pytest.raises(ConfigError, match="did you mean 'trainer.steps'\\? valid keys here") as e:
        load_config(None, ["trainer.stepz=3"])
    assert e.value.field == "trainer.stepz"
    bad = tmp_path / "typo.yaml"
    bad.write_text("trainr:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'trainer'\\?"):
        load_config(bad)
    bad.write_text("rollout:\n  group_sise: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'rollout.group_size'\\?"):
        load_config(bad)
    rc, out, err = _cli(capsys, "config", "--help", "trainer.stpes")
    assert rc == 2 and out == "" and err.strip().count("\n") == 0 and "did you mean 'trainer.steps'?" in err


def test_a_run_keeps_local_paths_absolute_and_names_as_given(tmp_path, monkeypatch):
    """What a run directory's config.yaml holds: the model folder and the dataset file it started from, absolute
    (export, eval and --resume read it from anywhere); a packaged model, a Hub ID and a missing path as given."""
    (tmp_path / "m").mkdir()
    (tmp_path / "rows.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None, ["model.path=m", "model.warmstart=false", "env.name=dataset", "env.options.path=rows.jsonl"]
    )
    kept = with_absolute_paths(cfg)
    assert kept.model.path == str(tmp_path.resolve() / "m")
    assert kept.env.options["path"] == str(tmp_path.resolve() / "rows.jsonl")
    assert cfg.model.path == "m" and cfg.env.options["path"] == "rows.jsonl"  # the config itself is left as it was
    for name in ("smollm2-135m-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "gone/model"):
        named = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=name))
        assert with_absolute_paths(named).model.path == name
