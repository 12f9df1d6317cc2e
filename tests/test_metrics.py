"""The metric registry: names declared once, families matched, docs/metrics.md generated from it."""

from pathlib import Path

import pytest

from twofold import metrics as M


def test_families_match_their_members_only():
    assert M.declared("version/lag4plus_frac") == M.LAG_FRACTION
    assert M.declared(M.lag_fraction("0")) == "version/lag{bucket}_frac"
    assert M.declared("ray/engine2_requests") == M.RAY_ENGINE_REQUESTS
    assert M.declared("ray/engine_retried_requests") == M.RAY_ENGINE_RETRIED_REQUESTS  # exact name before a family
    assert M.declared("time/idle") == M.TIME_PART and M.declared("time/step") == M.STEP_SECONDS
    assert M.declared("version/lag/x_frac") is None and M.declared("ppo/clip_frac") is None


def test_counts_are_the_three_summed_metrics():
    assert {"discrepancy/catastrophic_seqs", "discrepancy/nonfinite_tokens", "loss/tokens"} == M.COUNT_METRICS


def test_a_name_cannot_be_declared_twice():
    with pytest.raises(ValueError, match="declared twice"):
        M._metric(M.SUCCESS_RATE, "again")


def test_docs_list_every_metric():
    docs = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
    assert docs.read_text() == M.markdown(), "regenerate: python -m twofold.metrics > docs/metrics.md"
