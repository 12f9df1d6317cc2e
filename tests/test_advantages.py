"""Advantage estimators (`twofold.trainer.advantages`)."""

import pytest
import torch

from twofold.trainer.advantages import broadcast_turn_values, discounted_returns, group_advantages, reinforce_advantages

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_group_advantages_mean_and_std():
    r = T([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    g = T([0, 0, 1, 1, 2, 2])
    assert close(group_advantages(r, g), [0.5, -0.5, 0, 0, 0, 0])
    assert close(
        group_advantages(r, g, normalize_std=True), [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0, 0, 0, 0], tol=1e-5
    )


def test_reinforce_batch_baseline():
    assert close(reinforce_advantages(T([1.0, 0.0, 0.0, 0.0])), [0.75, -0.25, -0.25, -0.25])


def test_discounted_returns_and_broadcast():
    assert discounted_returns([0.0, -0.1, 1.0], 0.5) == pytest.approx([0.2, 0.4, 1.0])
    vals = T([[0.2, 0.4, 1.0]])
    turns = T([[-1, 0, 0, -1, 1, -1, 2]])
    assert close(broadcast_turn_values(vals, turns), [[0, 0.2, 0.2, 0, 0.4, 0, 1.0]])
