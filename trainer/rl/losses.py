"""Token-level policy losses for GRPO over padded or packed token tensors with a loss mask.

    >>> out = policy_loss(logp, logp_old, advantages, loss_mask, forced_mask=forced,
    ...                   config=PolicyLossConfig(kl_beta=0.01), logp_ref=logp_ref, logp_gen=logp_gen)
    >>> LossOutput(out.loss_sum, out.num_tokens, ...)     # the stage hands these to the loop

All tensors are ``[B, T]`` (or any common shape) aligned on the *predicted* token: ``logp[b, t]`` is the
log-probability of token ``t`` under the policy being trained; ``logp_old`` the same under the policy that
the rollout batch is scored with before the update (detached), ``logp_gen`` the generation engine's value
(:class:`tandem.trainer.inference.engine.GenerationResult` ``logprobs``), ``logp_ref`` the reference
policy's. ``advantages`` is per token, or per sequence ``[B]`` (broadcast over ``T``).

**Normalisation.** The loss is a *sum* over target tokens; the training loop divides by the global target
count of the step (all micro-batches and ranks, :mod:`tandem.trainer.loop`), which is the token-level mean
of DAPO §3.3 (the Nemotron 3 Nano RL recipe uses it) and does not change when the batch is split differently. Target tokens
are ``loss_mask & ~forced_mask``: tokens the engine forced (thinking budget ``</think>``) were not sampled
from the policy and get no gradient. :func:`target_tokens` is the same count for ``Stage.target_tokens``.

**Metrics** (``PolicyLossOutput.metrics``, 0-d tensors) follow the loop's convention for extra metrics:
they are *sums over target tokens*, reduced like ``loss_sum`` (summed over micro-batches and ranks, then
divided by the global target count) — except the names in :data:`MAX_METRICS`, which are maxima.
:func:`reduce_metrics` does that reduction on one process.

Variants are registered in :data:`POLICY_LOSSES` (:func:`register_policy_loss`) and chosen by
``PolicyLossConfig.name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "PolicyLossConfig", "PolicyLossOutput", "POLICY_LOSSES", "DEFAULT_POLICY_LOSS", "MAX_METRICS",
    "register_policy_loss", "policy_loss", "target_tokens", "k3_kl", "truncated_is_weight", "reduce_metrics",
    "clipped_surrogate", "reinforce",
]

DEFAULT_POLICY_LOSS = "clipped"
#: metrics that are maxima over tokens (reduce with max); every other metric is a token sum
MAX_METRICS = frozenset({"ratio_max"})


@dataclass(frozen=True)
class PolicyLossConfig:
    name: str = DEFAULT_POLICY_LOSS
    eps_low: float = 0.2  # ρ clipped below at 1 − eps_low
    eps_high: float = 0.28  # ... and above at 1 + eps_high ("clip-higher", DAPO §3.1)
    dual_clip: float | None = None  # c > 1: for A < 0 the loss is capped at −c·A (Ye et al. 2020)
    kl_beta: float = 0.0  # coefficient of the k3 KL to the reference (0 = off, no logp_ref needed)
    kl_log_ratio_clamp: float = 20.0  # r = logp_ref − logp is clamped to [−20, 20] before exp
    kl_value_clamp: float = 10.0  # the per-token k3 value is clamped to [−10, 10] (NeMo-RL's defaults)
    is_cap: float | None = None  # truncated IS correction: weight min(exp(logp_old − logp_gen), is_cap)

    def __post_init__(self):
        if self.name not in POLICY_LOSSES:
            raise ValueError(f"unknown policy loss {self.name!r}; registered: {sorted(POLICY_LOSSES)}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
        if self.is_cap is not None and not self.is_cap > 0:
            raise ValueError(f"is_cap must be > 0 or None, got {self.is_cap}")


@dataclass
class PolicyLossOutput:
    loss_sum: torch.Tensor  # 0-d, Σ over target tokens (differentiable)
    num_tokens: torch.Tensor  # 0-d, target tokens (loss_mask & ~forced_mask)
    metrics: dict[str, torch.Tensor]  # token sums (see module doc) and MAX_METRICS maxima, detached


#: name → ``fn(logp, logp_old, adv, config) -> (per-token loss, {metric: per-token float tensor})``;
#: inputs are already zeroed outside the target mask, the per-token metrics are 0/1 indicators or values
POLICY_LOSSES: dict[str, Callable] = {}


def register_policy_loss(name: str):
    """Decorator: add a per-token loss ``fn(logp, logp_old, adv, config) -> (loss [..], metrics)``."""

    def deco(fn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = fn
        return fn

    return deco


@register_policy_loss("clipped")
def clipped_surrogate(logp, logp_old, adv, config: PolicyLossConfig):
    """PPO/GRPO clipped surrogate per token (Schulman et al. 2017; DAPO's decoupled clip):

        L = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)),   ρ = exp(logp − logp_old)

    and with dual clip c (A < 0 only): L = min(L, −c·A). Where the clipped (or the dual) branch is the
    larger one the loss is constant in ρ: those tokens get no gradient. dL/dlogp = −A·ρ elsewhere.
    """
    ratio = torch.exp(logp - logp_old)
    clipped = ratio.clamp(1 - config.eps_low, 1 + config.eps_high)
    unclipped_loss, clipped_loss = -adv * ratio, -adv * clipped
    loss = torch.maximum(unclipped_loss, clipped_loss)
    # the clipped branch is active where it is strictly larger; split by the side of the range ρ is on
    active = (clipped_loss > unclipped_loss).detach()
    metrics = {
        "clip_frac_low": (active & (ratio < 1 - config.eps_low)).float(),
        "clip_frac_high": (active & (ratio > 1 + config.eps_high)).float(),
    }
    if config.dual_clip is not None:
        cap = -config.dual_clip * adv
        dual = ((adv < 0) & (loss > cap)).detach()
        loss = torch.where(dual, cap, loss)
        metrics["dual_clip_frac"] = dual.float()
    return loss, metrics


@register_policy_loss("reinforce")
def reinforce(logp, logp_old, adv, config: PolicyLossConfig):
    """Plain policy gradient: L = −A·logp (no ratio, no clip). Its gradient equals the clipped loss's at
    ρ = 1, so it is the on-policy reference; off-policy drift is left uncorrected (use ``is_cap``)."""
    return -adv * logp, {}


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor, log_ratio_clamp: float = 20.0,
          value_clamp: float = 10.0) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref) per token: ``exp(r) − 1 − r``, ``r = logp_ref − logp``.

    Unbiased, always >= 0, low variance. ``r`` is clamped to ±``log_ratio_clamp`` (exp overflows in fp32
    past ~88) and the value to ±``value_clamp``; outside either clamp the token gets no KL gradient.
    """
    r = (logp_ref - logp).clamp(-log_ratio_clamp, log_ratio_clamp)
    return (torch.exp(r) - 1 - r).clamp(-value_clamp, value_clamp)


def truncated_is_weight(logp_old: torch.Tensor, logp_gen: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(exp(logp_old − logp_gen), cap)`` (truncated importance sampling, Ionides 2008; Yao et al. 2025
    "Your efficient RL framework secretly brings you off-policy RL training"): corrects for the generation
    engine's numerics differing from the trainer's. Constant (no gradient)."""
    return torch.exp(logp_old - logp_gen).clamp(max=cap).detach()


def target_tokens(loss_mask: torch.Tensor, forced_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``loss_mask & ~forced_mask``, the tokens a policy loss trains on (bool, same shape)."""
    mask = loss_mask.bool()
    if forced_mask is not None:
        mask = mask & ~forced_mask.bool()
    return mask


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor, *,
                config: PolicyLossConfig = PolicyLossConfig(), forced_mask: torch.Tensor | None = None,
                logp_ref: torch.Tensor | None = None, logp_gen: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None) -> PolicyLossOutput:
    """Σ over target tokens of ``w·L_policy + β·KL`` (see the module doc), the target count and metrics.

    ``w`` is the truncated IS weight when ``config.is_cap`` is set (needs ``logp_gen``), else 1; the KL term
    is not IS-weighted. ``entropy`` (per token, optional) is only reported. Metric names: ``clip_frac_low``,
    ``clip_frac_high`` (, ``dual_clip_frac``) for ``clipped``; ``ratio_mean``, ``ratio_max`` (ρ, max);
    ``kl`` (if β > 0 or ``logp_ref`` given); ``entropy``; ``token_mult_prob_error`` =
    mean exp(|logp_old − logp_gen|) and ``is_weight_mean`` (if ``logp_gen`` given); ``policy_loss``.
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    mask = target_tokens(loss_mask, forced_mask)
    if config.kl_beta > 0 and logp_ref is None:
        raise ValueError("kl_beta > 0 needs logp_ref (the reference policy's logprobs)")
    if config.is_cap is not None and logp_gen is None:
        raise ValueError("is_cap needs logp_gen (the generation engine's logprobs)")

    # Zero every input outside the mask *before* the maths: padding may hold garbage (−inf logprobs), and
    # where(mask, f(x), 0) still back-propagates 0·inf = NaN through f at the masked positions.
    def clean(x):
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))

    # fp32 throughout: exp of bf16 log-ratios and bf16 token sums lose the precision the clip test needs
    logp = clean(logp.float())
    logp_old = clean(logp_old.detach().float())
    adv = clean(advantages.detach().to(logp.dtype).expand_as(logp))
    fmask = mask.to(logp.dtype)

    per_token, token_metrics = POLICY_LOSSES[config.name](logp, logp_old, adv, config)
    metrics: dict[str, torch.Tensor] = {}
    if logp_gen is not None:
        logp_gen = clean(logp_gen.detach().to(logp.dtype))
        metrics["token_mult_prob_error"] = (torch.exp((logp_old - logp_gen).abs()) * fmask).sum()
        if config.is_cap is not None:
            w = truncated_is_weight(logp_old, logp_gen, config.is_cap)
            per_token = per_token * w
            metrics["is_weight_mean"] = (w * fmask).sum()
    policy_sum = (per_token * fmask).sum()
    loss_sum = policy_sum
    if logp_ref is not None:
        kl = k3_kl(logp, clean(logp_ref.detach().to(logp.dtype)), config.kl_log_ratio_clamp, config.kl_value_clamp)
        kl_sum = (kl * fmask).sum()
        if config.kl_beta > 0:
            loss_sum = loss_sum + config.kl_beta * kl_sum
        metrics["kl"] = kl_sum.detach()

    with torch.no_grad():
        ratio = torch.exp(logp - logp_old) * fmask
        metrics["ratio_mean"] = ratio.sum()
        metrics["ratio_max"] = ratio.max() if ratio.numel() else ratio.sum()
        metrics["policy_loss"] = policy_sum.detach()
        for k, v in token_metrics.items():
            metrics[k] = (v * fmask).sum()
        if entropy is not None:
            metrics["entropy"] = (clean(entropy.detach().float()) * fmask).sum()
    return PolicyLossOutput(loss_sum, fmask.sum(), metrics)


def reduce_metrics(parts: list[dict[str, torch.Tensor]], num_tokens: float) -> dict[str, float]:
    """Per-micro-batch metric dicts → floats: token sums divided by ``num_tokens`` (the global target count),
    :data:`MAX_METRICS` maxed. Across ranks, all-reduce the sums (SUM) and maxima (MAX) first."""
    out: dict[str, float] = {}
    for key in sorted({k for p in parts for k in p}):
        vals = [float(p[key]) for p in parts if key in p]
        out[key] = max(vals) if key in MAX_METRICS else sum(vals) / max(float(num_tokens), 1.0)
    return out
