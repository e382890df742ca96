"""The engine registry: which data-parallel back-end drives the shared loop for a ``parallel`` config.

Every engine has the same methods (see :class:`~tandem.trainer.parallel.data_parallel.DataParallelEngine`),
so the loop never knows which one runs it. A back-end registers a builder under a name and says when
``parallel.engine=auto`` picks it; :func:`engine_name` resolves the choice, :func:`build_engine` builds it. Builders import their back-end lazily: DeepSpeed
takes seconds to import and is only loaded by runs that ask for ZeRO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from tandem.trainer.config import ConfigError, ParallelConfig

from .distributed import DistInfo

__all__ = ["DEFAULT_ENGINE", "ENGINES", "Engine", "EngineSpec", "build_engine", "engine_name", "register_engine"]


class Engine(Protocol):
    """What the shared loop and the checkpoint manager call on a data-parallel back-end.

    An engine whose spec has ``sharded_checkpoints`` (FSDP2) also has ``sharded_checkpoints = True``,
    ``sharded_state_dict()`` (this rank's pieces of model and optimizer under global names and shapes) and
    ``load_sharded_state_dict(loaded, source)``; the checkpoint manager then saves and resumes through
    torch.distributed.checkpoint instead of ``full_state_dict`` / ``optimizer_state``.
    """

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
    applies: Callable  # (parallel, info, stage) -> bool: does ``parallel.engine=auto`` pick it?
    build: Callable  # (model, optimizer, info, parallel, optim, stage) -> engine
    #: checkpoints through torch.distributed.checkpoint (each rank writes its shards) instead of the gathered
    #: layout (model/ + optimizer.pt written by rank 0); see tandem.trainer.checkpoint.manager
    sharded_checkpoints: bool = False
    #: ``(model, info, parallel) -> None``: shard a model still on ``meta``, so that building it allocates only
    #: this rank's shards (FSDP2); None = the engine wraps the built, whole model
    shard_on_meta: Callable | None = None


#: registered engines by name; :data:`DEFAULT_ENGINE` runs every config no other engine claims
ENGINES: dict[str, EngineSpec] = {}
DEFAULT_ENGINE = "ddp"


def register_engine(name: str, applies: Callable, *, sharded_checkpoints: bool = False,
                    shard_on_meta: Callable | None = None):
    """Decorator: register ``build(model, optimizer, info, parallel, optim, stage)`` under ``name``;
    ``applies(parallel, info, stage)`` says whether ``parallel.engine=auto`` chooses it."""

    def deco(build):
        if name in ENGINES:
            raise ValueError(f"engine {name!r} is already registered")
        ENGINES[name] = EngineSpec(name, applies, build, sharded_checkpoints, shard_on_meta)
        return build

    return deco


@register_engine(DEFAULT_ENGINE, applies=lambda parallel, info, stage=None: True)
def _build_data_parallel(model, optimizer, info: DistInfo, parallel, optim, stage):
    from .data_parallel import DataParallelEngine

    return DataParallelEngine(model, optimizer, info)


@register_engine("zero", applies=lambda parallel, info, stage=None: parallel.zero_stage > 0)
def _build_zero(model, optimizer, info: DistInfo, parallel, optim, stage):
    from .zero import DeepSpeedEngine

    return DeepSpeedEngine(model, optimizer, info, parallel, optim, stage)


def _shard_fsdp(model, info: DistInfo, parallel):
    from .fsdp import shard_model

    shard_model(model, info, parallel)


@register_engine("fsdp", sharded_checkpoints=True, shard_on_meta=_shard_fsdp,
                 applies=lambda parallel, info, stage=None: info.device.type == "cuda" and info.world_size > 1)
def _build_fsdp(model, optimizer, info: DistInfo, parallel, optim, stage):
    """Also for stages that generate (GRPO, RLHF): their rollouts run the ranks' forwards in lockstep
    (:class:`~.lockstep.LockstepGeneration`), so every rank joins each block's weight all-gather."""
    from .fsdp import FSDPEngine

    return FSDPEngine(model, optimizer, info, parallel)


def engine_name(parallel: ParallelConfig, info: DistInfo, stage=None) -> str:
    """The engine ``parallel`` selects: ``parallel.engine``, or for ``auto`` the first registered engine
    (in registration order, the default last) whose ``applies`` says yes — ZeRO when ``zero_stage > 0``,
    FSDP2 on CUDA with more than one process, else the plain engine."""
    name = getattr(parallel, "engine", "auto")
    if name != "auto":
        if name not in ENGINES:
            raise ConfigError(f"parallel.engine must be one of {['auto', *ENGINES]}, got {name!r}")
        return name
    for spec in ENGINES.values():
        if spec.name != DEFAULT_ENGINE and spec.applies(parallel, info, stage):
            return spec.name
    return DEFAULT_ENGINE


def build_engine(model, optimizer, info: DistInfo, parallel: ParallelConfig, optim, stage):
    """The engine :func:`engine_name` picks for ``parallel``, wrapped around ``model`` and ``optimizer``."""
    return ENGINES[engine_name(parallel, info, stage)].build(model, optimizer, info, parallel, optim, stage)
