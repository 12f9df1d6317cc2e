import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twofold.config import LossConfig
from twofold.loss import aggregate, decoupled_ppo_loss, discrepancy_correction

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


# --------------------------------------------------------------------------- discrepancy


def test_token_tis_caps_ratio_at_two():
    old = T([[0.5, -0.5, 1.0]])
    beh = torch.zeros(1, 3)
    w, keep, m = discrepancy_correction(old, beh, torch.ones(1, 3), level="token", action="truncate", low=0.5, high=2.0)
    # exp(0.5)=1.6487 inside, exp(-0.5)=0.6065 inside, exp(1)=2.718 -> 2
    assert close(w, [[math.exp(0.5), math.exp(-0.5), 2.0]])
    assert close(keep, [[1, 1, 1]])
    assert m["discrepancy/trunc_frac"] == pytest.approx(1 / 3)


def test_token_mask_drops_out_of_band_tokens_and_keeps_ratio_as_weight():
    old = T([[0.5, -1.0, 1.0, 0.0]])
    beh = torch.zeros(1, 4)
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    w, keep, m = discrepancy_correction(old, beh, mask, level="token", action="mask", low=0.5, high=2.0)
    # exp(-1)=0.37 < 0.5 and exp(1)=2.72 > 2 are dropped; the padding token is never kept
    assert close(keep, [[1, 0, 0, 0]])
    assert close(w, [[math.exp(0.5), 0, 0, 0]])
    assert m["discrepancy/mask_frac"] == pytest.approx(2 / 3)


def test_sequence_vs_geometric_mask_on_two_sequences():
    # seq 0: log r = [0.3, 0.3, 0.3] -> sum 0.9 (r=2.46, out of [0.5,2]); mean 0.3 (r=1.35, in)
    # seq 1: log r = [0.9, -0.9, 0 (pad)] -> sum 0 (r=1, in); mean 0 (in)
    old = T([[0.3, 0.3, 0.3], [0.9, -0.9, 5.0]])
    beh = torch.zeros(2, 3)
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    _, keep_seq, _ = discrepancy_correction(old, beh, mask, level="sequence", action="mask", low=0.5, high=2.0)
    w_geo, keep_geo, _ = discrepancy_correction(old, beh, mask, level="geometric", action="mask", low=0.5, high=2.0)
    assert close(keep_seq, [[0, 0, 0], [1, 1, 0]])
    assert close(keep_geo, [[1, 1, 1], [1, 1, 0]])
    assert close(w_geo, [[math.exp(0.3)] * 3, [1.0, 1.0, 0.0]])
    # a tight geometric band [0.999, 1.001] drops seq 0 too
    _, keep_tight, _ = discrepancy_correction(old, beh, mask, level="geometric", action="mask", low=0.999, high=1.001)
    assert close(keep_tight, [[0, 0, 0], [1, 1, 0]])


def test_catastrophic_veto_drops_whole_sequence():
    old = T([[0.0, math.log(1e-5), 0.0], [0.0, 0.0, 0.0]])
    beh = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    w, keep, m = discrepancy_correction(old, beh, mask, action="truncate", low=0.5, high=2.0, catastrophic=1e-4)
    assert close(keep, [[0, 0, 0], [1, 1, 1]])
    assert close(w, [[0, 0, 0], [1, 1, 1]])
    assert m["discrepancy/catastrophic_seqs"] == 1


def test_low_zero_is_one_sided_truncation():
    # log r = [-3, 0.5, 1]: r = [0.05, 1.65, 2.72]; no lower bound, cap at 2 -> [0.05, 1.65, 2]
    old = T([[-3.0, 0.5, 1.0]])
    beh = torch.zeros(1, 3)
    w, keep, m = discrepancy_correction(old, beh, torch.ones(1, 3), action="truncate", low=0.0, high=2.0)
    assert close(w, [[math.exp(-3.0), math.exp(0.5), 2.0]]) and close(keep, [[1, 1, 1]])
    assert m["discrepancy/trunc_frac"] == pytest.approx(1 / 3)
    # mask keeps r <= 2 however small
    w, keep, _ = discrepancy_correction(old, beh, torch.ones(1, 3), action="mask", low=0.0, high=2.0)
    assert close(keep, [[1, 1, 0]]) and close(w, [[math.exp(-3.0), math.exp(0.5), 0.0]])
    w, keep, _ = discrepancy_correction(old, beh, torch.ones(1, 3), action="none", low=0.0, high=2.0)
    assert close(w, [[1, 1, 1]])


def test_catastrophic_threshold_below_the_clamp_still_fires():
    # 1e-10 = exp(-23.0): a token at log r = -25 is vetoed although log-ratios are clamped at -20;
    # one at log r = -21 (r = 7.6e-10 > 1e-10) is not
    old = T([[0.0, -25.0], [0.0, -21.0]])
    w, keep, m = discrepancy_correction(
        old, torch.zeros(2, 2), torch.ones(2, 2), action="truncate", low=0.0, high=2.0, catastrophic=1e-10
    )
    assert close(keep, [[0, 0], [1, 1]]) and m["discrepancy/catastrophic_seqs"] == 1


def test_action_none_gives_unit_weights():
    w, keep, _ = discrepancy_correction(T([[3.0]]), T([[0.0]]), T([[1.0]]), action="none")
    assert close(w, [[1.0]]) and close(keep, [[1.0]])


def test_impossible_behavior_token_is_rejected_without_nan_and_counted():
    old = T([[-1.0, -1.0]])
    beh = T([[-1.0, -math.inf]])
    w, keep, m = discrepancy_correction(old, beh, torch.ones(1, 2), action="mask")
    assert torch.isfinite(w).all()
    assert close(keep, [[1, 0]])
    assert m["discrepancy/nonfinite_tokens"] == 1
    w, keep, _ = discrepancy_correction(old, beh, torch.ones(1, 2), action="truncate", high=2.0)
    assert close(w, [[1.0, 2.0]])


# --------------------------------------------------------------------------- PPO surrogate


def cfg(**kw):
    base = dict(discrepancy_action="none", catastrophic=None, eps_low=0.2, eps_high=0.2, dual_clip=None)
    base.update(kw)
    return LossConfig(**base)


def test_ppo_clip_positive_advantage_caps_at_one_plus_eps():
    # r_s = 1.5 with A = 1: min(1.5, 1.2) = 1.2 -> loss -1.2, no gradient
    lp = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, m = decoupled_ppo_loss(lp, torch.zeros(1, 1), torch.zeros(1, 1), T([[1.0]]), T([[1.0]]), cfg())
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert lp.grad.item() == 0.0
    assert m["ppo/clip_frac_high"] == 1.0 and m["ppo/active_token_ratio"] == 0.0


def test_ppo_clip_negative_advantage_below_one_minus_eps():
    # r_s = 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped low
    lp = torch.full((1, 1), math.log(0.5), requires_grad=True)
    loss, m = decoupled_ppo_loss(lp, torch.zeros(1, 1), torch.zeros(1, 1), T([[-1.0]]), T([[1.0]]), cfg())
    assert loss.item() == pytest.approx(0.8)
    assert m["ppo/clip_frac_low"] == 1.0


def test_dual_clip_bounds_negative_advantage_surrogate():
    # r_s = 5, A = -1: PPO gives min(-5, -1.2) = -5; dual clip c=3 gives max(-5, -3) = -3 -> loss 3
    lp = torch.full((1, 1), math.log(5.0), requires_grad=True)
    loss, m = decoupled_ppo_loss(lp, torch.zeros(1, 1), torch.zeros(1, 1), T([[-1.0]]), T([[1.0]]), cfg(dual_clip=3.0))
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    assert lp.grad.item() == 0.0
    assert m["ppo/dual_clip_frac"] == 1.0
    loss_nodual, _ = decoupled_ppo_loss(lp, torch.zeros(1, 1), torch.zeros(1, 1), T([[-1.0]]), T([[1.0]]), cfg())
    assert loss_nodual.item() == pytest.approx(5.0)


def test_discrepancy_weight_multiplies_surrogate():
    # r_d = exp(0.5) = 1.6487 (inside [0.5, 2]); logprobs == old so r_s = 1; A = 2 -> loss = -1.6487 * 2
    loss, _ = decoupled_ppo_loss(
        torch.full((1, 1), 0.5),
        torch.full((1, 1), 0.5),
        torch.zeros(1, 1),
        T([[2.0]]),
        T([[1.0]]),
        cfg(discrepancy_action="truncate"),
    )
    assert loss.item() == pytest.approx(-2 * math.exp(0.5), rel=1e-6)


def test_masked_token_does_not_upweight_the_rest():
    # two tokens, A = 1, r_s = 1; token 2 has r_d = e (masked out). token-mean: -(1*1 + 0)/2 = -0.5
    loss, m = decoupled_ppo_loss(
        torch.zeros(1, 2),
        T([[0.0, 1.0]]),
        torch.zeros(1, 2),
        T([[1.0, 1.0]]),
        T([[1.0, 1.0]]),
        cfg(discrepancy_action="mask"),
    )
    assert loss.item() == pytest.approx(-0.5)
    assert m["ppo/active_token_ratio"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "mode,expected",
    [
        # per-token losses l = -A: seq0 = [-1, -2, -3] (3 tokens), seq1 = [-4, 0(pad)]
        ("token-mean", -(1 + 2 + 3 + 4) / 4),
        ("seq-mean-token-sum", -((1 + 2 + 3) + 4) / 2),
        ("seq-mean-token-mean", -((6 / 3) + 4 / 1) / 2),
        ("token-sum-norm", -(1 + 2 + 3 + 4) / 8),
    ],
)
def test_each_aggregation_mode(mode, expected):
    adv = T([[1.0, 2.0, 3.0], [4.0, 9.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    zeros = torch.zeros(2, 3)
    loss, _ = decoupled_ppo_loss(zeros, zeros, zeros, adv, mask, cfg(aggregation=mode, normalizer=8.0))
    assert loss.item() == pytest.approx(expected)


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean-of-everything")


def test_gradient_flows_only_through_current_logprobs():
    lp = torch.randn(2, 3, requires_grad=True)
    old = torch.randn(2, 3, requires_grad=True)
    beh = torch.randn(2, 3, requires_grad=True)
    adv = torch.randn(2, 3, requires_grad=True)
    loss, _ = decoupled_ppo_loss(
        lp, old, beh, adv.detach(), torch.ones(2, 3), cfg(discrepancy_action="truncate", discrepancy_low=0.5)
    )
    loss.backward()
    assert lp.grad is not None and lp.grad.abs().sum() > 0
    assert old.grad is None and beh.grad is None
    w, keep, _ = discrepancy_correction(old, beh, torch.ones(2, 3), action="mask")
    assert not w.requires_grad and not keep.requires_grad


def test_gradient_of_unclipped_token_is_minus_weight_times_advantage():
    # d/dlp of -(w * exp(lp - old) * A) at lp = old is -w*A; token-mean over 1 token
    lp = torch.zeros(1, 1, requires_grad=True)
    loss, _ = decoupled_ppo_loss(
        lp, torch.zeros(1, 1), T([[-0.25]]), T([[3.0]]), T([[1.0]]), cfg(discrepancy_action="truncate")
    )
    loss.backward()
    assert lp.grad.item() == pytest.approx(-math.exp(0.25) * 3.0, rel=1e-6)


finite = st.floats(-30, 30, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(finite, finite, finite, finite, st.booleans()), min_size=1, max_size=12),
    st.sampled_from(["token", "sequence", "geometric"]),
    st.sampled_from(["truncate", "mask", "none"]),
    st.sampled_from(["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "token-sum-norm"]),
)
def test_random_finite_inputs_never_give_nan(rows, level, action, agg):
    lp, old, beh, adv, m = (T([[r[i] for r in rows]]) for i in range(5))
    lp = lp.clone().requires_grad_(True)
    c = LossConfig(
        discrepancy_level=level,
        discrepancy_action=action,
        aggregation=agg,
        dual_clip=3.0,
        catastrophic=1e-4,
        eps_high=0.2,
    )
    loss, metrics = decoupled_ppo_loss(lp, old, beh, adv, m.float(), c)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite, st.floats(-5, 5, width=32)), min_size=1, max_size=10))
def test_old_equal_behavior_reduces_to_standard_ppo(rows):
    lp, old, adv = (T([[r[i] for r in rows]]) for i in range(3))
    mask = torch.ones_like(lp)
    c = LossConfig(
        discrepancy_action="mask",
        discrepancy_level="token",
        catastrophic=1e-4,
        eps_low=0.2,
        eps_high=0.28,
        dual_clip=None,
    )
    loss, _ = decoupled_ppo_loss(lp, old, old, adv, mask, c)
    ratio = torch.exp((lp - old).clamp(-20, 20))
    ppo = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv).mean()
    assert loss.item() == pytest.approx(ppo.item(), rel=1e-5, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(finite, finite, st.floats(-5, 5, width=32)), min_size=1, max_size=10))
def test_logprobs_equal_old_reduces_to_weighted_advantage(rows):
    old, beh, adv = (T([[r[i] for r in rows]]) for i in range(3))
    mask = torch.ones_like(old)
    c = LossConfig(discrepancy_action="truncate", catastrophic=None, dual_clip=3.0, eps_high=0.2)
    loss, _ = decoupled_ppo_loss(old.clone(), old, beh, adv, mask, c)
    w, _, _ = discrepancy_correction(old, beh, mask, action="truncate", low=0.5, high=2.0)
    assert loss.item() == pytest.approx(-(w * adv).mean().item(), rel=1e-5, abs=1e-5)


def test_minus_inf_behavior_logprob_in_loss_is_finite_and_counted():
    lp = torch.zeros(1, 2, requires_grad=True)
    loss, m = decoupled_ppo_loss(
        lp,
        torch.zeros(1, 2),
        T([[0.0, -math.inf]]),
        T([[1.0, 1.0]]),
        torch.ones(1, 2),
        LossConfig(discrepancy_action="mask", catastrophic=1e-4, eps_high=0.2, dual_clip=None),
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert m["discrepancy/nonfinite_tokens"] == 1
    assert all(math.isfinite(v) for v in m.values())


# --------------------------------------------------------------------------- metrics


def test_kl_metrics_split_discrepancy_and_staleness():
    # log pi_theta = 0.2, log pi_old = 0.1, log mu = 0: k1 discrepancy = -0.1, staleness -0.1, total -0.2
    _, m = decoupled_ppo_loss(T([[0.2]]), T([[0.1]]), T([[0.0]]), T([[1.0]]), T([[1.0]]), cfg())
    assert m["kl/discrepancy_k1"] == pytest.approx(-0.1, abs=1e-6)
    assert m["kl/staleness_k1"] == pytest.approx(-0.1, abs=1e-6)
    assert m["kl/total_k1"] == pytest.approx(-0.2, abs=1e-6)
    assert m["kl/discrepancy_k3"] == pytest.approx(math.expm1(0.1) - 0.1, rel=1e-5)
