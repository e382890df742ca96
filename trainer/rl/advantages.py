"""Group-relative advantages for GRPO over rewards shaped ``[num_groups, G]`` (G rollouts per prompt).

    >>> out = compute_advantages(rewards, estimator="leave_one_out", clip=None,
    ...                          truncated=finish_is_length, overlong_filtering=True)
    >>> out.advantages, out.loss_mask          # [num_groups, G] float, [num_groups, G] bool
    >>> advantage_metrics(rewards, out)        # reward_mean, frac_reward_zero_std, advantage_max, ...

Every estimator is a small registered function (:data:`ADVANTAGE_ESTIMATORS`, :func:`register_advantage`)
chosen by name from the config. All of them are vectorised over groups and never synchronise with the
host (no ``.item()``): the stage may call them on GPU tensors between generation and training.

Standard deviation: every estimator that divides by a std uses the *unbiased* (Bessel, ``n − 1``) std of
the **whole** group, rewards of truncated rollouts included — ``torch.std``'s default, the same as TRL's
GRPO. For G = 1 it is undefined; such a group has no signal and every advantage is 0.

Dynamic sampling (DAPO, Yu et al. 2025, §3.2) lives here too: :func:`dynamic_sampling_filter` keeps the
groups whose rewards are not all equal and :class:`GroupAccumulator` collects kept groups over refill
rounds. Deciding to generate again is a host decision, so those two do synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = [
    "ADVANTAGE_ESTIMATORS", "DEFAULT_ADVANTAGE", "GroupAdvantages", "register_advantage", "compute_advantages",
    "group_std", "leave_one_out", "group_mean", "no_std", "advantage_metrics", "nonzero_variance_groups",
    "DynamicFilter", "dynamic_sampling_filter", "GroupAccumulator",
]

#: name → ``fn(rewards [N, G] float, eps) -> advantages [N, G]``
ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {}
DEFAULT_ADVANTAGE = "leave_one_out"


def register_advantage(name: str):
    """Decorator: add an estimator ``fn(rewards [N, G], eps) -> [N, G]`` under ``name``."""

    def deco(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased std of each group, ``[N, 1]``; 0 for groups of one (where it is undefined)."""
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards[:, :1])
    return rewards.std(dim=-1, keepdim=True, unbiased=True)


def _normalise(centred: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    # Divide only where the group has variance: a zero-variance group's centred rewards are already 0,
    # and dividing 0 by eps would turn float round-off into large advantages.
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


@register_advantage("leave_one_out")
def leave_one_out(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """RLOO baseline (Ahmadian et al. 2024): ``b_i = Σ_{j≠i} r_j / (G−1)``,
    ``A_i = (r_i − b_i) / (std + eps)`` where std > 0, else 0. G = 1 gives 0.

    Excluding r_i from its own baseline keeps the estimator unbiased; ``r_i − b_i = G/(G−1)·(r_i − mean)``.
    """
    g = rewards.shape[-1]
    if g < 2:
        return torch.zeros_like(rewards)
    baseline = (rewards.sum(dim=-1, keepdim=True) - rewards) / (g - 1)
    return _normalise(rewards - baseline, group_std(rewards), eps)


@register_advantage("group_mean")
def group_mean(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """GRPO as in DeepSeekMath / TRL: ``A_i = (r_i − mean) / (std + eps)`` (0 where std = 0)."""
    return _normalise(rewards - rewards.mean(dim=-1, keepdim=True), group_std(rewards), eps)


@register_advantage("no_std")
def no_std(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): ``A_i = r_i − mean``, no std division (it up-weights easy/hard prompts)."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # [N, G] float: 0 where loss_mask is False
    loss_mask: torch.Tensor  # [N, G] bool: False for rollouts removed by overlong filtering
    std: torch.Tensor  # [N, 1] the group std used (unbiased, all rollouts of the group)


def compute_advantages(rewards: torch.Tensor, *, estimator: str = DEFAULT_ADVANTAGE, eps: float = 1e-6,
                       clip: float | None = None, truncated: torch.Tensor | None = None,
                       overlong_filtering: bool = False) -> GroupAdvantages:
    """Advantages of ``rewards`` ``[num_groups, G]`` with the named estimator.

    ``clip``: if set, advantages are clamped to ``[−clip, clip]`` (symmetric; after normalisation).
    ``overlong_filtering`` (DAPO §3.4): rollouts with ``truncated`` True (``finish_reason == "length"``)
    still count in their group's baseline and std — their reward is real information about the prompt —
    but get advantage 0 and ``loss_mask`` False, so a cut-off answer is neither rewarded nor punished.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"advantage clip must be > 0 or None, got {clip}")
    if overlong_filtering and truncated is None:
        raise ValueError("overlong_filtering needs the per-rollout `truncated` mask")
    r = rewards.float()
    adv = ADVANTAGE_ESTIMATORS[estimator](r, eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    mask = torch.ones_like(r, dtype=torch.bool)
    if overlong_filtering:
        if truncated.shape != r.shape:
            raise ValueError(f"truncated must have the rewards' shape {tuple(r.shape)}, got {tuple(truncated.shape)}")
        mask = ~truncated.to(device=r.device, dtype=torch.bool)
        adv = torch.where(mask, adv, torch.zeros_like(adv))
    return GroupAdvantages(adv, mask, group_std(r))


def advantage_metrics(rewards: torch.Tensor, out: GroupAdvantages) -> dict[str, torch.Tensor]:
    """0-d tensors: ``reward_mean``, ``reward_std`` (unbiased, over all rollouts), ``frac_reward_zero_std``
    (fraction of groups whose rewards are all equal — they carry no signal), and ``advantage_mean`` /
    ``advantage_std`` / ``advantage_min`` / ``advantage_max`` over the rollouts kept by ``loss_mask``
    (0 if none is kept), plus ``frac_filtered`` (rollouts removed by overlong filtering)."""
    r = rewards.float()
    m = out.loss_mask
    a = out.advantages
    n = m.sum().clamp_min(1)
    zero = torch.zeros((), device=a.device)
    mean = torch.where(m, a, 0).sum() / n
    var = torch.where(m, (a - mean) ** 2, 0).sum() / (n - 1).clamp_min(1)
    big = torch.finfo(a.dtype).max
    return {
        "reward_mean": r.mean(),
        "reward_std": r.flatten().std() if r.numel() > 1 else zero,
        "frac_reward_zero_std": (~nonzero_variance_groups(r)).float().mean(),
        "advantage_mean": mean,
        "advantage_std": var.sqrt(),
        "advantage_min": torch.where(m.any(), torch.where(m, a, big).min(), zero),
        "advantage_max": torch.where(m.any(), torch.where(m, a, -big).max(), zero),
        "frac_filtered": (~m).float().mean(),
    }


# --- dynamic sampling ----------------------------------------------------------------------------------

def nonzero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: groups whose rewards are not all equal (exact comparison; G = 1 is never kept)."""
    return (rewards != rewards[:, :1]).any(dim=-1)


@dataclass
class DynamicFilter:
    keep: torch.Tensor  # [N] bool
    num_kept: int
    num_refill: int  # groups to generate again to get back to N (or to ``target``)


def dynamic_sampling_filter(rewards: torch.Tensor, target: int | None = None) -> DynamicFilter:
    """Keep groups with non-zero reward variance (DAPO dynamic sampling); ``num_refill`` is how many groups
    are missing to reach ``target`` (default: the number of groups given). Synchronises (host ints)."""
    keep = nonzero_variance_groups(rewards)
    kept = int(keep.sum())
    target = rewards.shape[0] if target is None else target
    return DynamicFilter(keep, kept, max(target - kept, 0))


@dataclass
class GroupAccumulator:
    """Collects groups with reward variance over refill rounds until ``target`` groups or ``max_rounds``.

        acc = GroupAccumulator(target=num_prompts, max_rounds=3)
        while not acc.done:
            rewards = rollout(next_prompts(acc.needed))   # [acc.needed, G] (or more, to over-sample)
            acc.add(rewards)
        acc.kept            # [(round, index in that round), ...] in order, at most `target`
        acc.reached_target  # False when max_rounds ran out first: train on fewer groups, or skip the step

    Groups beyond ``target`` in the last round are dropped (the first ones are kept, so the choice does
    not depend on the rewards' values).
    """

    target: int
    max_rounds: int
    kept: list[tuple[int, int]] = field(default_factory=list)
    rounds: int = 0
    seen: int = 0

    def __post_init__(self):
        if self.target < 1 or self.max_rounds < 1:
            raise ValueError(f"target ({self.target}) and max_rounds ({self.max_rounds}) must be >= 1")

    @property
    def needed(self) -> int:
        return self.target - len(self.kept)

    @property
    def reached_target(self) -> bool:
        return self.needed == 0

    @property
    def done(self) -> bool:
        return self.reached_target or self.rounds >= self.max_rounds

    def add(self, rewards: torch.Tensor) -> torch.Tensor:
        """Record one round's ``[n, G]`` rewards; returns this round's ``[n]`` bool mask of groups kept."""
        if self.done:
            raise RuntimeError("GroupAccumulator.add after done (target reached or max_rounds used)")
        keep = nonzero_variance_groups(rewards)
        idx = keep.nonzero().flatten()[: self.needed].tolist()
        self.kept += [(self.rounds, i) for i in idx]
        self.rounds += 1
        self.seen += rewards.shape[0]
        mask = torch.zeros_like(keep)
        mask[idx] = True
        return mask
