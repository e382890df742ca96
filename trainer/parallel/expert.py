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

__all__ = ["AllToAllDispatcher", "apply_expert_parallel", "expert_slice", "gather_full_state_dict", "init_parallel_groups",
           "is_expert_param", "shard_experts"]


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


def source_to_expert_major(recv: torch.Tensor, total: int) -> torch.Tensor:
    """Row order that turns received token copies from source-major into expert-major order.

    ``recv`` [ep, local experts]: ``recv[s, e]`` copies came from rank ``s`` for local expert ``e``, laid out
    source-major (all of rank 0's, expert by expert, then rank 1's, ...). The experts want every copy of
    expert 0 (from all sources, in source order), then expert 1, ... Each row gets its segment id
    ``s·L + e``; a stable sort on the key ``e·ep + s`` is the permutation. All on the device: the only host
    values are the split sizes the all-to-all needs anyway (``total`` = their sum).
    """
    ep, local = recv.shape
    segments = torch.arange(ep * local, device=recv.device)
    seg_of_row = torch.repeat_interleave(segments, recv.reshape(-1), output_size=total)
    key = (seg_of_row % local) * ep + seg_of_row // local
    return torch.argsort(key, stable=True)


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
        in_splits, out_splits = torch.stack([send.sum(1), recv.sum(1)]).tolist()  # one host sync for both
        x_recv = _AllToAll.apply(x_sorted, out_splits, in_splits, self.group)
        perm = source_to_expert_major(recv, sum(out_splits))
        return x_recv[perm], recv.sum(0), (order, perm, in_splits, out_splits)

    def combine(self, y_local: torch.Tensor, ctx, topk_weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
        order, perm, in_splits, out_splits = ctx
        y_recv = y_local.new_zeros(y_local.shape).index_copy(0, perm, y_local)
        y_sorted = _AllToAll.apply(y_recv, in_splits, out_splits, self.group)
        return unpermute_tokens(y_sorted, order, topk_weights, num_tokens)


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "expert_parallel", False)


def expert_slice(total: int, ep: int, rank: int) -> tuple[int, int]:
    """(offset, count) of the experts rank ``rank`` of an ``ep``-way expert-parallel group holds."""
    if total % ep:
        raise ValueError(f"n_routed_experts ({total}) must be divisible by parallel.ep ({ep})")
    local = total // ep
    return rank * local, local


def shard_experts(model: nn.Module, ep: int, rank: int) -> None:
    """Cut every MoE layer down to the experts of EP rank ``rank`` (no collective; works on meta).

    Run on a model built on the meta device, before it is materialised, so the other ranks' experts are
    never allocated; :func:`apply_expert_parallel` then finishes the job on the materialised model.
    """
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts.keep_experts(*expert_slice(m.experts.total_experts, ep, rank))


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, group) -> None:
    """Hold this rank's slice of every MoE layer's experts and install the all-to-all dispatcher.

    A layer still holding all its experts is cut here (a copy: the full tensors were already allocated);
    one cut on meta by :func:`shard_experts` is only checked. Expert parameters are marked for the engines
    (``expert_parallel``: reduced over the expert-data-parallel group, not all ranks).
    """
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        experts = m.experts
        lo, local = expert_slice(experts.total_experts, ep, rank)
        if experts.num_experts == experts.total_experts:
            experts.keep_experts(lo, local)
        elif (experts.expert_offset, experts.num_experts) != (lo, local):
            raise ValueError(f"layer {m.layer_idx} holds experts [{experts.expert_offset}, "
                             f"{experts.expert_offset + experts.num_experts}), EP rank {rank} of {ep} owns [{lo}, {lo + local})")
        for p in (experts.up_proj, experts.down_proj):
            p.expert_parallel = True
        m.dispatcher = AllToAllDispatcher(group, experts.total_experts)


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

