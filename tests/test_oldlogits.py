"""Old-logit sources as the trainer drives them: the live EWMA per minibatch, its clock, the snapshot
fallback's hooks, and per-step metrics that sum counts and average rates."""

import math

import pytest
import torch
from conftest import small_config

from twofold.models import load_model, load_parameters, versioned_state
from twofold.oldlogits import EWMASource, OldLogitSource, SourceContext, make_source
from twofold.oldlogits.approximate import interpolate_proximal_logprobs
from twofold.oldlogits.ewma import ParameterEWMA, staleness_beta
from twofold.rollout.trajectory import Batch, Trajectory
from twofold.trainer.trainer import Trainer


def make_batch(tokenizer, n: int = 4, reward=lambda i: float(i % 2)) -> Batch:
    """n one-turn trajectories in groups of two: a prompt, then 6 agent tokens of version 0."""
    trajs = []
    for i in range(n):
        t = Trajectory(uid=i, group_id=i // 2, level_seed=0)
        t.append(tokenizer.encode(f"P F\nF G {i}", add_special_tokens=False), agent=False)
        reply = tokenizer.encode("<answer>Down</answer>", add_special_tokens=False)[:6]
        t.append(reply, agent=True, logprobs=[-1.0] * len(reply), versions=[0] * len(reply), turn=0)
        t.turn_rewards.append(reward(i))
        t.status = "done"
        trajs.append(t)
    return Batch.from_trajectories(trajs, pad_id=0)


def ctx_for(cfg) -> SourceContext:
    t = cfg.trainer
    return SourceContext(
        pad_id=0,
        async_mode=True,
        max_staleness=cfg.max_staleness,
        updates_per_version=t.ppo_epochs * t.num_minibatches,
    )


# --------------------------------------------------------------------------- EWMA: live average, right clock


def test_second_minibatch_is_scored_with_the_average_updated_by_the_first(tiny_path, tokenizer):
    # no discrepancy band: make_batch's mu is not the model's, and a masked batch would never move the weights
    cfg = small_config(
        **{
            "trainer.lr": 1e-2,
            "trainer.num_minibatches": 2,
            "oldlogits.source": "ewma",
            "loss.discrepancy_action": "none",
            "loss.catastrophic": None,
        }
    )
    trainer = Trainer(load_model(tiny_path), cfg)
    ctx = ctx_for(cfg)
    source = make_source(cfg, ctx, trainer.model)
    theta = [versioned_state(trainer.model)]
    calls = []
    old_logprobs = source.old_logprobs

    def recording(mb, current, version):
        out = old_logprobs(mb, current, version)
        calls.append((mb, out))
        return out

    source.old_logprobs = recording

    def after_optimizer_step():
        source.after_optimizer_step(trainer.model)
        theta.append(versioned_state(trainer.model))

    trainer.train_step(make_batch(tokenizer), source, after_optimizer_step=after_optimizer_step)
    assert len(calls) == 2 and len(theta) == 3
    beta = source.ewma.beta
    # after one optimizer step the average is (beta * theta_0 + theta_1) / (beta + 1)
    average = {k: (beta * theta[0][k] + theta[1][k]) / (beta + 1) for k in theta[0]}
    probe = load_model(tiny_path)
    load_parameters(probe, average)
    mb, seen = calls[1]
    mask = mb.loss_mask > 0
    assert (seen - ctx.score_batch(probe, mb))[mask].abs().max() < 1e-5
    load_parameters(probe, theta[0])  # the step-start average: what a frozen proxy would have used
    assert (seen - ctx.score_batch(probe, mb))[mask].abs().max() > 1e-4


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_centre_of_mass_is_half_the_window_in_versions(k, window):
    m = torch.nn.Linear(1, 1)
    ewma = ParameterEWMA(m, staleness_beta(window, updates_per_version=k))
    for _ in range(2000):
        ewma.update(m)
    assert ewma.center_of_mass / k == pytest.approx(window / 2, rel=1e-3)


def test_ewma_source_counts_optimizer_steps_per_version(tiny_path):
    # W = 2 and 2 epochs x 2 minibatches: k = 4, beta = 8/10 (per optimizer step), not 2/4
    cfg = small_config(max_staleness=2, **{"trainer.ppo_epochs": 2, "trainer.num_minibatches": 2})
    source = make_source(cfg, ctx_for(cfg), load_model(tiny_path), kind="ewma")
    assert source.ewma.beta == pytest.approx(0.8)
    assert source.metrics()["ewma/center_of_mass_versions"] == 0.0


def test_snapshot_ewma_fallback_resets_and_reports_like_a_plain_ewma(tiny_path):
    cfg = small_config(**{"oldlogits.on_budget": "ewma"})
    model = load_model(tiny_path)
    fallback_source = make_source(cfg, ctx_for(cfg), model, kind="snapshot")
    plain = make_source(cfg, ctx_for(cfg), model, kind="ewma")
    for s in (fallback_source, plain):
        s.after_step(model, {"ppo/active_token_ratio": 0.1})
    assert plain.metrics()["ewma/resets"] == 1
    assert fallback_source.fallback.ewma.num_resets == 1
    assert fallback_source.metrics()["ewma/resets"] == 1


def test_resets_on_three_steps_in_a_row_warn_once_that_the_rule_is_looping(tiny_path, caplog):
    cfg = small_config()
    model = load_model(tiny_path)
    source = make_source(cfg, ctx_for(cfg), model, kind="ewma")
    ratios = [0.1, 0.1, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1]  # a reset below tau = 0.9: runs of 2, then of 5
    with caplog.at_level("WARNING", logger="twofold.oldlogits.approximate"):
        for r in ratios:
            source.after_step(model, {"ppo/active_token_ratio": r})
    assert source.ewma.num_resets == 7
    warnings = [m for m in caplog.messages if "reset rule fired on 3 steps in a row" in m]
    assert len(warnings) == 1 and "oldlogits.ewma_auto_reset=false" in warnings[0]


# --------------------------------------------------------------------------- per-step metrics


class VetoFirstToken(OldLogitSource):
    """pi_old = mu, except 12 nats below it on each trajectory's first agent token (r_d = e^-12 < 1e-4)."""

    def old_logprobs(self, batch, current_logprobs, version):
        old = batch.behavior_logprobs.clone()
        first = batch.loss_mask.argmax(dim=1)
        old[torch.arange(len(old)), first] -= 12.0
        return old * batch.loss_mask


@pytest.mark.parametrize("epochs", [1, 2])
def test_counts_are_summed_over_minibatches_and_rates_averaged(tiny_path, tokenizer, epochs):
    cfg = small_config(**{"trainer.num_minibatches": 2, "trainer.ppo_epochs": epochs, "loss.catastrophic": 1e-4})
    trainer = Trainer(load_model(tiny_path), cfg)
    batch = make_batch(tokenizer)
    m = trainer.train_step(batch, VetoFirstToken(ctx_for(cfg)))
    # 4 trajectories, each vetoed: 2 per minibatch, 4 per pass over the batch (not the mean, 2)
    assert m["discrepancy/catastrophic_seqs"] == 4
    assert m["loss/tokens"] == batch.loss_mask.sum()
    # every token of a vetoed sequence is dropped: the rate is a share, the same in each minibatch
    assert m["discrepancy/mask_frac"] == pytest.approx(1.0)
    assert m["trainer/optimizer_steps"] == 2 * epochs
    assert math.isfinite(m["loss/value"])


def test_ewma_source_state_survives_a_roundtrip(tiny_path):
    cfg = small_config()
    model = load_model(tiny_path)
    a = make_source(cfg, ctx_for(cfg), model, kind="ewma")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    a.after_optimizer_step(model)
    b = make_source(cfg, ctx_for(cfg), load_model(tiny_path), kind="ewma")
    b.load_state_dict(a.state_dict())
    assert isinstance(b, EWMASource) and b.ewma.total == pytest.approx(a.ewma.total)
    for name, t in a.ewma.params.items():
        assert torch.equal(b.ewma.params[name], t)


# --------------------------------------------------------------------------- interpolation

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_loglinear_and_linear_interpolation_with_mixed_versions():
    # current version 4: v_prox = 3. versions: prompt(-1), 4 (current), 3, 1
    # alpha = 0, 0, (3-3)/(4-3)=0, (3-1)/(4-1)=2/3
    beh = T([[-1.0, -1.0, -1.0, -1.0, -2.0]])
    cur = T([[-3.0, -0.5, -0.5, -0.5, -0.5]])
    ver = T([[-1, 4, 3, 1, 2]])
    out = interpolate_proximal_logprobs(beh, cur, ver, 4, method="loglinear")
    # v=2: alpha = (3-2)/(4-2) = 1/2 -> -2 + 0.5*(-0.5+2) = -1.25
    assert close(out, [[-1.0, -1.0, -1.0, -1.0 + (2 / 3) * 0.5, -1.25]])
    lin = interpolate_proximal_logprobs(beh, cur, ver, 4, method="linear")
    p = math.log((1 / 3) * math.exp(-1.0) + (2 / 3) * math.exp(-0.5))
    q = math.log(0.5 * math.exp(-2.0) + 0.5 * math.exp(-0.5))
    assert close(lin, [[-1.0, -1.0, -1.0, p, q]])


def test_interpolation_is_detached_and_finite_for_impossible_tokens():
    cur = torch.zeros(1, 2, requires_grad=True)
    out = interpolate_proximal_logprobs(T([[-math.inf, -math.inf]]), cur, T([[0, 3]]), 4, method="loglinear")
    assert not out.requires_grad
    assert out[0, 1] == -math.inf  # alpha = 0: stays mu
    assert not torch.isnan(out).any()
    lin = interpolate_proximal_logprobs(T([[-math.inf]]), torch.zeros(1, 1), T([[0]]), 4, method="linear")
    assert lin.item() == pytest.approx(math.log(3 / 4))
