"""AdamW with weight-decay groups, and learning-rate schedules (registered by name)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import ConfigError, OptimConfig

__all__ = ["DECAY_STYLES", "NO_DECAY_SUFFIXES", "build_optimizer", "lr_at", "SCHEDULES", "validate_optim"]

# No weight decay on norms, biases, the SSM's A_log / D / dt_bias, and the router's correction bias
# (a buffer, listed for completeness), nor on any 1-D parameter.
NO_DECAY_SUFFIXES = ("bias", "norm.weight", "norm_f.weight", "A_log", "D", "dt_bias", "e_score_correction_bias")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def _warmup(step: int, cfg: OptimConfig) -> float | None:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return None


def _wsd(step: int, total: int, cfg: OptimConfig) -> float:
    """Warmup → stable at lr → decay to min_lr over the last ``decay_fraction`` of the steps."""
    w = _warmup(step, cfg)
    if w is not None:
        return w
    if cfg.decay_fraction <= 0:
        return cfg.lr
    decay_steps = max(1, round(total * cfg.decay_fraction))
    decay_start = total - decay_steps
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    if cfg.decay_style == "sqrt":
        factor = 1.0 - math.sqrt(progress)
    else:
        assert cfg.decay_style == "linear", cfg.decay_style  # validate_optim checked it
        factor = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def _cosine(step: int, total: int, cfg: OptimConfig) -> float:
    w = _warmup(step, cfg)
    if w is not None:
        return w
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps + 1) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def _constant(step: int, total: int, cfg: OptimConfig) -> float:
    w = _warmup(step, cfg)
    return cfg.lr if w is None else w


SCHEDULES: dict[str, Callable[[int, int, OptimConfig], float]] = {"wsd": _wsd, "cosine": _cosine, "constant": _constant}

#: ``optim.decay_style`` values of the wsd schedule
DECAY_STYLES = ("linear", "sqrt")


def validate_optim(cfg: OptimConfig) -> None:
    """Refuse (ConfigError) optimizer settings that would fail only later in the run, or inside AdamW."""
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {sorted(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.decay_style not in DECAY_STYLES:
        raise ConfigError(f"optim.decay_style must be one of {list(DECAY_STYLES)}, got {cfg.decay_style!r}")
    for key in ("lr", "min_lr", "weight_decay", "eps", "clip_grad", "expert_bias_update_rate"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"optim.{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(cfg, key)}")


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {sorted(SCHEDULES)}, got {cfg.schedule!r}")
    return SCHEDULES[cfg.schedule](step, total_steps, cfg)
