"""Process topology and the data-parallel engine the shared loop drives.

``init_distributed`` reads torchrun/Slurm-launcher variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR/PORT``) and starts a process group (gloo on CPU, nccl on CUDA). The loop talks to an
*engine* — ``backward``, ``reduce_gradients``, ``clip_and_step`` — never to the process group; this is the
seam where DeepSpeed ZeRO and expert parallelism plug in (the MoE/EP issue): they provide another engine
with the same methods.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ParallelConfig

__all__ = ["DistInfo", "DataParallelEngine", "init_distributed", "ConfigError"]


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ep: int = 1
    ep_group: object = None  # megatron-core expert-model-parallel group (ep > 1)
    expert_dp_group: object = None  # ranks holding the same experts

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: ParallelConfig) -> DistInfo:
    for key in ("tp", "cp"):
        if getattr(cfg, key) != 1:
            raise ConfigError(f"parallel.{key}={getattr(cfg, key)}: tensor/context parallelism is not available yet; use 1")
    if cfg.ep < 1:
        raise ConfigError(f"parallel.ep must be >= 1, got {cfg.ep}")
    if cfg.zero_stage != 0:
        raise ConfigError(f"parallel.zero_stage={cfg.zero_stage}: DeepSpeed ZeRO is not available yet; use 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    if cfg.ep == 1:
        return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)
    from .expert_parallel import init_parallel_groups

    ps = init_parallel_groups(cfg.tp, cfg.cp, cfg.ep)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, ep=cfg.ep,
                    ep_group=ps.get_expert_model_parallel_group(), expert_dp_group=ps.get_expert_data_parallel_group())


class DataParallelEngine:
    """Replicated dense parameters (expert parameters sharded when ``ep > 1``), gradients summed over ranks.

    The loop scales each micro-batch loss by ``world_size / global_target_tokens``; dividing the summed
    gradients by the world size then gives exactly Σ(token losses) / global tokens, independent of how
    the global batch is split over ranks and micro-batches. Dense gradients are summed over all ranks;
    expert gradients over the expert-data-parallel group (each shard already holds its EP group's tokens).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo):
        self.model, self.optimizer, self.info = model, optimizer, info
        from .expert_parallel import is_expert_param

        self._is_expert = is_expert_param
        if info.distributed:  # identical dense start on every rank, whatever each rank's RNG did
            with torch.no_grad():
                for p in model.parameters():
                    if not is_expert_param(p):
                        dist.broadcast(p.data, src=0)
                for b in model.buffers():
                    dist.broadcast(b, src=0)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _all_reduce_mean(self, grads: list[torch.Tensor], group) -> None:
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= self.info.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset: offset + n].view_as(g))
            offset += n

    def reduce_gradients(self) -> None:
        if not self.info.distributed:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # a parameter untouched this step still takes part in the collective
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._all_reduce_mean([p.grad for p in params if not self._is_expert(p)], None)
        self._all_reduce_mean([p.grad for p in params if self._is_expert(p)], self.info.expert_dp_group)

    def grad_norm_and_clip(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm (expert shards counted once across the EP group), then clip to ``max_norm``."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        dense = [p.grad for p in params if not self._is_expert(p)]
        expert = [p.grad for p in params if self._is_expert(p)]
        sq = torch.nn.utils.get_total_norm(dense).float() ** 2 if dense else torch.zeros(())
        if expert:
            e_sq = torch.nn.utils.get_total_norm(expert).float() ** 2
            if self.info.ep > 1:
                dist.all_reduce(e_sq, op=dist.ReduceOp.SUM, group=self.info.ep_group)
            sq = sq + e_sq
        norm = sq.sqrt()
        if max_norm > 0 and torch.isfinite(norm):
            torch.nn.utils.clip_grads_with_norm_([p for p in params], max_norm, norm)
        return norm

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum Python scalars over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.info.device)
        if self.info.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()
