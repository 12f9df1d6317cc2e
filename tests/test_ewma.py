"""The revised PPO-EWMA's parameter average (`twofold.oldlogits.ewma`)."""

import pytest
import torch

from twofold.oldlogits.ewma import ParameterEWMA, staleness_beta


def _module(value):
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_ewma_after_three_updates_equals_closed_form():
    beta = 0.5
    m = _module(1.0)
    ewma = ParameterEWMA(m, beta)  # theta_0 = 1 counts from construction (ppo-ewma's total weight 1)
    thetas = [3.0, 7.0]
    for th in thetas:
        m.weight.data.fill_(th)
        ewma.update(m)
    # sum beta^(t-k) theta_k / sum beta^(t-k) = (0.25*1 + 0.5*3 + 1*7) / 1.75
    expected = (0.25 * 1 + 0.5 * 3 + 7) / 1.75
    assert ewma.params["weight"].item() == pytest.approx(expected)
    # centre of mass: (0.25*2 + 0.5*1 + 1*0) / 1.75
    assert ewma.center_of_mass == pytest.approx(1.0 / 1.75)


def test_ewma_counts_the_parameters_it_was_built_from():
    # Hilton's ppo-ewma: total weight 1 at construction. theta_0 = 2, then theta_1 = 4 with beta 0.5:
    # (0.5 * 2 + 4) / (0.5 + 1) = 10/3; the centre of mass is 0.5 / 1.5 updates old
    m = _module(2.0)
    ewma = ParameterEWMA(m, 0.5)
    assert ewma.params["weight"].item() == 2.0 and ewma.total == 1.0
    m.weight.data.fill_(4.0)
    ewma.update(m)
    assert ewma.params["weight"].item() == pytest.approx(10 / 3)
    assert ewma.center_of_mass == pytest.approx(1 / 3)


def test_ewma_reset_equals_copy_and_is_counted():
    m = _module(2.0)
    ewma = ParameterEWMA(m, 0.9)
    ewma.update(m)
    m.weight.data.fill_(5.0)
    ewma.reset(m)
    assert ewma.params["weight"].item() == 5.0
    assert ewma.num_resets == 1 and ewma.center_of_mass == 0.0


def test_ewma_auto_reset_below_tau_only():
    m = _module(1.0)
    ewma = ParameterEWMA(m, 0.5)
    ewma.update(m)
    m.weight.data.fill_(3.0)
    assert not ewma.maybe_reset(m, active_token_ratio=0.95, tau=0.9)
    assert ewma.params["weight"].item() == 1.0
    assert ewma.maybe_reset(m, active_token_ratio=0.85, tau=0.9)
    assert ewma.params["weight"].item() == 3.0


def test_ewma_reset_cooldown_blocks_the_next_k_steps_and_survives_a_resume():
    """Cool-down 2: the rule fires on every step (ratio 0.5 < tau), yet after the reset at step 1 steps 2 and
    3 keep the average; step 4 resets again. A restored average keeps counting from where it was."""
    m = _module(1.0)
    ewma = ParameterEWMA(m, 0.5)
    fired = []
    for step in range(1, 8):
        m.weight.data.fill_(float(step))
        ewma.update(m)
        fired.append(ewma.maybe_reset(m, active_token_ratio=0.5, tau=0.9, cooldown=2))
        if step == 2:
            restored = ParameterEWMA(_module(0.0), 0.5)
            restored.load_state_dict(ewma.state_dict())
            assert restored.steps_since_reset == 1
            assert restored.maybe_reset(m, active_token_ratio=0.5, tau=0.9, cooldown=2) is False  # step 3
    assert fired == [True, False, False, True, False, False, True]
    assert ewma.num_resets == 3 and ewma.params["weight"].item() == 7.0


def test_ewma_reset_cooldown_zero_is_the_plain_rule():
    m = _module(1.0)
    ewma = ParameterEWMA(m, 0.5)
    assert [ewma.maybe_reset(m, active_token_ratio=0.5, tau=0.9) for _ in range(3)] == [True, True, True]


def test_ewma_state_dict_roundtrip():
    m = _module(1.0)
    ewma = ParameterEWMA(m, 0.5)
    m.weight.data.fill_(3.0)
    ewma.update(m)  # (0.5*1 + 3)/1.5
    assert ewma.params["weight"].item() == pytest.approx(3.5 / 1.5)
    other = ParameterEWMA(_module(9.0), 0.1)
    other.load_state_dict(ewma.state_dict())
    assert other.params["weight"].item() == pytest.approx(3.5 / 1.5) and other.total == pytest.approx(1.5)


def test_staleness_beta():
    assert staleness_beta(2, updates_per_version=2) == pytest.approx(4 / 6)  # kW = 4
    assert staleness_beta(0, updates_per_version=4) == 0.0
    assert staleness_beta(2) == pytest.approx(0.5)
    assert staleness_beta(8) == pytest.approx(0.8)
    b = staleness_beta(4)
    assert b / (1 - b) == pytest.approx(2.0)  # centre of mass W/2


def test_ewma_rejects_bad_beta():
    with pytest.raises(ValueError):
        ParameterEWMA(_module(0.0), 1.0)
