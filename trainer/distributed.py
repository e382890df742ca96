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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: ParallelConfig) -> DistInfo:
    for key in ("tp", "cp", "ep"):
        if getattr(cfg, key) != 1:
            raise ConfigError(
                f"parallel.{key}={getattr(cfg, key)}: tensor/context/expert parallelism is not available yet "
                f"(it arrives with the MoE/EP issue); use 1"
            )
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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


class DataParallelEngine:
    """Replicated model, gradients summed over ranks (plain data parallelism, any backend).

    The loop scales each micro-batch loss by ``world_size / global_target_tokens`` so that after the
    all-reduce *mean* the gradient is exactly Σ(token losses) / global tokens, independent of how the
    global batch is split over ranks and micro-batches.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo):
        self.model, self.optimizer, self.info = model, optimizer, info
        if info.distributed:  # identical start on every rank, whatever each rank's RNG did
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_gradients(self) -> None:
        if not self.info.distributed:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.info.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset: offset + n].view_as(g))
            offset += n

    def grad_norm_and_clip(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

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
