"""The engine registry: which data-parallel back-end drives the shared loop for a ``parallel`` config.

Every engine has the same methods (see :class:`~tandem.trainer.parallel.data_parallel.DataParallelEngine`),
so the loop never knows which one runs it. A back-end registers a builder under a name and says when it
applies; :func:`build_engine` picks the first that does. Builders import their back-end lazily: DeepSpeed
takes seconds to import and is only loaded by runs that ask for ZeRO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from tandem.trainer.config import ParallelConfig

from .distributed import DistInfo

__all__ = ["DEFAULT_ENGINE", "ENGINES", "Engine", "EngineSpec", "build_engine", "register_engine"]


class Engine(Protocol):
    """What the shared loop and the checkpoint manager call on a data-parallel back-end."""

    optimizer: torch.optim.Optimizer

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Accumulate the gradients of one micro-batch (``last``: the step's final micro-batch)."""

    def finish_step(self, max_norm: float, loss_finite: bool = True) -> tuple[torch.Tensor, bool]:
        """Reduce, clip and step (unless the loss or norm is non-finite); ``(grad_norm, stepped)``."""

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Python scalars summed over all ranks."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The parallelism-independent model state dict (a collective when anything is sharded)."""

    def optimizer_state(self) -> dict:
        """Optimizer state keyed by parameter name, expert tensors whole (a collective under EP/ZeRO)."""

    def load_optimizer_state(self, saved: dict, source: Path) -> None:
        """Restore what :meth:`optimizer_state` returned, at any parallel layout."""


@dataclass(frozen=True)
class EngineSpec:
    name: str
    applies: Callable[[ParallelConfig], bool]
    build: Callable  # (model, optimizer, info, parallel, optim, stage) -> engine


#: registered engines by name; :data:`DEFAULT_ENGINE` runs every config no other engine claims
ENGINES: dict[str, EngineSpec] = {}
DEFAULT_ENGINE = "ddp"


def register_engine(name: str, applies: Callable[[ParallelConfig], bool]):
    """Decorator: register ``build(model, optimizer, info, parallel, optim, stage)`` under ``name``."""

    def deco(build):
        if name in ENGINES:
            raise ValueError(f"engine {name!r} is already registered")
        ENGINES[name] = EngineSpec(name, applies, build)
        return build

    return deco


@register_engine(DEFAULT_ENGINE, applies=lambda parallel: True)
def _build_data_parallel(model, optimizer, info: DistInfo, parallel, optim, stage):
    from .data_parallel import DataParallelEngine

    return DataParallelEngine(model, optimizer, info)


@register_engine("zero", applies=lambda parallel: parallel.zero_stage > 0)
def _build_zero(model, optimizer, info: DistInfo, parallel, optim, stage):
    from .zero import DeepSpeedEngine

    return DeepSpeedEngine(model, optimizer, info, parallel, optim, stage)


def build_engine(model, optimizer, info: DistInfo, parallel: ParallelConfig, optim, stage):
    """The engine for ``parallel``: DeepSpeed ZeRO when ``zero_stage > 0``, else the plain one (both with EP)."""
    for spec in ENGINES.values():
        if spec.name != DEFAULT_ENGINE and spec.applies(parallel):
            return spec.build(model, optimizer, info, parallel, optim, stage)
    return ENGINES[DEFAULT_ENGINE].build(model, optimizer, info, parallel, optim, stage)
