"""Approximate old log-probs: no weights of past versions are kept (except the EWMA's one average).

behavior    pi_old = mu (prime-rl, PipelineRL, TRL async)
recompute   pi_old = pi_async, the trainer's weights at the step start (AReaL, verl, slime)
linear, loglinear   AReaL's interpolation between mu and pi_theta by per-token version
ewma        revised PPO-EWMA: pi_prox from a bias-corrected EWMA of the parameters
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from twofold import metrics as M
from twofold.models import state_dict_bytes
from twofold.oldlogits.base import CapturingSource, OldLogitSource, SourceContext, capture, with_parameters
from twofold.oldlogits.ewma import ParameterEWMA, staleness_beta
from twofold.rollout.trajectory import Batch

log = logging.getLogger(__name__)
# Resets on this many consecutive steps: the rule may be looping (each reset makes pi_old the current weights, the
# r_d mask still cuts the same tokens, the ratio stays under tau). In the study such streaks came before each
# `ewma` run with the rule that ended collapsed, and one run came through them (docs/results.md, E3 and H4).
RESET_LOOP_STEPS = 3


def interpolate_proximal_logprobs(
    behavior_logprobs: torch.Tensor,
    current_logprobs: torch.Tensor,
    token_versions: torch.Tensor,
    current_version: int,
    method: Literal["loglinear", "linear"] = "loglinear",
) -> torch.Tensor:
    """AReaL-style proximal log-probs interpolated by per-token version.

        alpha_t = clamp((v_prox - v_t) / (v_theta - v_t), 0, 1),  v_theta = current_version,
                  v_prox = v_theta - 1;  alpha_t = 0 where v_t == v_theta or v_t < 0 (prompt)
        loglinear: log pi_prox = (1 - alpha) log mu + alpha log pi_theta
        linear:    log pi_prox = log((1 - alpha) mu + alpha pi_theta)
    log pi_theta is detached. Loglinear is written as (1-alpha) log mu + alpha log pi_theta, equal to
    log mu + alpha (log pi_theta - log mu) but finite when mu = 0 and alpha > 0. By the paper's
    Proposition 1, loglinear gives r_s = r^(1-alpha), r_d = r^alpha of the total ratio r.
    """
    lmu = behavior_logprobs.detach()
    lpt = current_logprobs.detach()
    v = token_versions.to(lmu.dtype)
    v_theta = float(current_version)
    gap = v_theta - v
    valid = (token_versions >= 0) & (gap > 0)
    alpha = torch.where(valid, ((v_theta - 1.0) - v) / gap.clamp(min=1.0), torch.zeros_like(v)).clamp(0.0, 1.0)
    if method == "loglinear":
        return torch.where(alpha > 0, (1.0 - alpha) * lmu + alpha * lpt, lmu)
    if method == "linear":
        log_one_minus = torch.log1p(-alpha)
        log_alpha = torch.where(alpha > 0, torch.log(alpha.clamp(min=1e-30)), torch.full_like(alpha, -math.inf))
        return torch.logaddexp(log_one_minus + lmu, log_alpha + lpt)
    raise ValueError(f"method must be loglinear or linear, got {method!r}")


class BehaviorSource(OldLogitSource):
    """pi_old = mu: engine noise then sits inside the PPO clip."""

    name = "behavior"

    def old_logprobs(self, batch, current_logprobs, version):
        return batch.behavior_logprobs


class InterpolationSource(OldLogitSource):
    """AReaL's proximal log-probs, interpolated per token from mu and the live, detached log pi_theta."""

    def __init__(self, ctx: SourceContext, method: str):
        super().__init__(ctx)
        self.name = method  # "linear" or "loglinear"

    def old_logprobs(self, batch, current_logprobs, version):
        proximal = interpolate_proximal_logprobs(
            batch.behavior_logprobs, current_logprobs, batch.versions, version, self.name
        )
        return proximal * batch.loss_mask


class RecomputeSource(CapturingSource):
    """pi_async: every token scored with the trainer's weights at the step start (what most peers do)."""

    name = "recompute"

    def prepare(self, batch, model, version, pending):
        self._timed(capture, self.ctx.scorer(model), self.captured, batch.trajectories, None)


class EWMASource(OldLogitSource):
    """Revised PPO-EWMA: pi_prox from a bias-corrected EWMA of the parameters (Hilton et al. 2021).

    The average is updated after every optimizer step and each minibatch is scored with it as it is
    then (ppo-ewma's own order). beta defaults to kW/(kW+2), k optimizer steps per version, so its
    centre of mass sits W/2 versions back; the average is reset to the current weights when a step's
    active-token ratio falls below tau.
    """

    name = "ewma"

    def __init__(
        self,
        ctx: SourceContext,
        model: torch.nn.Module,
        beta: float | None,
        tau: float,
        auto_reset: bool,
        reset_cooldown: int = 0,
    ):
        super().__init__(ctx)
        if beta is None:
            beta = staleness_beta(ctx.max_staleness, ctx.updates_per_version)
        self.ewma = ParameterEWMA(model, beta, device=ctx.device)
        # pi_prox scores through the trainer's own model with the average standing in for its parameters
        # (`with_parameters`): no proxy model, and under LoRA the frozen base is the trainer's, sharded or not.
        self.model = model
        self.tau, self.auto_reset, self.reset_cooldown = tau, auto_reset, reset_cooldown
        self.last_reset = False
        self.consecutive_resets = 0

    def old_logprobs(self, batch: Batch, current_logprobs, version):
        return self._timed(with_parameters, self.model, self.ewma.params, lambda m: self.ctx.score_rows(m, batch))

    def after_optimizer_step(self, model):
        self.ewma.update(model)

    def after_step(self, model, metrics):
        ratio = metrics.get(M.ACTIVE_TOKEN_RATIO, 1.0)
        self.last_reset = self.auto_reset and self.ewma.maybe_reset(model, ratio, self.tau, self.reset_cooldown)
        self.consecutive_resets = self.consecutive_resets + 1 if self.last_reset else 0
        if self.consecutive_resets == RESET_LOOP_STEPS:  # once per run of resets
            log.warning(
                "ewma: the reset rule fired on %d steps in a row (active-token ratio %.3g < oldlogits.ewma_reset_tau "
                "%g): it may be looping, as before the collapsed runs of docs/results.md; "
                "oldlogits.ewma_auto_reset=false, a smaller ewma_reset_tau or oldlogits.source=snapshot stops it",
                self.consecutive_resets,
                ratio,
                self.tau,
            )

    def extra_bytes(self):
        return state_dict_bytes(self.ewma.params)

    def metrics(self):
        return {
            M.EWMA_RESETS: float(self.ewma.num_resets),
            M.EWMA_RESET_THIS_STEP: float(self.last_reset),
            M.EWMA_CENTER_OF_MASS: self.ewma.center_of_mass,  # in optimizer steps
            M.EWMA_CENTER_OF_MASS_VERSIONS: self.ewma.center_of_mass / self.ctx.updates_per_version,
            M.EWMA_BETA: self.ewma.beta,
        }

    def state_dict(self):
        return {"ewma": self.ewma.state_dict()}

    def load_state_dict(self, state):
        self.ewma.load_state_dict(state["ewma"])
