"""Expert parallelism: shard every MoE layer's experts over ``parallel.ep`` ranks.

Applied by the trainer to a built model (model/ stays single-device code): each MoE keeps experts
``[r·E/ep, (r+1)·E/ep)`` and gets an :class:`AllToAllDispatcher` that sends every token copy to the rank
holding its expert and back, with uneven splits, over megatron-core's expert-model-parallel group.

Gradient reduction (done by :class:`tandem.trainer.parallel.data_parallel.DataParallelEngine`): dense parameters are summed
over the data-parallel group, expert parameters over the expert-data-parallel group (the ranks holding the
same experts); both are divided by the world size, because each rank's loss is already scaled by
``world / global tokens`` and an expert shard's gradient already sums the tokens of its whole EP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tandem.model.moe import MoE, permute_tokens, unpermute_tokens

__all__ = ["AllToAllDispatcher", "apply_expert_parallel", "is_expert_param", "gather_full_state_dict", "init_parallel_groups"]


def init_parallel_groups(tp: int, cp: int, ep: int):
    """megatron-core process groups for (tp, cp, ep); data-parallel size is derived by megatron."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, context_parallel_size=cp,
            expert_model_parallel_size=ep,
        )
    return ps


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


class AllToAllDispatcher:
    """Token dispatch across the expert-parallel group (same interface as ``tandem.model.moe.LocalDispatcher``)."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.num_local = num_experts // self.ep

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
        x_sorted, order, counts = permute_tokens(x, topk_idx, num_experts)
        send = counts.view(self.ep, self.num_local)  # row d: my token copies for rank d's experts
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)  # row s: from rank s for my experts
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = _AllToAll.apply(x_sorted, out_splits, in_splits, self.group)
        # x_recv is source-major (s, e); the experts want expert-major (e, s) rows.
        flat = recv.reshape(-1)
        starts = torch.cumsum(flat, 0) - flat
        perm = torch.cat([
            torch.arange(int(starts[s * self.num_local + e]), int(starts[s * self.num_local + e] + flat[s * self.num_local + e]))
            for e in range(self.num_local) for s in range(self.ep)
        ] or [torch.zeros(0, dtype=torch.long)]).to(x.device)
        return x_recv[perm], recv.sum(0), (order, perm, in_splits, out_splits)

    def combine(self, y_local: torch.Tensor, ctx, topk_weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
        order, perm, in_splits, out_splits = ctx
        y_recv = y_local.new_zeros(y_local.shape).index_copy(0, perm, y_local)
        y_sorted = _AllToAll.apply(y_recv, in_splits, out_splits, self.group)
        return unpermute_tokens(y_sorted, order, topk_weights, num_tokens)


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "expert_parallel", False)


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, group) -> None:
    """Keep this rank's slice of every MoE layer's experts and install the all-to-all dispatcher."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        experts = m.experts
        total = experts.num_experts
        if total % ep:
            raise ValueError(f"n_routed_experts ({total}) must be divisible by parallel.ep ({ep})")
        local = total // ep
        lo = rank * local
        experts.up_proj = nn.Parameter(experts.up_proj[lo: lo + local].clone())
        experts.down_proj = nn.Parameter(experts.down_proj[lo: lo + local].clone())
        experts.num_experts, experts.total_experts, experts.expert_offset = local, total, lo
        for p in (experts.up_proj, experts.down_proj):
            p.expert_parallel = True
        m.dispatcher = AllToAllDispatcher(group, total)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, group) -> dict[str, torch.Tensor]:
    """The parallelism-independent state dict: expert shards all-gathered over the EP group (collective)."""
    state = {}
    sharded = {f"{name}.{proj}" for name, m in model.named_modules() if getattr(m, "total_experts", 0) != getattr(m, "num_experts", 0)
               for proj in ("up_proj", "down_proj")}
    for name, t in model.state_dict().items():
        if name in sharded:
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts)
        state[name] = t
    return state
