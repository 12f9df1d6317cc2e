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

from twofold import metrics as M
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
            M.MASK_FRAC: float(((mask > 0) & ~keep).sum() / n),
            M.TRUNC_FRAC: float(outside.sum() / n) if action == "truncate" else 0.0,
            M.CATASTROPHIC_SEQS: float(vetoed.sum()),
            M.NONFINITE_TOKENS: float(nonfinite.sum()),
        }
    return weights, keep_f, metrics


# --------------------------------------------------------------------------- staleness + loss


def combine_metrics(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Metrics of the pieces of a batch, each with its agent-token count, as one: counts (`metrics.COUNT_METRICS`)
    summed, every other metric averaged weighted by tokens (exact for token shares and token means)."""
    tokens = sum(n for _, n in parts)
    out: dict[str, float] = {}
    for key in parts[0][0] if parts else ():
        if key in M.COUNT_METRICS:
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


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> torch.Tensor:
    """PPO's clipped surrogate of the staleness ratio r_s = pi_theta / pi_old, per token [B, T]:

    s = min(r_s A, clip(r_s, 1 - eps_low, 1 + eps_high) A)
    s = max(s, c A)   where A < 0, with the dual clip c > 1 (Ye et al. 2020); dual_clip None: no dual clip
    """
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    if dual_clip is not None:
        surrogate = torch.where(advantages < 0, torch.maximum(surrogate, dual_clip * advantages), surrogate)
    return surrogate


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
    surrogate = clipped_surrogate(torch.exp(log_rs), advantages, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
    per_token = -weights * surrogate * keep
    loss = aggregate(per_token, mask, cfg.aggregation, cfg.normalizer, denominator)
    metrics.update(_ppo_metrics(logprobs, old, behavior_logprobs, log_rs, advantages, mask, weights, keep, cfg))
    return loss, metrics


@torch.no_grad()
def _ppo_metrics(
    logprobs: torch.Tensor,
    old: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    log_rs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor,
    cfg: LossConfig,
) -> dict[str, float]:
    """Clip fractions, the active-token ratio, the three KLs and the weights' ESS of one decoupled loss."""
    r = torch.exp(log_rs.detach())
    positive, negative = advantages > 0, advantages < 0
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
    return {
        M.CLIP_FRAC_LOW: float((clip_low & kept).sum() / n),
        M.CLIP_FRAC_HIGH: float((clip_high & kept).sum() / n),
        M.DUAL_CLIP_FRAC: float((dual & kept).sum() / n),
        M.ACTIVE_TOKEN_RATIO: float((active & (mask > 0)).sum() / n),
        M.STALENESS_RATIO_MEAN: float(_masked_mean(r, mask)),
        M.KL_DISCREPANCY_K1: d1,
        M.KL_DISCREPANCY_K3: d3,
        M.KL_STALENESS_K1: s1,
        M.KL_STALENESS_K3: s3,
        M.KL_TOTAL_K1: t1,
        M.KL_TOTAL_K3: t3,
        M.IS_ESS: ess,
        M.IS_WEIGHT_MEAN: float(_masked_mean(weights, mask)),
        M.LOSS_TOKENS: float(mask.sum()),
    }
