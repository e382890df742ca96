"""Process topology: who this process is, which groups it belongs to.

``init_distributed`` reads torchrun/Slurm-launcher variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR/PORT``), starts a process group (gloo on CPU, nccl on CUDA) and, under expert parallelism,
megatron-core's expert groups. The loop never talks to a process group: it drives an *engine*
(:mod:`tandem.trainer.parallel.engines`) and reads this :class:`DistInfo`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tandem.trainer.config import ConfigError, ParallelConfig

from .expert import init_parallel_groups

__all__ = ["DistInfo", "Meshes", "all_reduce_sum", "device_meshes", "init_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ep: int = 1
    ep_group: object = None  # megatron-core expert-model-parallel group (ep > 1)
    expert_dp_group: object = None  # ranks holding the same experts
    cp: int = 1
    cp_group: object = None  # megatron-core context-parallel group (cp > 1): the ranks sharing rows
    dp_rank_: int | None = None  # data-parallel replica index under cp > 1 (None: rank)

    @property
    def dp_rank(self) -> int:
        """Which rows this rank reads: ranks of one CP group read the same rows (replica index)."""
        return self.rank if self.dp_rank_ is None else self.dp_rank_

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: ``world / cp`` (tp = 1)."""
        return self.world_size // self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: ParallelConfig) -> DistInfo:
    if cfg.tp != 1:
        raise ConfigError(f"parallel.tp={cfg.tp}: tensor parallelism is not available yet; use 1")
    if cfg.cp < 1:
        raise ConfigError(f"parallel.cp must be >= 1, got {cfg.cp}")
    if cfg.ep < 1:
        raise ConfigError(f"parallel.ep must be >= 1, got {cfg.ep}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0 (no ZeRO), 1, 2 or 3, got {cfg.zero_stage}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine = getattr(cfg, "engine", "auto")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"parallel.backend must be auto, gloo or nccl, got {cfg.backend!r}")
    if cfg.ep > 1 and world % cfg.ep:
        raise ConfigError(f"parallel.ep={cfg.ep} must divide the number of processes ({world})")
    if cfg.cp > 1 and world % cfg.cp:
        raise ConfigError(f"parallel.cp={cfg.cp} must divide the number of processes ({world})")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    elif engine == "fsdp" and not dist.is_initialized():
        # FSDP2 shards over a DeviceMesh, which needs a process group even for one process; an in-memory
        # store makes that group without torchrun's rendezvous variables.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    if cfg.ep == 1 and cfg.cp == 1:
        return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)
    # megatron-core numbers ranks tp-cp-ep-dp: a CP group is cp consecutive ranks (tp = 1), a data-parallel
    # replica is one CP group; EP groups may span CP ranks (tokens are independent of where they came from)
    ps = init_parallel_groups(cfg.tp, cfg.cp, cfg.ep)
    extra = {}
    if cfg.ep > 1:
        extra.update(ep=cfg.ep, ep_group=ps.get_expert_model_parallel_group(),
                     expert_dp_group=ps.get_expert_data_parallel_group())
    if cfg.cp > 1:
        extra.update(cp=cfg.cp, cp_group=ps.get_context_parallel_group(), dp_rank_=ps.get_data_parallel_rank())
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, **extra)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum Python scalars over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@dataclass(frozen=True)
class Meshes:
    """The DeviceMeshes of a run, built on the process groups ``init_distributed`` already made.

    - ``dp``: 1-D over every rank — dense parameters shard (FSDP) or replicate over it;
    - ``edp``: 1-D over the ranks holding the same experts (megatron-core's expert-data-parallel group;
      every rank when ``ep == 1``) — expert parameters shard over it;
    - ``experts`` (``ep > 1`` only; None otherwise): 2-D ``("ep", "edp")`` over all ranks, ``mesh[j, i]`` = the rank holding EP slice ``j`` as
      expert-data-parallel member ``i``. No collective runs on it in training; it names where each piece
      of a whole ``[E, ...]`` expert tensor lives, so checkpoints can store experts under their global
      shape (``DTensor`` with ``Shard(0)`` over ``ep``), independent of the layout that wrote them.
    """

    dp: object
    edp: object
    experts: object


_MESHES: dict[tuple, Meshes] = {}


def device_meshes(info: DistInfo) -> Meshes:
    """The run's :class:`Meshes` (cached; the first call is collective-free: it reuses existing groups).

    Megatron-core numbers ranks with the expert-parallel index fastest (EP groups are consecutive ranks,
    e.g. world 4, EP 2: EP [0, 1], [2, 3]; expert-data-parallel [0, 2], [1, 3]), so the ``experts`` mesh
    is ``arange(world).view(world / ep, ep)`` transposed.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_initialized():
        raise RuntimeError("device meshes need a process group (init_distributed with parallel.engine=fsdp makes one)")
    key = (info.world_size, info.ep, id(info.ep_group))
    if key not in _MESHES:
        device_type = info.device.type
        world = dist.group.WORLD
        dp = DeviceMesh.from_group(world, device_type, mesh_dim_names=("dp",))
        if info.ep == 1:
            edp, ep_group = dp, None
        else:
            edp = DeviceMesh.from_group(info.expert_dp_group, device_type, mesh_dim_names=("edp",))
            ep_group = info.ep_group
        experts = None
        if info.ep > 1:
            layout = torch.arange(info.world_size, dtype=torch.int).view(info.world_size // info.ep, info.ep).T.contiguous()
            experts = DeviceMesh.from_group([ep_group, info.expert_dp_group], device_type, mesh=layout,
                                            mesh_dim_names=("ep", "edp"))
        _MESHES[key] = Meshes(dp=dp, edp=edp, experts=experts)
    return _MESHES[key]
