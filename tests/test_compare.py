"""`twofold compare`, `twofold report` and the throughput table."""

import json
import math

import pytest
import yaml
from conftest import small_config

from twofold.cli import main
from twofold.config import ConfigError, dump_config
from twofold.envs.seeding import EVAL_SEED_OFFSET
from twofold.study import grid as grid_module
from twofold.study.grid import Cell, compare_cells, prepare_grid, run_grid, started_first, throughput_cells
from twofold.study.heldout import HELDOUT_FILE, HeldoutSpec, heldout_config
from twofold.study.report import SECTIONS, format_cell, group_runs, load_runs, source_table, throughput_table


def _fake_run(path, source, mode, rows, seed=0, **overrides):
    path.mkdir(parents=True)
    cfg = small_config(seed=seed, **{"oldlogits.source": source, "mode": mode, **overrides})
    cfg = yaml.safe_load(dump_config(cfg))
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **r}) + "\n" for i, r in enumerate(rows)))


def test_throughput_table_against_the_overlap_bound(tmp_path):
    # sync: rollout 2 s (1.5 s generation + 0.5 s env waits) + trainer 1 s per step -> perfect overlap
    # would take max(2, 1) = 2 s: ideal 1.5x.
    step = {
        "rollout/trajectories": 8,
        "rollout/tokens": 800,
        "time/generation": 1.5,
        "time/old_logits": 0.25,
        "time/training": 0.5,
        "time/weight_sync": 0.25,
        "time/idle": 2.0,
    }
    _fake_run(tmp_path / "sync", "ewma", "sync", [{**step, "time/step": 9.0}] + [{**step, "time/step": 3.0}] * 2)
    _fake_run(tmp_path / "async", "ewma", "async", [{**step, "time/step": 9.0}] + [{**step, "time/step": 2.4}] * 2)
    rows = {r["run"]: r for r in throughput_table(group_runs(load_runs([tmp_path])))}
    sync, asyn = rows["sync ewma"], rows["async W=2 ewma"]
    assert sync["samples/s"] == pytest.approx(8 / 3)  # the first (fill) step is left out
    assert sync["tokens/s"] == pytest.approx(800 / 3)
    assert asyn["speedup vs sync"] == pytest.approx(3 / 2.4)
    assert asyn["ideal speedup"] == pytest.approx(1.5)
    assert asyn["of ideal"] == pytest.approx((1.25 - 1) / 0.5)


def test_throughput_over_seeds_pools_their_steps_and_gives_each_seeds_speedup(tmp_path):
    step = {"rollout/trajectories": 8, "rollout/tokens": 800, "time/idle": 2.0}
    for seed, async_step in [(0, 2.4), (1, 2.0)]:  # sync 3.0 s a step on both: 1.25x and 1.5x
        fill = {**step, "time/step": 9.0}
        _fake_run(tmp_path / f"sync-{seed}", "ewma", "sync", [fill] + [{**step, "time/step": 3.0}] * 2, seed=seed)
        _fake_run(
            tmp_path / f"async-{seed}", "ewma", "async", [fill] + [{**step, "time/step": async_step}] * 2, seed=seed
        )
    rows = {r["run"]: r for r in throughput_table(group_runs(load_runs([tmp_path])))}
    # pooled: 32 samples in 12 s sync, in 2 * 2.4 + 2 * 2.0 = 8.8 s async: 12 / 8.8 = 1.364x
    assert rows["async W=2 ewma"]["samples/s"] == pytest.approx(32 / 8.8)
    assert rows["async W=2 ewma"]["speedup vs sync"] == pytest.approx(12 / 8.8)
    assert rows["async W=2 ewma"]["speedup per seed"] == "1.25-1.5x over 2 seeds"
    assert rows["sync ewma"]["speedup per seed"] == "1-1x over 2 seeds"


def test_throughput_per_seed_pools_repeated_seeds_and_leaves_out_runs_with_no_timed_step(tmp_path):
    step = {"rollout/trajectories": 8, "rollout/tokens": 800, "time/idle": 2.0}
    fill = {**step, "time/step": 9.0}
    for seed in (0, 1, 2):
        _fake_run(tmp_path / f"sync-{seed}", "ewma", "sync", [fill] + [{**step, "time/step": 3.0}] * 2, seed=seed)
    _fake_run(tmp_path / "async-0", "ewma", "async", [fill] + [{**step, "time/step": 2.4}] * 2, seed=0)
    _fake_run(tmp_path / "async-1", "ewma", "async", [fill] + [{**step, "time/step": 2.0}] * 2, seed=1)
    _fake_run(tmp_path / "async-1-again", "ewma", "async", [fill] + [{**step, "time/step": 1.0}] * 2, seed=1)
    _fake_run(tmp_path / "async-2-stopped", "ewma", "async", [fill], seed=2)  # only the fill step: no rate
    row = {r["run"]: r for r in throughput_table(group_runs(load_runs([tmp_path])))}["async W=2 ewma"]
    # seed 1's two runs pooled: 32 samples in 2 * 2.0 + 2 * 1.0 = 6 s against 16 in 6 s sync: 2x; seed 0 1.25x;
    # seed 2 has no step after its first and is left out
    assert row["speedup per seed"] == "1.25-2x over 2 seeds"


def test_a_throughput_bench_over_seeds_runs_them_seed_major():
    cells = throughput_cells([1, 2], seeds=2, base_seed=5)
    assert [c.name for c in cells] == [
        "sync-seed5",
        "async-W1-seed5",
        "async-W2-seed5",
        "sync-seed6",
        "async-W1-seed6",
        "async-W2-seed6",
    ]
    assert cells[2].overrides == ("mode=async", "max_staleness=2", "seed=5")
    assert [c.name for c in throughput_cells([2])] == ["sync", "async-W2"]  # one seed: the config's, as before
    assert throughput_cells([2])[1].overrides == ("mode=async", "max_staleness=2")


@pytest.mark.parametrize(
    "cells",
    [lambda: compare_cells(["snapshot"], seeds=0, base_seed=5, audit=False), lambda: throughput_cells([2], seeds=0)],
    ids=["compare", "throughput"],
)
def test_a_grid_of_no_seeds_is_a_config_error_naming_the_flag(cells):
    with pytest.raises(ConfigError, match="--seeds.*must be >= 1"):
        cells()


def test_runs_that_differ_in_admission_only_are_told_apart(tmp_path):
    step = {"rollout/trajectories": 8, "rollout/tokens": 800, "time/step": 3.0}
    _fake_run(tmp_path / "areal", "ewma", "async", [step] * 2)
    _fake_run(tmp_path / "ahead", "ewma", "async", [step] * 2, **{"rollout.start_ahead": 1})
    _fake_run(tmp_path / "ahead-w", "ewma", "async", [step] * 2, **{"rollout.start_ahead": 2})  # A = W: AReaL's too
    groups = {g.label: len(g.runs) for g in group_runs(load_runs([tmp_path]))}
    assert groups == {"async W=2 ahead=1 ewma": 1, "async W=2 ewma": 2}


def test_source_table_overhead_memory_and_success(tmp_path):
    base = {
        "time/generation": 1.0,
        "time/old_logits": 0.0,
        "time/training": 1.0,
        "time/weight_sync": 0.0,
        "time/idle": 0.0,
        "ppo/active_token_ratio": 1.0,
    }
    for seed, succ in ((0, [0.0, 0.2, 0.4]), (1, [0.2, 0.4, 0.6])):
        _fake_run(
            tmp_path / f"behavior-{seed}",
            "behavior",
            "async",
            [{**base, "time/step": 2.0, "success/rate": s} for s in succ],
        )
        _fake_run(
            tmp_path / f"snapshot-{seed}",
            "snapshot",
            "async",
            [
                {**base, "time/step": 2.2, "success/rate": s, "memory/oldlogit_peak_bytes": 2**20 * (1 + seed)}
                for s in succ
            ],
        )
    table = {r["source"]: r for r in source_table(group_runs(load_runs([tmp_path])), [])}
    assert table["snapshot"]["seeds"] == 2
    assert table["snapshot"]["extra vs behavior"] == pytest.approx(0.1)
    assert table["behavior"]["extra vs behavior"] == pytest.approx(0.0)
    assert table["snapshot"]["peak extra MB"] == pytest.approx(2.0)  # the larger of the two seeds
    # seed means per step 0.1, 0.3, 0.5: final = mean of the last 5 (here all 3) = 0.3; best 5-step mean = 0.3
    assert table["snapshot"]["final success"] == pytest.approx(0.3)
    assert table["snapshot"]["best success"] == pytest.approx(0.3)
    assert math.isnan(table["snapshot"]["audit err"])
    assert [format_cell("extra vs behavior", v) for v in (0.1, -0.05, -0.004, math.nan)] == ["+10%", "-5%", "0%", "-"]


def test_report_margin_sets_the_non_inferiority_margin(tmp_path, capsys):
    # behavior is cheaper (1 s/step against 2) and 0.1 behind snapshot on both seeds: a point interval at -0.1,
    # outside the default margin 0.05, inside 0.15
    for seed, (snapshot, behavior) in enumerate([(0.5, 0.4), (0.6, 0.5)]):
        for source, success, seconds in (("snapshot", snapshot, 2.0), ("behavior", behavior, 1.0)):
            rows = [{"success/rate": success, "time/step": seconds}] * 3
            _fake_run(tmp_path / f"{source}-seed{seed}", source, "async", rows, seed=seed)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    assert "Recommended: snapshot, by the exact-source rule" in (out / "summary.md").read_text()
    assert main(["report", str(tmp_path), "--out", str(out), "--margin", "0.15"]) == 0
    assert "Recommended: behavior, by non-inferiority (margin 0.15)" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--out", str(out), "--margin", "1.5"]) == 2
    assert "--margin" in capsys.readouterr().err


def test_grid_cells_come_seed_major_and_a_resumed_grid_finishes_its_started_cells_first(tmp_path):
    cells = compare_cells(["snapshot", "ewma", "behavior"], seeds=2, base_seed=3, audit=True)
    names = [c.name for c in cells]
    assert names == [
        "snapshot-seed3",
        "ewma-seed3",
        "behavior-seed3",
        "snapshot-seed4",
        "ewma-seed4",
        "behavior-seed4",
        "ewma-seed3-audit",
        "behavior-seed3-audit",
    ]
    assert cells[4].overrides == ("oldlogits.source=ewma", "seed=4")
    # A stopped grid had begun behavior-seed4 and ewma-seed3 (config written); ewma-seed4 has only a folder.
    for name in ("behavior-seed4", "ewma-seed3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "ewma-seed4").mkdir()
    assert [c.name for c in started_first(cells[1:], tmp_path)] == [
        "ewma-seed3",
        "behavior-seed4",
        "behavior-seed3",
        "snapshot-seed4",
        "ewma-seed4",
        "ewma-seed3-audit",
        "behavior-seed3-audit",
    ]


def test_compare_grid_report_and_resume(tmp_path, tiny_path, capsys):
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(dump_config(small_config()))
    out = tmp_path / "grid"
    argv = [
        "compare",
        "--config",
        str(cfg_path),
        "--sources",
        "ewma,behavior",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--audit",
        "--out",
        str(out),
        "run.progress=false",
    ]
    assert main(argv) == 0
    names = {"ewma-seed0", "behavior-seed0", "ewma-seed0-audit", "behavior-seed0-audit"}
    assert {p.name for p in out.iterdir() if p.is_dir() and p.name != "report"} == names
    for name in names:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert ("audit/abs_err_mean" in rows[-1]) == name.endswith("audit")
    page = (out / "report" / "report.html").read_text()
    table = page.split('<section id="overhead-table">')[1].split("</table>")[0]
    widths = {row.count("<th>") + row.count("<td>") for row in table.split("<tr>")[1:]}
    assert len(widths) == 1  # every row has as many cells as the header
    for key in SECTIONS:
        section = page.split(f'<section id="{key}">')[1].split("</section>")[0]
        assert '<img src="data:image/png;base64,' in section or "<table>" in section, key
    printed = capsys.readouterr().out
    assert "| ewma | 1 | 2 |" in printed and "| behavior | 1 | 2 |" in printed

    # Re-running the same command skips every finished run.
    stamps = {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in names}
    assert main(argv) == 0
    assert stamps == {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in names}

    # The same folder with a different config is refused instead of mixing incomparable runs.
    assert main(argv[:-1] + ["run.progress=false", "trainer.lr=0.5"]) == 2
    assert "holds a grid made with a different config" in capsys.readouterr().err


def test_bench_throughput_parses_overrides_after_options_and_checks_windows(tmp_path, capsys):
    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(dump_config(small_config()))
    argv = [
        "bench",
        "throughput",
        "--config",
        str(cfg_path),
        "--staleness",
        "0,2",
        "--out",
        str(tmp_path / "b"),
        "run.progress=false",
    ]
    assert main(argv) == 2
    assert "--staleness" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before anything ran


def test_a_warm_start_per_seed_is_built_once_per_seed_before_any_cell(tmp_path, monkeypatch):
    cells = compare_cells(["snapshot", "ewma"], seeds=2, base_seed=5, audit=True, warmstart_per_seed=True)
    assert cells[0].overrides == ("oldlogits.source=snapshot", "seed=5", "warmstart.seed=5")
    assert cells[-1].overrides == ("oldlogits.source=ewma", "seed=5", "warmstart.seed=5", "oldlogits.audit=true")
    shared = compare_cells(["ewma"], seeds=1, base_seed=5, audit=False)
    assert shared[0].overrides == ("oldlogits.source=ewma", "seed=5")
    built = []

    def resolve_model_path(cfg, progress, check_budget):
        built.append((cfg.warmstart.seed, check_budget))

    monkeypatch.setattr(grid_module, "resolve_model_path", resolve_model_path)
    prepare_grid(small_config(seed=5), tmp_path, cells)
    # each of the 5 cells' in order: seeds 5, 5, 6, 6 and the audit's 5 (the base config's own, warmstart.seed
    # 0, is no cell's and is not built), each checking its token budget first (the cells run on this machine)
    assert built == [(5, True), (5, True), (6, True), (6, True), (5, True)]


def test_a_resumed_grid_builds_no_warm_start_for_its_done_cells(tmp_path, monkeypatch):
    cfg = small_config(seed=5, **{"trainer.steps": 3})
    cells = compare_cells(["snapshot"], seeds=2, base_seed=5, audit=False, warmstart_per_seed=True)
    done = tmp_path / cells[0].name
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"finished": True, "steps": 3}))
    built = []
    monkeypatch.setattr(grid_module, "resolve_model_path", lambda cfg, **kw: built.append(cfg.warmstart.seed))
    monkeypatch.setattr(grid_module._CellProcesses, "launch", lambda self, cell: self.status.update({cell.name: 0}))
    status = run_grid(cfg, cells, tmp_path, progress=False)
    assert built == [6]  # seed 5's only cell is done: its warm start is not rebuilt
    assert status == {"snapshot-seed5": 0, "snapshot-seed6": 0}


def test_heldout_levels_are_the_same_for_every_run_seed():
    spec = HeldoutSpec(episodes=256, seed=1000)
    a = heldout_config(small_config(seed=5, **{"env.step_latency_ms": 50.0}), spec)
    b = heldout_config(small_config(seed=14), spec)
    # evaluate() plays levels level_seed(cfg.seed + EVAL_SEED_OFFSET, k) and seeds its engine with cfg.seed
    assert a.seed == b.seed == 1000
    assert a.env.step_latency_ms == 0.0
    assert spec.levels() == f"level_seed(1000 + {EVAL_SEED_OFFSET}, k) for k < 256"


def test_grid_evaluates_finished_cells_on_the_heldout_set_once(tmp_path, tiny_path):
    cfg, out = small_config(), tmp_path / "grid"
    cells = [Cell("behavior-seed0", ("oldlogits.source=behavior", "seed=0"))]
    assert run_grid(cfg, cells, out, progress=False) == {"behavior-seed0": 0}
    run = out / "behavior-seed0"
    trained = (run / "metrics.jsonl").stat().st_mtime_ns
    assert not (run / HELDOUT_FILE).exists()

    # The same grid asked for a held-out evaluation: the finished cell is evaluated, not trained again.
    spec = HeldoutSpec(episodes=4, seed=7)
    assert run_grid(cfg, cells, out, progress=False, heldout=spec) == {"behavior-seed0": 0}
    assert (run / "metrics.jsonl").stat().st_mtime_ns == trained
    result = json.loads((run / HELDOUT_FILE).read_text())
    assert (result["checkpoint_step"], result["eval_seed"], result["episodes_requested"]) == (2, 7, 4)
    assert result["episodes"] == 4.0 and 0.0 <= result["success_rate"] <= 1.0
    assert result["levels"] == spec.levels()

    evaluated = (run / HELDOUT_FILE).stat().st_mtime_ns
    assert run_grid(cfg, cells, out, progress=False, heldout=spec) == {"behavior-seed0": 0}
    assert (run / HELDOUT_FILE).stat().st_mtime_ns == evaluated
