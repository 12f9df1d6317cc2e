"""The revised PPO-EWMA's proximal policy: a bias-corrected EWMA of the parameters (Hilton et al. 2021,
"Batch size-invariance for policy optimization"; arXiv 2605.12070's revisions).

    theta_prox(t) = sum_k beta^(t-k) theta_k / sum_k beta^(t-k),   beta = kW / (kW + 2)

reset to the current weights when a step's active-token ratio falls below tau. The source that scores
with it is `EWMASource` (`approximate.py`).
"""

from __future__ import annotations

import torch


def staleness_beta(window: int, updates_per_version: int = 1) -> float:
    """Staleness-aware EWMA decay for an average updated `k = updates_per_version` times per version.

        beta = kW / (kW + 2):  centre of mass beta / (1 - beta) = kW/2 updates = W/2 versions, mid-window.
    The EWMA is updated after every optimizer step (Hilton et al.), k = ppo_epochs x num_minibatches of
    them per policy version; W counts versions, so the window is kW updates long. W is `max_staleness`, the
    lag a trained token can have, also under a smaller admission (`rollout.start_ahead`): there the lags
    bunch lower (tool use, W = 2, start_ahead = 1: mean 1.0), but a long episode still arrives W old.
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
        self.steps_since_reset: int | None = None  # None: never reset
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

    def maybe_reset(self, module: torch.nn.Module, active_token_ratio: float, tau: float, cooldown: int = 0) -> bool:
        """Revision 2 of the paper: reset to the current weights when too few tokens carry gradient. Call once
        per step. With `cooldown` = k, no reset within k steps of the last one: a reset at step s blocks steps
        s+1 ... s+k (a rule that fires on every step of a loop restarts the average at most every k + 1)."""
        if self.steps_since_reset is not None:
            self.steps_since_reset += 1
        cooling = self.steps_since_reset is not None and self.steps_since_reset <= cooldown
        if active_token_ratio < tau and not cooling:
            self.reset(module)
            self.steps_since_reset = 0
            return True
        return False

    @property
    def center_of_mass(self) -> float:
        """Weighted mean age of the average, in optimizer steps (beta/(1-beta) in the limit)."""
        return self._age_sum / self.total if self.total > 0 else 0.0

    def state_dict(self) -> dict:
        return {
            "beta": self.beta,
            "total": self.total,
            "age_sum": self._age_sum,
            "num_updates": self.num_updates,
            "num_resets": self.num_resets,
            "steps_since_reset": self.steps_since_reset,
            "params": {n: t.clone() for n, t in self.params.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.total, self._age_sum = state["beta"], state["total"], state["age_sum"]
        self.num_updates, self.num_resets = state["num_updates"], state["num_resets"]
        self.steps_since_reset = state.get("steps_since_reset")  # absent in checkpoints from before the cool-down
        self.params = {
            n: t.to(device=self.device or self.params[n].device, copy=True) for n, t in state["params"].items()
        }
