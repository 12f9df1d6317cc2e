"""Statistics over seeds, checked against intervals derived by hand, and the report sections built on them."""

import json
import math
import shutil

import pytest
import yaml
from conftest import small_config

from twofold import metrics as M
from twofold.config import dump_config
from twofold.study import confirm, report, stats
from twofold.study.report import (
    SECTIONS,
    Run,
    best_exact,
    format_cell,
    group_runs,
    load_runs,
    log_scale_with_zero,
    paired_table,
    pairings,
    ranking_table,
    recommendation,
    regime_table,
    source_table,
    write_report,
)
from twofold.study.stats import (
    Interval,
    PValues,
    collapse_step,
    fisher_collapses,
    holm,
    paired_differences,
    recovery_step,
    sign_flip_test,
    sign_test,
    smallest_two_sided_p,
    stuck_step,
    t_interval,
    tied_ranks,
)


def fields(iv: Interval) -> tuple[float, float, float]:
    return iv.mean, iv.low, iv.high


def test_t_interval_of_two_and_three_seeds():
    # [0.2, 0.4]: mean 0.3, s = 0.1414 (ddof 1), t_{1, 0.975} = 12.7062: half width 12.7062 * 0.1414 / sqrt(2) = 1.2706
    assert fields(t_interval([0.2, 0.4])) == pytest.approx((0.3, -0.97062, 1.57062), abs=1e-4)
    # [1, 2, 3]: mean 2, s = 1, t_{2, 0.975} = 4.3027: half width 4.3027 / sqrt(3) = 2.4841
    assert fields(t_interval([1.0, 2.0, 3.0, float("nan")])) == pytest.approx((2.0, -0.4841, 4.4841), abs=1e-4)
    assert t_interval([0.4]) == Interval(0.4, 0.4, 0.4) and t_interval([0.0, 0.0]) == Interval(0.0, 0.0, 0.0)


def test_paired_differences_use_the_seeds_both_have():
    # differences on seeds 0..3: 0, 0, 0, 0.4 -> mean 0.1, s = sqrt((3 * 0.01 + 0.09) / 3) = 0.2,
    # t_{3, 0.975} = 3.1824: half width 3.1824 * 0.2 / 2 = 0.3182
    ours = {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9, 9: 0.0}  # seed 9 has no reference: left out
    ref = {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.5}
    assert paired_differences(ours, ref) == pytest.approx([0.0, 0.0, 0.0, 0.4])
    assert fields(t_interval(paired_differences(ours, ref))) == pytest.approx((0.1, -0.2182, 0.4182), abs=1e-4)


def test_sign_flip_test_counts_sign_assignments():
    # d = 0.1, 0.2, -0.05, 0.3, 0.15: sum 0.7, sum |d| = 0.8. Negating a subset B of the |d| gives 0.8 - 2 sum(B),
    # >= 0.7 only for B = {} or {0.05}: 2 of 32 -> greater 0.0625. <= -0.7 needs sum(B) >= 0.75: the complements
    # of those two, so two-sided 4/32 = 0.125; less: every assignment but the all-positive one (sum 0.8), 31/32.
    assert sign_flip_test([0.1, 0.2, -0.05, 0.3, 0.15]) == PValues(2 / 32, 31 / 32, 4 / 32)
    # five differences of one sign: the floor of any exact paired test at 5 pairs, 2 / 2^5
    assert sign_flip_test([0.1, 0.2, 0.05, 0.3, 0.15]).two_sided == smallest_two_sided_p(5) == 0.0625
    assert sign_flip_test([]) == PValues(1.0, 1.0, 1.0) and smallest_two_sided_p(1) == 1.0


def test_sign_flip_test_draws_past_the_exact_limit_and_lands_near_the_exact_p(monkeypatch):
    monkeypatch.setattr(stats, "SIGN_FLIP_EXACT_MAX", 3)  # the 5-pair example now draws 2^16 assignments
    drawn = sign_flip_test([0.1, 0.2, -0.05, 0.3, 0.15])
    assert drawn.greater == pytest.approx(0.0625, abs=0.005) and drawn.two_sided == pytest.approx(0.125, abs=0.005)
    assert drawn == sign_flip_test([0.1, 0.2, -0.05, 0.3, 0.15])  # seeded: the same every time


def test_sign_test_against_binomial_half():
    # 4 positives of 5: P(K >= 4) = (5 + 1) / 32 = 0.1875, P(K <= 4) = 31/32, two-sided 2 * 0.1875 = 0.375
    assert sign_test([0.1, 0.2, -0.05, 0.3, 0.15]) == PValues(6 / 32, 31 / 32, 0.375)
    # the zero is dropped: 2 positives of 2, P(K >= 2) = 1/4, two-sided 1/2
    assert sign_test([0.1, 0.0, 0.2]) == PValues(0.25, 1.0, 0.5)
    assert sign_test([0.0, 0.0]) == PValues(1.0, 1.0, 1.0)


def test_holm_steps_down_over_the_family():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3 * 0.01 = 0.03; 2 * 0.03 = 0.06; 1 * 0.04 = 0.04, raised to 0.06 so the
    # adjusted values keep the order of the raw ones
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # a NaN is not a test: m = 2
    adjusted = holm([0.01, math.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.4, 0.6]) == [0.8, 0.8]  # 2 * 0.4, then max(0.8, 0.6)


def test_fisher_exact_test_of_collapse_counts():
    # 4 of 5 runs against 0 of 5: 4 collapses among 10 runs, the first row holding 5. P(X = 4) = C(4,4) C(6,1) /
    # C(10,5) = 6/252, and P(X = 0) = C(6,5) / 252 = 6/252 is as extreme: two-sided 12/252 = 0.0476
    assert fisher_collapses(4, 5, 0, 5) == PValues(pytest.approx(6 / 252), 1.0, pytest.approx(12 / 252))
    # 1 of 5 against 0 of 5: P(X = 1) = P(X = 0) = 126/252: the counts differ, the test cannot tell them apart
    assert fisher_collapses(1, 5, 0, 5).two_sided == pytest.approx(1.0)


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


def _table_and_pairings(path, margin=0.05):
    groups = group_runs([r for r in load_runs([path]) if not r.audit])
    found = pairings(groups, best_exact(groups))
    table = source_table(groups, [])
    return {r["source"]: r for r in table}, found, recommendation(table, found, margin)


def test_source_table_intervals_ranks_and_collapses(grid):
    table, found, advice = _table_and_pairings(grid)
    # snapshot seeds 0.5, 0.6, 0.5, 0.6: mean 0.55, s = sqrt(4 * 0.05^2 / 3) = 0.05774, t_{3, 0.975} = 3.1824:
    # half width 3.1824 * 0.05774 / 2 = 0.0919 -> [0.458, 0.642]. behavior (0.3, 0.4 x 2) gets [0.258, 0.442],
    # wholly under snapshot's and ewma's; recompute [0.058, 0.242], under behavior's too.
    assert table["snapshot"]["final success"] == pytest.approx(0.55)
    assert table["snapshot"]["final 95% t CI"] == "0.55 [0.458, 0.642]"
    assert table["behavior"]["final 95% t CI"] == "0.35 [0.258, 0.442]"
    assert {s: table[s]["rank"] for s in table} == {"snapshot": 1, "ewma": 1, "behavior": 3, "recompute": 4}
    assert table["recompute"]["collapsed"] == "1/4 (seed 0 at step 4, stopped answering)"
    assert table["behavior"]["collapsed"] == "1/4 (seed 1 at step 4, stopped answering, answering again from step 5)"
    assert table["ewma"]["collapsed"] == "0/4"
    assert table["recompute"]["ended collapsed"] == 1 and table["behavior"]["ended collapsed"] == 0
    # behavior's one collapse came back, recompute's did not: the paragraph names them apart
    assert "Collapsed runs: recompute (" in advice
    assert "Collapsed and answering again at the end (every collapsed run came back): behavior." in advice
    # 1 of 4 against snapshot's 0 of 4: P(X = 1) = P(X = 0) = 35/70, two-sided p 1
    assert (
        "Runs ending collapsed against snapshot's 0/4 (Fisher's exact test, two-sided): recompute 1/4 (p 1," in advice
    )


def test_nothing_cheaper_non_inferior_recommends_the_exact_source(grid):
    # Cheapest first: behavior (1.9 s/step) is 0.2 behind snapshot on every seed: a point interval at -0.2.
    # Then ewma and recompute (2.0 s/step; recompute holds no memory): recompute ends collapsed on seed 0,
    # 1/4 against snapshot's 0/4. Then ewma (5 MB): differences 0, -0.1, +0.1, 0, mean 0, s = 0.08165,
    # 0 +- 3.1824 * 0.08165 / 2 = [-0.13, +0.13]: not above -0.05. That leaves snapshot.
    table, found, advice = _table_and_pairings(grid)
    assert best_exact(group_runs(load_runs([grid]))).label == "snapshot"
    assert advice.startswith("Recommended: snapshot, by the exact-source rule: no cheaper source passes")
    assert (
        "behavior (paired lower bound -0.2, not above -0.05); recompute (more runs ending collapsed: 1/4 against "
        "0/4); ewma (paired lower bound -0.13, not above -0.05)."
    ) in advice
    rows = {r["source"]: r for r in paired_table(found)}
    assert rows["snapshot"]["non-inferior (margin 0.05)"] == "reference"
    assert rows["ewma"]["non-inferior (margin 0.05)"] == "no: paired lower bound -0.13, not above -0.05"
    assert format_cell("vs reference, 95% t CI", rows["behavior"]["vs reference, 95% t CI"]) == "-0.2 [-0.2, -0.2]"
    # recompute is paired on the 3 seeds where neither run ended collapsed (seed 0 is left out): -0.4 on each
    assert rows["recompute"]["pairs"] == 3 and rows["recompute"]["ended collapsed"] == "1/4"
    assert format_cell("", rows["recompute"]["success if not collapsed, 95% t CI"]).startswith("0.167 [")
    # sign-flip p: behavior's 4 pairs of one sign give the floor, 2/2^4 = 0.125; recompute's 3, 2/2^3 = 0.25;
    # ewma's differences sum to 0, which every assignment's |S| reaches: 1. Holm over the three:
    # 3 * 0.125 = 0.375, 2 * 0.25 = 0.5, 1 * 1 = 1
    assert rows["behavior"]["sign-flip p"] == rows["behavior"]["smallest p"] == 0.125
    assert rows["recompute"]["sign-flip p"] == 0.25 and rows["ewma"]["sign-flip p"] == 1.0
    assert [rows[s]["sign-flip Holm"] for s in ("behavior", "recompute", "ewma")] == pytest.approx([0.375, 0.5, 1.0])
    assert (
        "Paired on the seeds where neither run ended collapsed: behind it, behavior (-0.2 [-0.2, -0.2] on 4" in advice
    )
    assert "With 4 pairs no exact paired test can give a two-sided p under 2/2^4 = 0.125" in advice


@pytest.mark.parametrize(
    ("case", "margin", "recommended"),
    [
        ("within margin", 0.05, "behavior"),
        ("within margin, one more collapse", 0.05, "snapshot"),
        ("0.1 behind", 0.05, "snapshot"),
        ("0.1 behind", 0.15, "behavior"),
    ],
)
def test_non_inferiority_picks_the_cheapest_source_within_the_margin(tmp_path, case, margin, recommended):
    # snapshot: 2.2 s/step, 10 MB; behavior: 2.0 s/step, no memory: behavior is cheaper.
    snapshot = [0.5, 0.6, 0.55, 0.45, 0.5]
    behind = {
        "within margin": [0.01, -0.01, 0.02, 0.0, 0.03],
        "within margin, one more collapse": [0.01, -0.01, 0.02, 0.0, 0.03],
        "0.1 behind": [-0.1] * 5,
    }[case]
    for seed, (s, d) in enumerate(zip(snapshot, behind, strict=True)):
        fake_run(tmp_path / f"snapshot-seed{seed}", "snapshot", seed, s, 2.2, peak_bytes=2**20 * 10)
        valid = [1.0, 1.0, 0.2, 0.2, 0.2, 0.2] if case.endswith("collapse") and seed == 4 else None
        fake_run(tmp_path / f"behavior-seed{seed}", "behavior", seed, s + d, 2.0, valid=valid)
    _, found, advice = _table_and_pairings(tmp_path, margin)
    assert advice.startswith(f"Recommended: {recommended}, by ")
    behavior = next(p for p in found if p.label == "behavior")
    if case == "within margin":
        # d = 0.01, -0.01, 0.02, 0, 0.03: mean 0.01, s = sqrt(0.001 / 4) = 0.01581, t_{4, 0.975} = 2.7764:
        # 0.01 +- 2.7764 * 0.01581 / sqrt(5) = [-0.0096, +0.0296], above -0.05
        assert fields(behavior.difference) == pytest.approx((0.01, -0.0096, 0.0296), abs=1e-4)
        assert "Recommended: behavior, by non-inferiority (margin 0.05) to snapshot, the best exact source" in advice
        assert "behavior: +0.01 [-0.00963, +0.0296] on 5 seeds, 0/5 runs ending collapsed against 0/5." in advice
    elif case.endswith("collapse"):
        # the 4 seeds left (0.01, -0.01, 0.02, 0) are within the margin; the collapse alone rules behavior out
        assert behavior.difference.low > -0.05 and len(behavior.differences) == 4
        assert "by the exact-source rule" in advice
        assert "behavior (more runs ending collapsed: 1/5 against 0/5)" in advice
    elif margin == 0.05:
        assert "by the exact-source rule" in advice and "behavior (paired lower bound -0.1, not above -0.05)" in advice
    else:
        assert "Recommended: behavior, by non-inferiority (margin 0.15)" in advice
        assert "With 5 pairs no exact paired test can give a two-sided p under 2/2^5 = 0.0625:" in advice


def test_paired_seeds_separate_sources_whose_own_intervals_overlap(tmp_path):
    # Seed difficulty moves both sources alike: snapshot 0.3, 0.5, 0.7 and ewma 0.34, 0.56, 0.75. Own t
    # intervals (t_2 = 4.303): snapshot 0.5 +- 4.303 * 0.2 / sqrt(3) = [0.003, 0.997] overlaps ewma's, so both
    # rank 1. Paired: differences 0.04, 0.06, 0.05, mean 0.05, s = 0.01, 0.05 +- 4.303 * 0.01 / sqrt(3)
    # = [0.0252, 0.0748], above 0.
    for source, values in (("snapshot", [0.3, 0.5, 0.7]), ("ewma", [0.34, 0.56, 0.75])):
        for seed, success in enumerate(values):
            fake_run(tmp_path / f"{source}-seed{seed}", source, seed, success, 2.0)
    table, found, advice = _table_and_pairings(tmp_path)
    assert table["snapshot"]["rank"] == table["ewma"]["rank"] == 1
    diff = next(p for p in found if p.label == "ewma").difference
    assert (diff.mean, diff.low, diff.high) == pytest.approx((0.05, 0.0252, 0.0748), abs=1e-4)
    # three positive differences: sign-flip p 2/8 = 0.25 (the floor at 3 pairs), one test so Holm changes nothing
    assert "ahead of snapshot, ewma (+0.05 [+0.0252, +0.0748] on 3 pairs, sign-flip p 0.25, Holm 0.25)." in advice
    # equally cheap (2 s/step, no memory, no old-logit work): the higher mean success, ewma's, comes first
    assert advice.startswith("Recommended: ewma, by non-inferiority (margin 0.05)")


def test_sources_with_one_seed_are_neither_ranked_nor_recommended(tmp_path):
    # snapshot: 2 seeds (0.4, 0.6); recompute: 1 seed at 0.9, a point "interval" wholly above snapshot's
    # [0.4, 0.6]: ranking it would put snapshot second on one run's luck
    for source, values, seconds in (("snapshot", [0.4, 0.6], 2.0), ("recompute", [0.9], 1.0)):
        for seed, success in enumerate(values):
            fake_run(tmp_path / f"{source}-seed{seed}", source, seed, success, seconds)
    table, found, advice = _table_and_pairings(tmp_path)
    assert table["snapshot"]["rank"] == 1 and table["recompute"]["rank"] != table["recompute"]["rank"]  # NaN
    rows = {r["source"]: r for r in paired_table(found)}
    assert rows["recompute"]["vs reference, 95% t CI"] == "+0.5 (1 pair, no interval)"  # 0.9 - 0.4 on seed 0
    assert advice.startswith("Recommended: snapshot, by non-inferiority (margin 0.05): snapshot, the best exact ")
    assert "Not ranked (fewer than 2 seeds): recompute" in advice
    ranking = [r["source"] for r in ranking_table(list(table.values()))]
    assert ranking == ["snapshot", "recompute"]  # unranked last although its one run scored higher
    for path in tmp_path.glob("snapshot-seed1"):
        shutil.rmtree(path)
    _, found, advice = _table_and_pairings(tmp_path)
    assert found == [] and advice.startswith("No source has 2 finished seeds yet")  # 1 snapshot seed: no reference


@pytest.mark.parametrize("snapshot_seconds", [(2.0, 2.0), (2.0, 2.4)])
def test_the_cheapest_tied_source_is_fastest_unless_times_overlap_then_least_memory(tmp_path, snapshot_seconds):
    # snapshot and behavior tie on success (0.5, 0.6 each). behavior: 2.4 s/step on both seeds, 0 MB;
    # snapshot: 10 MB, and either 2.0 s on both seeds (a point interval under behavior's: faster, picked) or
    # 2.0 and 2.4 s: mean 2.2, s = 0.2828, t_1 = 12.706 -> 2.2 +- 12.706 * 0.2828 / sqrt(2) = [-0.341, 4.74],
    # overlapping behavior's 2.4: equally fast, and behavior's smaller memory decides
    for source, seconds, mb in (("snapshot", snapshot_seconds, 10), ("behavior", (2.4, 2.4), 0)):
        for seed, success in enumerate((0.5, 0.6)):
            fake_run(tmp_path / f"{source}-seed{seed}", source, seed, success, seconds[seed], peak_bytes=2**20 * mb)
    table, _, advice = _table_and_pairings(tmp_path)
    if snapshot_seconds == (2.0, 2.0):
        assert format_cell("", table["snapshot"]["s/step 95% t CI"]) == "2 [2, 2]"
        assert "Recommended: snapshot" in advice and "overlap at 95%" not in advice
    else:
        assert format_cell("", table["snapshot"]["s/step 95% t CI"]) == "2.2 [-0.341, 4.74]"
        assert "Recommended: behavior, by non-inferiority" in advice  # equal success on both seeds: difference 0
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
    table, found, advice = _table_and_pairings(tmp_path)
    assert table["behavior"]["rank"] == table["recompute"]["rank"] == 1
    negligible = recompute_work < 1e-3
    # no exact source to pair against: the cheapest of the best tied group, and the summary says so
    assert found == [] and f"Recommended: {'recompute' if negligible else 'behavior'}, by the tied-group rule" in advice
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
    assert "Collapsed runs: recompute" in recommendation([row], [])


def test_report_shows_every_statistics_section(grid):
    html_path, markdown = write_report([grid], grid / "report")
    page = html_path.read_text()
    for section in ("recommendation", "learning-curves", "audit"):
        assert f'id="{section}"' in page
    assert "Recommended: snapshot, by the exact-source rule" in markdown
    assert "final 95% t CI" in markdown and "### Collapses and paired comparisons against snapshot" in markdown
    assert "bootstrap" not in markdown and "bootstrap" not in page
    assert (grid / "report" / "audit_error_vs_lag.png").exists()
    assert (grid / "report" / "curves_step.png").exists()


def test_held_out_success_is_tabled_and_paired_against_the_reference(grid):
    scores = {"snapshot": [0.50, 0.60, 0.55, 0.65], "recompute": [0.30, 0.45, 0.50, 0.40], "ewma": [0.55, 0.55]}
    for source, values in scores.items():  # behavior is not scored; ewma only on seeds 0 and 1
        for seed, v in enumerate(values):
            (grid / f"{source}-seed{seed}" / "heldout.json").write_text(json.dumps({"success_rate": v}))
    table, _, _ = _table_and_pairings(grid)
    # snapshot: mean 0.575, deviations +-0.075, +-0.025: s = sqrt(0.0125 / 3) = 0.06455, half 3.1824 * s / 2 = 0.1027
    assert table["snapshot"]["held-out 95% t CI"] == "0.575 [0.472, 0.678]"
    assert table["ewma"]["held-out 95% t CI"] == "0.55 [0.55, 0.55] (2 of 4 scored)"  # two equal scores: a point
    assert table["behavior"]["held-out 95% t CI"] == "-"
    groups = group_runs([r for r in load_runs([grid]) if not r.audit])
    rows = {r["source"]: r for r in report.heldout_pairs(groups, best_exact(groups))}
    assert set(rows) == {"ewma", "behavior", "recompute"}  # the reference is not paired with itself
    # recompute - snapshot: -0.20, -0.15, -0.05, -0.25: mean -0.1625, s = sqrt(0.021875 / 3) = 0.08539, half
    # 3.1824 * s / 2 = 0.1359; every sign negative: 2 of 16 sign assignments as extreme, p 0.125
    diff = rows["recompute"]["vs reference, held out, 95% t CI"]
    assert (diff.mean, diff.low, diff.high) == pytest.approx((-0.1625, -0.2984, -0.0266), abs=1e-4)
    assert rows["recompute"]["sign-flip p"] == pytest.approx(0.125)
    # ewma - snapshot: +0.05, -0.05: every assignment's |sum| >= 0, p 1; Holm over {0.125, 1}: 0.25 and 1
    assert rows["ewma"]["pairs"] == 2 and rows["ewma"]["sign-flip p"] == pytest.approx(1.0)
    assert rows["recompute"]["sign-flip Holm"] == pytest.approx(0.25) and rows["ewma"]["sign-flip Holm"] == 1.0
    assert rows["behavior"]["pairs"] == 0 and math.isnan(rows["behavior"]["sign-flip p"])
    _, markdown = write_report([grid], grid / "report")
    assert "### Held-out success paired against snapshot" in markdown
    assert "| recompute | 4 | -0.163 [-0.298, -0.0266] | 0.125 | 0.25 | 0.125 |" in markdown


def test_a_report_of_unscored_runs_has_no_held_out_pairing(grid):
    _, markdown = write_report([grid], grid / "report")
    assert "Held-out success paired" not in markdown and "held-out 95% t CI" not in markdown.split("###")[0]
    groups = group_runs([r for r in load_runs([grid]) if not r.audit])
    assert report.heldout_pairs(groups, best_exact(groups)) == []


def test_held_out_scores_of_other_tasks_or_of_an_earlier_step_are_not_paired(grid):
    def score(cell, success, eval_seed=1000, step=6):
        record = {"success_rate": success, "eval_seed": eval_seed, "episodes_requested": 64, "checkpoint_step": step}
        (grid / cell / "heldout.json").write_text(json.dumps(record))

    for seed in range(4):
        score(f"snapshot-seed{seed}", 0.5)
        (grid / f"snapshot-seed{seed}" / "summary.json").write_text(json.dumps({"steps": 6, "finished": True}))
    score("recompute-seed0", 0.3)
    score("recompute-seed1", 0.4)
    score("recompute-seed2", 0.9, eval_seed=7)  # other tasks than the reference's
    score("recompute-seed3", 0.9)
    # seed 3's score is of step 4 of a run that went on to step 6: not its final checkpoint's
    (grid / "snapshot-seed3" / "heldout.json").write_text(
        json.dumps({"success_rate": 0.5, "eval_seed": 1000, "episodes_requested": 64, "checkpoint_step": 4})
    )
    groups = group_runs([r for r in load_runs([grid]) if not r.audit])
    rows = {r["source"]: r for r in report.heldout_pairs(groups, best_exact(groups))}
    assert rows["recompute"]["pairs"] == 2  # seeds 0 and 1: -0.2, -0.1
    assert rows["recompute"]["vs reference, held out, 95% t CI"].mean == pytest.approx(-0.15)


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


def test_stale_dropped_groups_and_mean_lag_per_source(tmp_path):
    # the counter is cumulative ("so far"): a run's count is its last value, not the sum over steps
    run = Run(tmp_path, {}, [{"rollout/stale_dropped_groups": v} for v in (1.0, 3.0, 4.0)])
    assert run.stale_dropped_groups() == 4.0
    for seed, (dropped, lag) in enumerate([(61, 4.0), (84, 6.0)]):
        regime = {"rollout/stale_dropped_groups": dropped, "version/staleness_mean": lag}
        fake_run(tmp_path / f"behavior-seed{seed}", "behavior", seed, 0.5, 2.0, regime=regime)
        regime = {"rollout/stale_dropped_groups": 5, "version/staleness_mean": 7.0}
        fake_run(tmp_path / f"snapshot-seed{seed}", "snapshot", seed, 0.5, 2.0, regime=regime)
    fake_run(tmp_path / "ewma-seed0", "ewma", 0, 0.5, 2.0)  # logged neither
    table, _, advice = _table_and_pairings(tmp_path)
    # behavior: (61 + 84) / 2 = 72.5 per run, 61-84 over seeds; lag (4 + 6) / 2 = 5. snapshot: 5 on both seeds.
    assert table["behavior"]["stale-dropped/run"] == "72.5 (61-84)" and table["behavior"]["lag mean"] == 5.0
    assert table["snapshot"]["stale-dropped/run"] == "5" and table["snapshot"]["lag mean"] == 7.0
    assert table["ewma"]["stale-dropped/run"] == "-" and math.isnan(table["ewma"]["lag mean"])
    ranking = ranking_table(list(table.values()))
    assert {"lag mean", "stale-dropped/run"} <= set(ranking[0])
    assert "(stale-dropped groups per run: behavior 72.5 (61-84), snapshot 5)" in advice


def test_bands_and_intervals_say_what_they_are(tmp_path):
    # the curve bands are t intervals per step: at a step where the two seeds score 0.2 and 0.4, the band is
    # 0.3 +- 12.7062 * 0.1414 / sqrt(2) = [-0.9706, 1.5706] (t_1: two seeds say little), not a bootstrap's [0.2, 0.4]
    fake_run(tmp_path / "snapshot-seed0", "snapshot", 0, 0.2, 2.0)
    fake_run(tmp_path / "snapshot-seed1", "snapshot", 1, 0.4, 2.0)
    (group,) = group_runs(load_runs([tmp_path]))
    assert fields(group.mean_curve("reward/mean")[2]) == pytest.approx((0.3, -0.97062, 1.57062), abs=1e-4)
    assert fields(group.mean_curve("success/rate")[2]) == pytest.approx((0.3, 0.0, 1.0))  # a share: cut to [0, 1]
    title = SECTIONS["learning-curves"]
    assert "t band" in title and "nominal 95%" in title and "covers less" in title and "bootstrap" not in title
    (row,) = source_table([group], [])
    assert {"final 95% t CI", "best 95% t CI", "s/step 95% t CI"} <= set(row)
    advice = recommendation([row], pairings([group], best_exact([group])))
    assert "Intervals are Student t over seeds at nominal 95%; with few seeds, and runs that collapse" in advice


def _confirm_cell(grid, name, heldout=None, stream=None, steps=60):
    """A cell folder with a held-out success (heldout.json) and/or a constant training-stream success."""
    cell = grid / name
    cell.mkdir(parents=True)
    if heldout is not None:
        (cell / "heldout.json").write_text(json.dumps({"success_rate": heldout}))
    if stream is not None:
        rows = [{"step": i, "success/rate": stream} for i in range(1, steps + 1)]
        (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_confirmation_family_one_sided_sign_flip_tests_with_holm(tmp_path):
    grids = {g: tmp_path / g for g in confirm.GRIDS}
    for s in range(5, 15):
        # H1: snapshot 0.30, recompute 0.20 on every seed: 10 positive differences, and of the 2^10 sign
        # assignments only the observed one reaches its sum: p = 1/1024.
        _confirm_cell(grids["tooluse"], f"snapshot-seed{s}", heldout=0.30)
        _confirm_cell(grids["tooluse"], f"recompute-seed{s}", heldout=0.20)
        # H2: +0.10 on nine seeds, -0.05 on seed 5 (sum 0.85): the observed signs and all-plus (0.95) reach it,
        # flipping any 0.10 gives 0.75: p = 2/1024.
        _confirm_cell(grids["stale"], f"snapshot-seed{s}", heldout=0.40)
        _confirm_cell(grids["stale"], f"recompute-seed{s}", heldout=0.45 if s == 5 else 0.30)
        # H3: ewma 0.02 below snapshot, inside the margin 0.05: shifted differences all +0.03, p = 1/1024.
        _confirm_cell(grids["stale"], f"ewma-seed{s}", heldout=0.38)
        # H4: without the reset rule +0.01 on seeds 5-9, -0.01 on 10-13, seed 14 never evaluated: 9 pairs of
        # equal size, sum +0.01, reached by the assignments with 5 or more plus signs: 256/512 = 0.5.
        if s < 14:
            _confirm_cell(grids["stale_noreset"], f"ewma-seed{s}", heldout=0.39 if s < 10 else 0.37)
    _confirm_cell(grids["stale"], "ewma-seed5-audit", heldout=0.0)  # an audit cell is not an arm

    results = confirm.analyse(grids, confirm.heldout_success)
    assert [r.p for r in results] == pytest.approx([1 / 1024, 2 / 1024, 1 / 1024, 0.5])
    # Holm: sorted 1/1024, 1/1024, 2/1024, 0.5 -> 4/1024, max(3/1024, 4/1024), max(4/1024, 4/1024), 0.5
    assert [r.p_holm for r in results] == pytest.approx([4 / 1024, 4 / 1024, 4 / 1024, 0.5])
    assert [r.rejected for r in results] == [True, True, True, False]
    assert [len(r.seeds) for r in results] == [10, 10, 10, 9] and results[3].missing == (14,)
    assert results[2].differences == pytest.approx([-0.02] * 10)  # reported unshifted
    table = confirm.results_table(results)
    assert "| H4: ewma without the reset rule > ewma with it, FrozenLake (b) | 9 | 14 |" in table


def test_exploratory_arms_are_two_sided_unadjusted_over_seeds_5_to_9(tmp_path):
    grids = {g: tmp_path / g for g in ("stale", "stale_noreset", "stale_cooldown")}
    for s in range(5, 15):
        _confirm_cell(grids["stale"], f"ewma-seed{s}", heldout=0.30)  # seeds 10-14 are no exploratory pair
    for s in range(5, 10):
        _confirm_cell(grids["stale_cooldown"], f"ewma-seed{s}", heldout=0.40)
        _confirm_cell(grids["stale_noreset"], f"ewma-seed{s}", heldout=0.44 if s == 9 else 0.38)
    results = {(r.hypothesis.name, r.hypothesis.other.grid): r for r in confirm.explore(grids, confirm.heldout_success)}
    # only the comparisons whose grids are given: E1 (both arms in "stale", none run) and E4's two
    assert set(results) == {("E1", "stale"), ("E4", "stale"), ("E4", "stale_noreset")}
    reset, noreset = results[("E4", "stale")], results[("E4", "stale_noreset")]
    # five differences of +0.10: of 32 sign assignments, all-plus and all-minus reach |sum| 0.5: p = 2/32
    assert reset.seeds == (5, 6, 7, 8, 9) and reset.p == pytest.approx(2 / 32)
    # +0.02 on seeds 5-8, -0.04 on seed 9, sum +0.04: with S = 0.02 (sum of four signs) + 0.04 e9, |S| >= 0.04 in
    # 12 of the 16 assignments for each sign of e9: p = 24/32
    assert noreset.differences == pytest.approx([0.02, 0.02, 0.02, 0.02, -0.04]) and noreset.p == pytest.approx(0.75)
    unrun = [r for r in confirm.explore(grids, confirm.heldout_success) if r.hypothesis.name == "E1"]
    assert all(r.seeds == () and r.missing == (5, 6, 7, 8, 9) and r.p == 1.0 for r in unrun)
    table = confirm.exploratory_table([reset])
    assert "| E4 | ewma with a cool-down (k = 8) - with the reset rule | 5 | none | +0.100 [" in table


def test_secondary_endpoint_is_the_mean_over_steps_21_to_60_of_finished_runs(tmp_path):
    _confirm_cell(tmp_path, "a", stream=0.0)
    rows = [{"step": i, "success/rate": 1.0 if 21 <= i <= 40 else 0.0} for i in range(1, 61)]
    (tmp_path / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert confirm.stream_success(tmp_path / "a") == pytest.approx(20 / 40)
    _confirm_cell(tmp_path, "b", stream=0.5, steps=59)  # not finished: no value
    assert confirm.stream_success(tmp_path / "b") is None


def _described_cell(grid, name, seed, valid, success, lag, dropped):
    """A cell with a config and 30 steps of the metrics the descriptive table reads."""
    cell = grid / name
    cell.mkdir(parents=True)
    config = {"seed": seed, "mode": "async", "max_staleness": 8, "oldlogits": {"source": name.split("-")[0]}}
    (cell / "config.yaml").write_text(json.dumps(config))
    rows = [
        {
            "step": i,
            M.SUCCESS_RATE: success(i),
            M.FORMAT_OK_RATE: valid(i),
            M.STALENESS_MEAN: lag,
            M.STALE_DROPPED_GROUPS: dropped * i / 30,
        }
        for i in range(1, 31)
    ]
    (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_confirmation_describes_collapses_lag_and_drops_per_arm(tmp_path):
    grids = {g: tmp_path / g for g in confirm.GRIDS}
    for s in (5, 6, 7):
        # snapshot: answers every step, succeeds half the time, lag 1, 3 groups dropped (seed 7: 6)
        _described_cell(grids["tooluse"], f"snapshot-seed{s}", s, lambda i: 1.0, lambda i: 0.5, 1.0, 6 if s == 7 else 3)
        # recompute: stops answering after step 10 and never recovers on every seed, lag 2, nothing dropped
        _described_cell(
            grids["tooluse"], f"recompute-seed{s}", s, lambda i: 1.0 if i <= 10 else 0.0, lambda i: 0.0, 2.0, 0
        )
    _described_cell(grids["tooluse"], "snapshot-seed20", 20, lambda i: 0.0, lambda i: 0.0, 9.0, 9)  # not registered
    table = confirm.descriptive_table(grids, confirm.FAMILY[:1])
    # Fisher's exact test on [[0, 3], [3, 0]]: each extreme table has probability 1 / C(6, 3) = 1/20; two-sided 2/20
    assert "| H1 | snapshot (tooluse) | 3 | 0 | 0.1 | 1.00 | 4 (3-6) |" in table
    assert "|  | recompute (tooluse) | 3 | 3 |  | 2.00 | 0 |" in table


def test_confirmation_refuses_a_missing_grid_folder(tmp_path, capsys):
    grids = [tmp_path / g for g in ("tooluse", "stale")]
    for g in grids:
        g.mkdir()
    with pytest.raises(SystemExit):
        confirm.main(["--tooluse", str(grids[0]), "--stale", str(grids[1]), "--stale-noreset", str(tmp_path / "no")])
    assert "--stale-noreset: no grid folder at" in capsys.readouterr().err
    assert confirm.arm_values(tmp_path / "no", "ewma", confirm.heldout_success) == {}  # called directly: no arm
