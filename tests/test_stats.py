"""Statistics over seeds, checked against intervals derived by hand, and the report sections built on them."""

import json
import math
import shutil

import pytest
import yaml
from conftest import small_config

from twofold.config import dump_config
from twofold.study import report
from twofold.study.report import (
    format_cell,
    group_runs,
    load_runs,
    log_scale_with_zero,
    ranking_table,
    recommendation,
    regime_table,
    source_table,
    write_report,
)
from twofold.study.stats import (
    Interval,
    bootstrap_mean,
    collapse_step,
    paired_difference,
    recovery_step,
    stuck_step,
    t_interval,
    tied_ranks,
)


def fields(iv: Interval) -> tuple[float, float, float]:
    return iv.mean, iv.low, iv.high


def test_exact_bootstrap_of_four_seeds():
    # [0, 0, 0, 1]: a resample's mean is k/4 with k ~ Binomial(4, 1/4): P(k) = 81, 108, 54, 12, 1 (/256),
    # cumulative 0.316, 0.738, 0.949, 0.996, 1. The 2.5% point is k = 0; the 97.5% point is the first k whose
    # cumulative probability reaches 0.975: k = 3, mean 0.75 (not the maximum, 1).
    assert bootstrap_mean([0.0, 0.0, 0.0, 1.0]) == Interval(0.25, 0.0, 0.75)


def test_exact_bootstrap_of_five_seeds():
    # k ~ Binomial(5, 1/5): cumulative 0.328, 0.737, 0.942, 0.993, ...: upper point k = 3 -> 0.6
    assert fields(bootstrap_mean([0.0, 0.0, 0.0, 0.0, 1.0])) == pytest.approx((0.2, 0.0, 0.6))


def test_three_seeds_give_the_range_and_one_seed_gives_a_point():
    # with 3 seeds each extreme resample has probability 1/27 = 3.7% > 2.5%: the interval is [min, max]
    assert fields(bootstrap_mean([0.1, 0.2, 0.6])) == pytest.approx((0.3, 0.1, 0.6))
    assert bootstrap_mean([0.4]) == Interval(0.4, 0.4, 0.4)
    assert bootstrap_mean([0.4, float("nan"), 0.4]) == Interval(0.4, 0.4, 0.4)  # NaNs dropped


def test_many_seeds_use_scipy_and_bracket_the_mean():
    values = [0.1 * (i % 7) for i in range(20)]
    iv = bootstrap_mean(values)
    assert iv.low < iv.mean < iv.high and iv == bootstrap_mean(values)  # seeded: the same every time


def test_t_interval_of_two_and_three_seeds():
    # [0.2, 0.4]: mean 0.3, s = 0.1414 (ddof 1), t_{1, 0.975} = 12.7062: half width 12.7062 * 0.1414 / sqrt(2) = 1.2706
    assert fields(t_interval([0.2, 0.4])) == pytest.approx((0.3, -0.97062, 1.57062), abs=1e-4)
    # [1, 2, 3]: mean 2, s = 1, t_{2, 0.975} = 4.3027: half width 4.3027 / sqrt(3) = 2.4841
    assert fields(t_interval([1.0, 2.0, 3.0, float("nan")])) == pytest.approx((2.0, -0.4841, 4.4841), abs=1e-4)
    assert t_interval([0.4]) == Interval(0.4, 0.4, 0.4) and t_interval([0.0, 0.0]) == Interval(0.0, 0.0, 0.0)


def test_paired_difference_uses_the_seeds_both_have():
    # differences on seeds 0..3: 0, 0, 0, 0.4 -> mean 0.1, s = sqrt((3 * 0.01 + 0.09) / 3) = 0.2,
    # t_{3, 0.975} = 3.1824: half width 3.1824 * 0.2 / 2 = 0.3182
    ours = {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9, 9: 0.0}  # seed 9 has no reference: left out
    ref = {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.5}
    assert fields(paired_difference(ours, ref)) == pytest.approx((0.1, -0.2182, 0.4182), abs=1e-4)


def test_ranks_tie_overlapping_intervals():
    ranks = tied_ranks({"a": Interval(0.6, 0.5, 0.7), "b": Interval(0.5, 0.4, 0.6), "c": Interval(0.2, 0.1, 0.3)})
    assert ranks == {"a": 1, "b": 1, "c": 3}  # a and b overlap; both lie wholly above c


def test_collapse_is_the_first_window_under_the_threshold():
    # 3-step means: (0.9+0.9+0.4)/3 = 0.73, (0.9+0.4+0.3)/3 = 0.53, (0.4+0.3+0.2)/3 = 0.3 < 0.5 at step 5
    assert collapse_step([0.9, 0.9, 0.4, 0.3, 0.2], 0.5) == 5
    assert collapse_step([0.9, 0.8, 0.9], 0.5) is None


def test_recovery_is_the_step_after_the_last_window_under_the_threshold():
    # 3-step means at steps 3..7: 0.73, 0.53, 0.3, 0.47, 0.67: last under 0.5 at step 6, so back from step 7
    assert recovery_step([0.9, 0.9, 0.4, 0.3, 0.2, 0.9, 0.9], 0.5) == 7
    assert recovery_step([0.9, 0.9, 0.4, 0.3, 0.2], 0.5) is None  # ends under it
    assert recovery_step([0.9, 0.8, 0.9], 0.5) is None  # never fell


def test_stuck_is_a_final_stretch_of_zeros_after_success():
    assert stuck_step([0.5, 0.2, 0, 0, 0], 3) == 3  # steps 3-5: three zeros, after success at steps 1-2
    assert stuck_step([0.5, 0.2, 0, 0, 0], 4) is None  # the stretch is 3 steps, not 4
    assert stuck_step([0.5, 0, 0.1, 0, 0], 2) == 4  # only the final stretch counts: the zero at step 2 recovered
    assert stuck_step([0, 0, 0, 0], 2) is None  # never succeeded: not learning yet, not a collapse
    assert stuck_step([0.5, 0.5], 1) is None


# --------------------------------------------------------------------------- a synthetic grid


def fake_run(
    path,
    source,
    seed,
    success,
    seconds,
    peak_bytes=0.0,
    valid=None,
    audit=False,
    lag_errors=None,
    regime=None,
    old_logits=0.0,
):
    path.mkdir(parents=True)
    cfg = yaml.safe_load(dump_config(small_config(seed=seed, **{"oldlogits.source": source})))
    cfg["oldlogits"]["audit"] = audit
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = []
    for i in range(6):
        row = {
            "step": i + 1,
            "success/rate": success[i] if isinstance(success, list) else success,
            "time/step": seconds,
            "time/generation": 1.0,
            "time/old_logits": old_logits,
            "rollout/format_ok_rate": (valid or [1.0] * 6)[i],
            "memory/oldlogit_peak_bytes": peak_bytes,
            "reward/mean": success[i] if isinstance(success, list) else success,
            **(regime or {}),
        }
        if audit:
            row.update(
                {"audit/abs_err_mean": 0.01, **{f"audit/abs_err_lag{k}": v for k, v in (lag_errors or {}).items()}}
            )
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def grid(tmp_path):
    finals = {
        "snapshot": [0.5, 0.6, 0.5, 0.6],
        "ewma": [0.5, 0.5, 0.6, 0.6],
        "behavior": [0.3, 0.4, 0.3, 0.4],
        "recompute": [0.1, 0.2, 0.1, 0.2],
    }
    seconds = {"snapshot": 2.2, "ewma": 2.0, "behavior": 1.9, "recompute": 2.0}
    for source, values in finals.items():
        for seed, success in enumerate(values):
            # recompute seed 0 stops answering from step 3: 3-step valid means 0.73 (step 3), 0.47 (step 4)
            # behavior seed 1 dips and comes back: 0.53 (step 3), 0.3 (step 4), 0.53 (step 5), 0.77 (step 6)
            valid = {
                ("recompute", 0): [1.0, 1.0, 0.2, 0.2, 0.2, 0.2],
                ("behavior", 1): [1.0, 0.3, 0.3, 0.3, 1.0, 1.0],
            }.get((source, seed))
            fake_run(
                tmp_path / f"{source}-seed{seed}",
                source,
                seed,
                success,
                seconds[source],
                peak_bytes=2**20 * {"snapshot": 10, "ewma": 5}.get(source, 0),
                valid=valid,
            )
    fake_run(
        tmp_path / "ewma-seed0-audit",
        "ewma",
        0,
        0.5,
        2.0,
        audit=True,
        lag_errors={"0": 0.001, "1": 0.01, "2": 0.02, "4plus": 0.05},
    )
    return tmp_path


def test_source_table_intervals_pairs_ranks_and_collapses(grid):
    runs = load_runs([grid])
    table = {r["source"]: r for r in source_table(group_runs([r for r in runs if not r.audit]), [])}
    # snapshot seeds 0.5, 0.6, 0.5, 0.6: mean 0.55, s = sqrt(4 * 0.05^2 / 3) = 0.05774, t_{3, 0.975} = 3.1824:
    # half width 3.1824 * 0.05774 / 2 = 0.0919 -> [0.458, 0.642]. behavior (0.3, 0.4 x 2) gets [0.258, 0.442],
    # wholly under snapshot's and ewma's; recompute [0.058, 0.242], under behavior's too.
    assert table["snapshot"]["final success"] == pytest.approx(0.55)
    assert table["snapshot"]["final 95% CI"] == "0.55 [0.458, 0.642]"
    assert table["behavior"]["final 95% CI"] == "0.35 [0.258, 0.442]"
    # ewma - snapshot per seed: 0, -0.1, 0.1, 0 -> mean 0, an interval around it
    assert format_cell("vs snapshot", table["ewma"]["vs snapshot"]).startswith("+0 [-")
    assert table["snapshot"]["vs snapshot"] == "-"
    assert {s: table[s]["rank"] for s in table} == {"snapshot": 1, "ewma": 1, "behavior": 3, "recompute": 4}
    assert table["recompute"]["collapsed"] == "1/4 (seed 0 at step 4, stopped answering)"
    assert table["behavior"]["collapsed"] == "1/4 (seed 1 at step 4, stopped answering, answering again from step 5)"
    assert table["ewma"]["collapsed"] == "0/4"
    advice = recommendation(list(table.values()))
    assert "Best tied group" in advice and "ewma, snapshot." in advice  # by final success, then name
    assert "Recommended: ewma" in advice  # tied with snapshot, and cheaper: 2.0 vs 2.2 s/step
    assert table["recompute"]["ended collapsed"] == 1 and table["behavior"]["ended collapsed"] == 0
    # behavior's one collapse came back, recompute's did not: the paragraph names them apart
    assert "Collapsed runs: recompute (" in advice
    assert "Collapsed and answering again at the end (every collapsed run came back): behavior." in advice
    # behavior - snapshot is -0.2 on every seed, recompute - snapshot -0.4: zero-width intervals below 0
    assert "Paired on the same seeds, behind snapshot: behavior (-0.2 [-0.2, -0.2]), recompute (-0.4" in advice
    assert "ahead of snapshot" not in advice


def test_paired_seeds_separate_sources_whose_own_intervals_overlap(tmp_path):
    # Seed difficulty moves both sources alike: snapshot 0.3, 0.5, 0.7 and ewma 0.34, 0.56, 0.75. Own t
    # intervals (t_2 = 4.303): snapshot 0.5 +- 4.303 * 0.2 / sqrt(3) = [0.003, 0.997] overlaps ewma's, so both
    # rank 1. Paired: differences 0.04, 0.06, 0.05, mean 0.05, s = 0.01, 0.05 +- 4.303 * 0.01 / sqrt(3)
    # = [0.0252, 0.0748], above 0.
    for source, values in (("snapshot", [0.3, 0.5, 0.7]), ("ewma", [0.34, 0.56, 0.75])):
        for seed, success in enumerate(values):
            fake_run(tmp_path / f"{source}-seed{seed}", source, seed, success, 2.0)
    table = {r["source"]: r for r in source_table(group_runs(load_runs([tmp_path])), [])}
    assert table["snapshot"]["rank"] == table["ewma"]["rank"] == 1
    diff = table["ewma"]["vs snapshot"]
    assert (diff.mean, diff.low, diff.high) == pytest.approx((0.05, 0.0252, 0.0748), abs=1e-4)
    advice = recommendation(list(table.values()))
    assert "Paired on the same seeds, ahead of snapshot: ewma (+0.05 [+0.0252, +0.0748])." in advice
    assert "Every ranked source ties" not in advice


def test_sources_with_one_seed_are_neither_ranked_nor_recommended(tmp_path):
    # snapshot: 2 seeds (0.4, 0.6); recompute: 1 seed at 0.9, a point "interval" wholly above snapshot's
    # [0.4, 0.6]: ranking it would put snapshot second on one run's luck
    for source, values, seconds in (("snapshot", [0.4, 0.6], 2.0), ("recompute", [0.9], 1.0)):
        for seed, success in enumerate(values):
            fake_run(tmp_path / f"{source}-seed{seed}", source, seed, success, seconds)
    table = {r["source"]: r for r in source_table(group_runs(load_runs([tmp_path])), [])}
    assert table["snapshot"]["rank"] == 1 and table["recompute"]["rank"] != table["recompute"]["rank"]  # NaN
    assert table["recompute"]["vs snapshot"] == "+0.5 (1 seed, no interval)"  # 0.9 - 0.4 on seed 0
    advice = recommendation(list(table.values()))
    assert "Recommended: snapshot" in advice
    assert "Not ranked (fewer than 2 seeds): recompute" in advice
    ranking = [r["source"] for r in ranking_table(list(table.values()))]
    assert ranking == ["snapshot", "recompute"]  # unranked last although its one run scored higher
    for path in tmp_path.glob("snapshot-seed1"):
        shutil.rmtree(path)
    table = source_table(group_runs(load_runs([tmp_path])), [])
    assert recommendation(table).startswith("No source has 2 finished seeds yet")


@pytest.mark.parametrize("snapshot_seconds", [(2.0, 2.0), (2.0, 2.4)])
def test_the_cheapest_tied_source_is_fastest_unless_times_overlap_then_least_memory(tmp_path, snapshot_seconds):
    # snapshot and behavior tie on success (0.5, 0.6 each). behavior: 2.4 s/step on both seeds, 0 MB;
    # snapshot: 10 MB, and either 2.0 s on both seeds (a point interval under behavior's: faster, picked) or
    # 2.0 and 2.4 s: mean 2.2, s = 0.2828, t_1 = 12.706 -> 2.2 +- 12.706 * 0.2828 / sqrt(2) = [-0.341, 4.74],
    # overlapping behavior's 2.4: equally fast, and behavior's smaller memory decides
    for source, seconds, mb in (("snapshot", snapshot_seconds, 10), ("behavior", (2.4, 2.4), 0)):
        for seed, success in enumerate((0.5, 0.6)):
            fake_run(tmp_path / f"{source}-seed{seed}", source, seed, success, seconds[seed], peak_bytes=2**20 * mb)
    table = {r["source"]: r for r in source_table(group_runs(load_runs([tmp_path])), [])}
    advice = recommendation(list(table.values()))
    if snapshot_seconds == (2.0, 2.0):
        assert format_cell("", table["snapshot"]["s/step 95% CI"]) == "2 [2, 2]"
        assert "Recommended: snapshot" in advice and "overlap at 95%" not in advice
    else:
        assert format_cell("", table["snapshot"]["s/step 95% CI"]) == "2.2 [-0.341, 4.74]"
        assert "Recommended: behavior" in advice
        assert "(s/step of behavior, snapshot overlap at 95%: memory, then old-logit work decide)" in advice


@pytest.mark.parametrize("recompute_work", [5e-5, 0.5])
def test_old_logit_work_under_a_hundredth_of_a_step_ties_and_then_success_decides(tmp_path, recompute_work):
    # Both tie on success (behavior 0.45, 0.55; recompute 0.5, 0.6: overlapping t intervals), on time (2 s/step)
    # and memory (0 MB). behavior's old-logit work is 4e-5 s. recompute's is either 5e-5 s: more, but by
    # 1e-5 s, under 1% of a step (0.02 s), so the higher mean success (recompute's 0.55) decides; or 0.5 s,
    # a quarter of a step: then behavior is cheaper on work alone.
    for source, finals, work in (("behavior", (0.45, 0.55), 4e-5), ("recompute", (0.5, 0.6), recompute_work)):
        for seed, success in enumerate(finals):
            fake_run(tmp_path / f"{source}-seed{seed}", source, seed, success, 2.0, old_logits=work)
    table = {r["source"]: r for r in source_table(group_runs(load_runs([tmp_path])), [])}
    assert table["behavior"]["rank"] == table["recompute"]["rank"] == 1
    advice = recommendation(list(table.values()))
    negligible = recompute_work < 1e-3
    assert f"Recommended: {'recompute' if negligible else 'behavior'}" in advice
    tie = "recompute, behavior also tie on those, old-logit work within 1% of a step, so the higher mean final success"
    assert (tie in advice) == negligible


def test_a_run_whose_success_stays_at_zero_is_marked_collapsed(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "STUCK_STEPS", 3)
    # seed 0 answers every step (valid 1.0) but fails every episode from step 3 to the end (4 steps >= 3);
    # seed 1 dips to 0 at step 3 and recovers
    fake_run(tmp_path / "recompute-seed0", "recompute", 0, [0.5, 0.4, 0, 0, 0, 0], 2.0)
    fake_run(tmp_path / "recompute-seed1", "recompute", 1, [0.5, 0.4, 0, 0.3, 0.5, 0.5], 2.0)
    (row,) = source_table(group_runs(load_runs([tmp_path])), [])
    assert row["collapsed"] == "1/2 (seed 0 at step 3, success stuck at 0)"
    assert row["ended collapsed"] == 1  # stuck to the last step; seed 1's dip came back
    assert "Collapsed runs: recompute" in recommendation([row])


def test_report_shows_every_statistics_section(grid):
    html_path, markdown = write_report([grid], grid / "report")
    page = html_path.read_text()
    for section in ("recommendation", "learning-curves", "audit"):
        assert f'id="{section}"' in page
    assert "Recommended: ewma" in markdown and "final 95% CI" in markdown and "vs snapshot" in markdown
    assert (grid / "report" / "audit_error_vs_lag.png").exists()
    assert (grid / "report" / "curves_step.png").exists()


def test_error_axis_is_log_unless_an_exact_zero_must_be_drawn():
    # recompute's error is exactly 0 at lag 0 (its pi_old is the current weights); a log axis would clip it
    assert log_scale_with_zero([0.02, 0.3, math.nan]) == ("log", {})
    assert log_scale_with_zero([0.0, 0.33, 0.0008]) == ("symlog", {"linthresh": pytest.approx(1e-4)})
    assert log_scale_with_zero([0.0, 0.01]) == ("symlog", {"linthresh": pytest.approx(0.01)})
    assert log_scale_with_zero([0.0, 0.0]) == ("symlog", {"linthresh": 1.0})


def test_regime_table_averages_lag_shares_and_kls_over_steps_and_seeds(tmp_path):
    lags = {"0": 0.5, "1": 0.25, "2": 0.25, "3": 0.0, "4plus": 0.0}
    for seed, (mean, top, mixed, stale) in enumerate([(1.0, 2, 0.1, 0.02), (2.0, 5, 0.3, 0.04)]):
        regime = {
            "version/staleness_mean": mean,
            "version/staleness_max": top,
            **{f"version/lag{b}_frac": v for b, v in lags.items()},
            "rollout/multi_version_frac": mixed,
            "kl/discrepancy_k3": 1e-5,
            "kl/staleness_k3": stale,
        }
        fake_run(tmp_path / f"snapshot-seed{seed}", "snapshot", seed, 0.5, 2.0, regime=regime)
    fake_run(tmp_path / "behavior-seed0", "behavior", 0, 0.5, 2.0)  # logged no lag metrics
    rows = {r["source"]: r for r in regime_table(group_runs(load_runs([tmp_path])))}
    snap = rows["snapshot"]
    # 6 equal steps per seed: the mean over 12 steps is the mean of the two seeds' values
    assert snap["lag mean"] == pytest.approx(1.5) and snap["lag max"] == 5
    assert [snap[f"lag {b}"] for b in ("0", "1", "2", "3", "4+")] == pytest.approx([0.5, 0.25, 0.25, 0.0, 0.0])
    assert snap["mixed-version trajs"] == pytest.approx(0.2) and snap["KL stale"] == pytest.approx(0.03)
    assert snap["KL disc"] == pytest.approx(1e-5)
    assert rows["behavior"]["lag max"] != rows["behavior"]["lag max"]  # NaN: shown as '-', never a made-up 0
    _, markdown = write_report([tmp_path], tmp_path / "report")
    assert "## The regime: staleness and discrepancy each source saw" in markdown
    assert "| snapshot | 1.5 | 5 | 0.5 | 0.25 | 0.25 | 0 | 0 | 0.2 | 1e-05 | 0.03 |" in markdown
