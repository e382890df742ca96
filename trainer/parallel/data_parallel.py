"""The default data-parallel engine: replicated dense parameters, gradients summed over ranks.

An engine is what the shared loop drives instead of a process group: ``backward`` per micro-batch,
``finish_step`` (reduce, clip, step), ``full_state_dict`` / ``optimizer_state`` / ``load_optimizer_state``
for checkpoints, ``all_reduce_sum`` for metrics. :mod:`tandem.trainer.parallel.engines` picks one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tandem.trainer.checkpoint.optimizer_state import load_optimizer_state_by_name, optimizer_state_by_name

from .distributed import DistInfo, all_reduce_sum
from .expert import gather_full_state_dict, is_expert_param

__all__ = ["DataParallelEngine"]


class DataParallelEngine:
    """Replicated dense parameters (expert parameters sharded when ``ep > 1``), gradients summed over ranks.

    The loop scales each micro-batch loss by ``world_size / global_target_tokens``; dividing the summed
    gradients by the world size then gives exactly Σ(token losses) / global tokens, independent of how
    the global batch is split over ranks and micro-batches. Dense gradients are summed over all ranks;
    expert gradients over the expert-data-parallel group (each shard already holds its EP group's tokens).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo):
        self.model, self.optimizer, self.info = model, optimizer, info
        self._is_expert = is_expert_param
        if info.distributed:  # identical dense start on every rank, whatever each rank's RNG did
            with torch.no_grad():
                for p in model.parameters():
                    if not is_expert_param(p):
                        dist.broadcast(p.data, src=0)
                persistent = set(model.state_dict())
                for name, b in model.named_buffers():
                    if name in persistent:  # e.g. the router's correction bias; not runtime counters
                        dist.broadcast(b, src=0)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Accumulate gradients of one micro-batch (``last``: the step's final micro-batch)."""
        loss.backward()

    def finish_step(self, max_norm: float, loss_finite: bool = True) -> tuple[torch.Tensor, bool]:
        """Reduce gradients, clip, and take the optimizer step unless the loss or norm is non-finite.

        Returns ``(grad_norm, stepped)``; gradients are cleared either way.
        """
        self.reduce_gradients()
        norm = self.grad_norm_and_clip(max_norm)
        stepped = loss_finite and bool(torch.isfinite(norm))
        if stepped:
            self.step()
        self.zero_grad()
        return norm, stepped

    def _all_reduce_mean(self, grads: list[torch.Tensor], group) -> None:
        if not grads:
            return
        if dist.get_world_size(group) == 1:
            # nothing to sum over (the experts when EP spans the world: an expert-data-parallel group of one):
            # scale in place, without the flat copy of every expert gradient
            torch._foreach_div_(grads, self.info.world_size)
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
        if max_norm > 0 and torch.isfinite(norm):  # (a non-finite norm skips the step: nothing to clip)
            torch.nn.utils.clip_grads_with_norm_([p for p in params], max_norm, norm)
        return norm

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.info)

    # -- checkpoints ---------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The parallelism-independent model state dict (expert shards gathered; collective under EP)."""
        if self.info.ep > 1:
            return gather_full_state_dict(self.model, self.info.ep_group)
        return self.model.state_dict()

    def optimizer_state(self) -> dict:
        return optimizer_state_by_name(self.model, self.optimizer, self.info.ep_group if self.info.ep > 1 else None)

    def load_optimizer_state(self, saved: dict, source) -> None:
        load_optimizer_state_by_name(self.model, self.optimizer, saved, source)
