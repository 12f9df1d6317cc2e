"""Off-policy correction as pure functions on tensors.

The total ratio of a sampled token splits into two factors with different jobs
(arXiv 2605.12070; Hilton et al. 2021; AReaL's decoupled PPO):

    pi_theta / mu_v = (pi_old / mu_v) * (pi_theta / pi_old) = r_d * r_s

- r_d, discrepancy: trainer vs engine numerics at the same version v. A tight symmetric band
  [low, high] around 1 (truncated or masked importance sampling) plus a catastrophic veto.
- r_s, staleness: how far the update moved from the behaviour version. The asymmetric PPO clip
  [1 - eps_low, 1 + eps_high] with an optional dual clip.

Shapes: every per-token tensor is [B, T] (B sequences, T positions); `mask` is 1.0 on the tokens
the agent generated (they carry loss) and 0.0 on prompt, observation and padding tokens.
Only `logprobs` (log pi_theta) carries gradient; every weight and mask returned here is detached.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from twofold.config import LossConfig

# exp() of a log-ratio beyond this overflows float32 products; ratios that far out are clipped,
# masked or truncated anyway, so the bound only keeps the arithmetic finite.
MAX_LOG_RATIO = 20.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _finite_log_ratio(
    numer: torch.Tensor, denom: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log(numer/denom) per token, with impossible tokens made explicit.

    A token the engine deemed impossible (denom = -inf) has an infinite ratio: it is returned as
    +MAX_LOG_RATIO, and flagged, so that every later band rejects or truncates it without NaN.
    Positions outside `mask` are set to 0 (ratio 1) so they never enter a sum.
    """
    log_ratio = numer - denom
    nonfinite = ~torch.isfinite(log_ratio) & (mask > 0)
    log_ratio = torch.nan_to_num(log_ratio, nan=MAX_LOG_RATIO, posinf=MAX_LOG_RATIO, neginf=-MAX_LOG_RATIO)
    log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO) * (mask > 0)
    return log_ratio, nonfinite


# --------------------------------------------------------------------------- discrepancy


def discrepancy_correction(
    old_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: Literal["token", "sequence", "geometric"] = "token",
    action: Literal["truncate", "mask", "none"] = "mask",
    low: float = 0.5,
    high: float = 2.0,
    catastrophic: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Weights and keep-mask for the discrepancy ratio r_d = pi_old / mu.

    Per token t of sequence b, log r_t = log pi_old - log mu. The level decides what is compared
    to the band [low, high] (the sequence value is broadcast to all its tokens):
        token:     r_t
        sequence:  exp(sum_t m_t log r_t)
        geometric: exp(sum_t m_t log r_t / sum_t m_t)
    Actions:
        truncate (TIS): weight = clamp(r, low, high); every masked token kept.
        mask (MIS):     keep iff low <= r <= high; weight = r on kept tokens, 0 elsewhere.
        none:           weight = 1, keep = mask.
    low = 0 means no lower bound: one-sided truncation min(r, high) (SkyRL's token TIS, verl's cap).
    catastrophic = x: a sequence with any masked token r_t < x is dropped whole (keep = 0). The veto
    compares the raw ratio, before the +-MAX_LOG_RATIO clamp, so any x in (0, 1) can fire.

    Returns (weights [B,T], keep_mask [B,T] in {0,1}, metrics). Both tensors are detached.
    Metrics: `discrepancy/mask_frac` (share of masked tokens the band dropped), `discrepancy/trunc_frac`
    (share truncated), `discrepancy/catastrophic_seqs`, `discrepancy/nonfinite_tokens`.
    """
    mask = mask.to(old_logprobs.dtype)
    with torch.no_grad():
        log_r, nonfinite = _finite_log_ratio(old_logprobs.detach(), behavior_logprobs.detach(), mask)
        if level == "token":
            log_level = log_r
        elif level in ("sequence", "geometric"):
            seq = log_r.sum(dim=-1, keepdim=True)
            if level == "geometric":
                seq = seq / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
            log_level = seq.expand_as(log_r)
        else:
            raise ValueError(f"level must be token, sequence or geometric, got {level!r}")
        log_low = math.log(low) if low > 0 else -math.inf
        log_high = math.log(high)
        in_band = (log_level >= log_low) & (log_level <= log_high)
        ratio = torch.exp(log_level.clamp(max=80.0))  # the sequence level may exceed MAX_LOG_RATIO
        keep = mask > 0
        if action == "truncate":
            weights = torch.exp(log_level.clamp(min=log_low, max=log_high))
        elif action == "mask":
            keep = keep & in_band
            weights = torch.where(keep, ratio, torch.zeros_like(ratio))
        elif action == "none":
            weights = torch.ones_like(ratio)
        else:
            raise ValueError(f"action must be truncate, mask or none, got {action!r}")
        vetoed = torch.zeros(log_r.shape[0], dtype=torch.bool, device=log_r.device)
        if catastrophic is not None:
            raw = old_logprobs.detach() - behavior_logprobs.detach()  # NaN compares false: never a veto
            vetoed = ((raw < math.log(catastrophic)) & (mask > 0)).any(dim=-1)
            keep = keep & ~vetoed[:, None]
        keep_f = keep.to(old_logprobs.dtype)
        weights = weights * keep_f
        n = mask.sum().clamp(min=1.0)
        outside = (~in_band).to(mask.dtype) * mask
        metrics = {
            "discrepancy/mask_frac": float(((mask > 0) & ~keep).sum() / n),
            "discrepancy/trunc_frac": float(outside.sum() / n) if action == "truncate" else 0.0,
            "discrepancy/catastrophic_seqs": float(vetoed.sum()),
            "discrepancy/nonfinite_tokens": float(nonfinite.sum()),
        }
    return weights, keep_f, metrics


# --------------------------------------------------------------------------- staleness + loss


# Metrics that count things (sequences, tokens) rather than measure a rate or a mean: a train step sums
# them over its minibatches (per pass over the batch) where it averages every other metric.
COUNT_METRICS = frozenset({"discrepancy/catastrophic_seqs", "discrepancy/nonfinite_tokens", "loss/tokens"})


def combine_metrics(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Metrics of the pieces of a batch, each with its agent-token count, as one: counts (`COUNT_METRICS`)
    summed, every other metric averaged weighted by tokens (exact for token shares and token means)."""
    tokens = sum(n for _, n in parts)
    out: dict[str, float] = {}
    for key in parts[0][0] if parts else ():
        if key in COUNT_METRICS:
            out[key] = sum(m[key] for m, _ in parts)
        else:
            out[key] = sum(m[key] * n for m, n in parts) / tokens if tokens > 0 else parts[0][0][key]
    return out


def loss_denominator(mask: torch.Tensor, mode: str, normalizer: float = 1.0) -> float:
    """What `aggregate` divides by over the whole `mask`:

        token-mean: sum_bt m;  seq-mean-*: #sequences with sum_t m > 0;  token-sum-norm: normalizer.
    Computed once per minibatch (summed over data-parallel ranks) and passed to each micro-batch's
    `aggregate`, the micro-batch losses add up to the minibatch loss, whatever the split.
    """
    if mode == "token-mean":
        return max(float(mask.sum()), 1.0)
    if mode == "token-sum-norm":
        return float(normalizer)
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return max(float((mask.sum(dim=-1) > 0).sum()), 1.0)
    raise ValueError(f"unknown aggregation {mode!r}")


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float = 1.0, denominator: float | None = None
) -> torch.Tensor:
    """Reduce per-token losses; `mask` is the agent-token mask *before* any rejection.

        token-mean:          sum_bt l / sum_bt m
        seq-mean-token-sum:  sum_b sum_t l / #sequences,     over sequences with sum_t m > 0
        seq-mean-token-mean: sum_b (sum_t l / sum_t m) / #sequences
        token-sum-norm:      sum_bt l / normalizer (a fixed constant: no length bias)
    Rejected tokens enter as l = 0, so dropping a token never up-weights the others. `denominator`
    replaces the divisor with that of a larger batch this one is a piece of (`loss_denominator`).
    """
    mask = mask.to(per_token.dtype)
    if denominator is None:
        denominator = loss_denominator(mask, mode, normalizer)
    if mode in ("token-mean", "token-sum-norm"):
        return (per_token * mask).sum() / denominator
    tokens = mask.sum(dim=-1)
    seq_sum = (per_token * mask).sum(dim=-1)
    if mode == "seq-mean-token-sum":
        per_seq = seq_sum
    elif mode == "seq-mean-token-mean":
        per_seq = seq_sum / tokens.clamp(min=1.0)
    else:
        raise ValueError(f"unknown aggregation {mode!r}")
    return (per_seq * (tokens > 0).to(per_token.dtype)).sum() / denominator


def kl_estimates(log_ratio: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """k1 and k3 estimates of KL(q || p) from samples of q, with log_ratio = log p - log q.

    k1 = -log r, k3 = (r - 1) - log r (Schulman 2020: unbiased, and k3 >= 0 per sample).
    """
    with torch.no_grad():
        lr = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        k1 = _masked_mean(-lr, mask)
        k3 = _masked_mean(torch.expm1(lr) - lr, mask)
    return float(k1), float(k3)


def decoupled_ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO: the discrepancy weight times the clipped staleness surrogate.

        r_s = exp(log pi_theta - log pi_old)
        s   = min(r_s A, clip(r_s, 1 - eps_low, 1 + eps_high) A)
        s   = max(s, c A)            where A < 0, with the dual clip c > 1 (Ye et al. 2020)
        l_t = -w_t * s_t * keep_t    with (w, keep) = discrepancy_correction(pi_old, mu)
        loss = aggregate(l, mask)   (divided by `denominator` when this is a micro-batch of a larger minibatch)

    With old == behavior, w = 1 and this is standard PPO; with logprobs == old, s = A and the loss
    is -aggregate(w A). Gradient flows only through `logprobs`; old and behavior are detached.

    Returns (loss, metrics). Metrics include the discrepancy metrics, clip fractions
    (`ppo/clip_frac_low`, `ppo/clip_frac_high`, `ppo/dual_clip_frac`), `ppo/active_token_ratio`
    (share of masked tokens that survive both the discrepancy mask and the clip, so carry gradient),
    the three KLs (`kl/discrepancy_k1|k3`, `kl/staleness_k1|k3`, `kl/total_k1|k3`) and
    `is/ess` (effective sample size of the weights, in (0, 1]).
    """
    mask = mask.to(logprobs.dtype)
    old = old_logprobs.detach()
    weights, keep, metrics = discrepancy_correction(
        old,
        behavior_logprobs,
        mask,
        level=cfg.discrepancy_level,
        action=cfg.discrepancy_action,
        low=cfg.discrepancy_low,
        high=cfg.discrepancy_high,
        catastrophic=cfg.catastrophic,
    )
    log_rs = (logprobs - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO) * (mask > 0)
    ratio = torch.exp(log_rs)
    clipped_ratio = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    negative = advantages < 0
    if cfg.dual_clip is not None:
        surrogate = torch.where(negative, torch.maximum(surrogate, cfg.dual_clip * advantages), surrogate)
    per_token = -weights * surrogate * keep
    loss = aggregate(per_token, mask, cfg.aggregation, cfg.normalizer, denominator)

    with torch.no_grad():
        r = ratio.detach()
        positive = advantages > 0
        clip_high = positive & (r > 1.0 + cfg.eps_high)
        clip_low = negative & (r < 1.0 - cfg.eps_low)
        dual = negative & (r > cfg.dual_clip) if cfg.dual_clip is not None else torch.zeros_like(clip_low)
        kept = keep > 0
        active = kept & ~clip_high & ~clip_low & ~dual
        n = mask.sum().clamp(min=1.0)
        w_kept = weights[kept]
        ess = (
            float(w_kept.sum() ** 2 / (w_kept.numel() * (w_kept**2).sum()))
            if w_kept.numel() and w_kept.abs().sum() > 0
            else 1.0
        )
        log_rd, _ = _finite_log_ratio(old, behavior_logprobs.detach(), mask)
        log_total, _ = _finite_log_ratio(logprobs.detach(), behavior_logprobs.detach(), mask)
        d1, d3 = kl_estimates(log_rd, mask)
        s1, s3 = kl_estimates(log_rs.detach(), mask)
        t1, t3 = kl_estimates(log_total, mask)
        metrics.update(
            {
                "ppo/clip_frac_low": float((clip_low & kept).sum() / n),
                "ppo/clip_frac_high": float((clip_high & kept).sum() / n),
                "ppo/dual_clip_frac": float((dual & kept).sum() / n),
                "ppo/active_token_ratio": float((active & (mask > 0)).sum() / n),
                "ppo/staleness_ratio_mean": float(_masked_mean(r, mask)),
                "kl/discrepancy_k1": d1,
                "kl/discrepancy_k3": d3,
                "kl/staleness_k1": s1,
                "kl/staleness_k3": s3,
                "kl/total_k1": t1,
                "kl/total_k3": t3,
                "is/ess": ess,
                "is/weight_mean": float(_masked_mean(weights, mask)),
                "loss/tokens": float(mask.sum()),
            }
        )
    return loss, metrics


# --------------------------------------------------------------------------- proximal approximations


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


def staleness_beta(window: int, updates_per_version: int = 1) -> float:
    """Staleness-aware EWMA decay for an average updated `k = updates_per_version` times per version.

        beta = kW / (kW + 2):  centre of mass beta / (1 - beta) = kW/2 updates = W/2 versions, mid-window.
    The EWMA is updated after every optimizer step (Hilton et al.), k = ppo_epochs x num_minibatches of
    them per policy version; W counts versions, so the window is kW updates long.
    """
    if window < 0:
        raise ValueError("the staleness window must be >= 0")
    if updates_per_version < 1:
        raise ValueError("updates_per_version must be >= 1")
    kw = window * updates_per_version
    return kw / (kw + 2.0)


class ParameterEWMA:
    """Bias-corrected EWMA of a module's parameters, the proximal policy of PPO-EWMA (Hilton et al. 2021).

        theta_prox(t) = sum_{k=0..t} beta^(t-k) theta_k / sum_{k=0..t} beta^(t-k)
    where theta_0 are the module's parameters at construction (total weight 1, as in ppo-ewma), kept
    recursively in float32:
        total <- beta * total + 1
        p_ewma <- p_ewma * (beta * total_old / total) + p / total
    `reset()` is an update with beta = 0 (a hard copy). Call `update()` once per real optimizer step:
    not per micro-batch and not on a step skipped for a non-finite gradient. Only parameters that train
    (`requires_grad`) are averaged: frozen ones are the same at every step (under LoRA: adapters only).
    The average lives on `device` (default: each parameter's own).
    """

    def __init__(self, module: torch.nn.Module, beta: float, device: torch.device | str | None = None):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.total = 1.0  # theta_0 counts, with weight beta^t after t updates
        self._age_sum = 0.0  # sum_k beta^(t-k) (t-k): numerator of the centre of mass
        self.num_updates = 1  # parameter sets averaged in, theta_0 included
        self.num_resets = 0
        self.device = None if device is None else torch.device(device)
        self.params = {n: self._copy(p) for n, p in module.named_parameters() if p.requires_grad}

    def _copy(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach().to(device=self.device or p.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, beta: float | None = None) -> None:
        b = self.beta if beta is None else beta
        total_old = self.total
        self.total = b * total_old + 1.0
        self._age_sum = b * (self._age_sum + total_old)
        keep = b * total_old / self.total
        for n, p in module.named_parameters():
            if n in self.params:
                avg = self.params[n]
                avg.mul_(keep).add_(p.detach().to(device=avg.device, dtype=torch.float32), alpha=1.0 / self.total)
        self.num_updates += 1

    def reset(self, module: torch.nn.Module) -> None:
        self.update(module, beta=0.0)
        self.num_resets += 1

    def maybe_reset(self, module: torch.nn.Module, active_token_ratio: float, tau: float) -> bool:
        """Revision 2 of the paper: reset to the current weights when too few tokens carry gradient."""
        if active_token_ratio < tau:
            self.reset(module)
            return True
        return False

    @property
    def center_of_mass(self) -> float:
        """Weighted mean age of the average, in optimizer steps (beta/(1-beta) in the limit)."""
        return self._age_sum / self.total if self.total > 0 else 0.0

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.params:
                p.copy_(self.params[n].to(device=p.device, dtype=p.dtype))

    def state_dict(self) -> dict:
        return {
            "beta": self.beta,
            "total": self.total,
            "age_sum": self._age_sum,
            "num_updates": self.num_updates,
            "num_resets": self.num_resets,
            "params": {n: t.clone() for n, t in self.params.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.total, self._age_sum = state["beta"], state["total"], state["age_sum"]
        self.num_updates, self.num_resets = state["num_updates"], state["num_resets"]
        self.params = {
            n: t.to(device=self.device or self.params[n].device, copy=True) for n, t in state["params"].items()
        }


# --------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: A_i = r_i - mean_{j in g(i)} r_j, divided by (std_g + eps) when `normalize_std` (std unbiased=False)."""
    adv = torch.empty_like(rewards)
    for g in torch.unique(group_ids):
        sel = group_ids == g
        r = rewards[sel]
        a = r - r.mean()
        if normalize_std:
            a = a / (r.std(unbiased=False) + eps)
        adv[sel] = a
    return adv


def reinforce_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a batch-mean baseline: A_i = r_i - mean_j r_j."""
    return rewards - rewards.mean()


def discounted_returns(turn_rewards: list[float], gamma: float) -> list[float]:
    """Per-turn returns G_k = sum_{j >= k} gamma^(j-k) r_j of one multi-turn episode."""
    out, running = [0.0] * len(turn_rewards), 0.0
    for k in range(len(turn_rewards) - 1, -1, -1):
        running = turn_rewards[k] + gamma * running
        out[k] = running
    return out


def broadcast_turn_values(turn_values: torch.Tensor, token_turns: torch.Tensor) -> torch.Tensor:
    """Per-token values from per-turn values [B, K]; `token_turns` [B, T] holds each token's turn, -1 off-turn."""
    idx = token_turns.clamp(min=0).long()
    vals = torch.gather(turn_values, 1, idx)
    return torch.where(token_turns >= 0, vals, torch.zeros_like(vals))


LAG_BUCKETS = ("0", "1", "2", "3", "4plus")  # token lag in versions; the last bucket is 4 and more


def lag_bucket(lag: torch.Tensor) -> torch.Tensor:
    """Index into LAG_BUCKETS of each lag (versions >= 0)."""
    return lag.clamp(min=0, max=len(LAG_BUCKETS) - 1).long()


def version_staleness(token_versions: torch.Tensor, mask: torch.Tensor, current_version: int) -> dict[str, float]:
    """Mean and max of current_version - v_t over agent tokens (`version/staleness_mean|max`)."""
    sel = (mask > 0) & (token_versions >= 0)
    if not sel.any():
        return {"version/staleness_mean": 0.0, "version/staleness_max": 0.0}
    lag = (current_version - token_versions[sel]).to(torch.float32)
    return {"version/staleness_mean": float(lag.mean()), "version/staleness_max": float(lag.max())}


def lag_fractions(token_versions: torch.Tensor, mask: torch.Tensor, current_version: int) -> dict[str, float]:
    """The token lag's distribution: `version/lag{0,1,2,3,4plus}_frac`, shares of agent tokens per bucket."""
    sel = (mask > 0) & (token_versions >= 0)
    if not sel.any():
        return {}
    counts = torch.bincount(lag_bucket(current_version - token_versions[sel]), minlength=len(LAG_BUCKETS))
    return {f"version/lag{b}_frac": float(c) / int(sel.sum()) for b, c in zip(LAG_BUCKETS, counts, strict=True)}
