"""Sparse MoE of NemotronH: router, token dispatch and grouped experts as sibling pieces.

- :class:`TopKRouter` (checkpoint name ``gate``): fp32 logits → sigmoid scores; experts are *chosen* on
  ``score + e_score_correction_bias`` (the aux-loss-free balancing bias, a buffer never touched by
  gradients) but *weighted* by the unbiased scores, normalised to sum 1, times ``routed_scaling_factor``.
- :func:`permute_tokens` / :func:`unpermute_tokens`: sort token copies by expert and back (dropless).
  Expert parallelism swaps these for an all-to-all dispatcher without touching the maths.
- :class:`GroupedExperts`: all routed experts' weights as 3-D tensors ``up_proj [E, I, H]`` and
  ``down_proj [E, H, I]``; they see ``(tokens sorted by expert, tokens_per_expert)``.
- a shared expert (a plain :class:`~model.mlp.MLP`), added unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig
from .mlp import ACTIVATIONS, MLP


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E] fp32
    scores: torch.Tensor  # [N, E] fp32, sigmoid(logits)
    topk_idx: torch.Tensor  # [N, k] int64
    topk_weights: torch.Tensor  # [N, k] fp32


def select_experts(
    scores: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token on ``scores + bias``; weight them by the unbiased ``scores``.

    With ``n_group > 1`` (DeepSeek-V3 style group-limited routing) only experts in the ``topk_group``
    groups with the highest sum of their two best biased scores are eligible. Returns ``(idx, weights)``.
    """
    n, e = scores.shape
    choice = scores + bias
    if n_group > 1:
        group_scores = choice.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
        top_groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        allowed = allowed[:, :, None].expand(n, n_group, e // n_group).reshape(n, e)
        choice = choice.masked_fill(~allowed, float("-inf"))
    idx = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return idx, weights * routed_scaling_factor


class TopKRouter(nn.Module):
    """Sigmoid top-k router. Its weight and bias stay fp32 whatever dtype the model is cast to."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast the router; keep it fp32 as in the release.
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()
        idx, weights = select_experts(
            scores, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
            self.norm_topk_prob, self.routed_scaling_factor,
        )
        return RouterOutput(logits, scores, idx, weights)


def permute_tokens(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
    """Copy each token once per chosen expert and sort the copies by expert (stable).

    Returns ``(x_sorted [N·k, H], order [N·k], tokens_per_expert [E])`` where ``order[j]`` is the flat
    (token·k + slot) index of sorted row ``j``.
    """
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    x_sorted = x[order // k]
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    return x_sorted, order, tokens_per_expert


def unpermute_tokens(y_sorted: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int):
    """Weight each expert output by its routing weight and sum the copies back per token (in fp32)."""
    k = topk_weights.shape[1]
    w = topk_weights.reshape(-1)[order].float()
    out = torch.zeros(num_tokens, y_sorted.shape[-1], dtype=torch.float32, device=y_sorted.device)
    return out.index_add_(0, order // k, y_sorted.float() * w[:, None])


class GroupedExperts(nn.Module):
    """All routed experts of one layer: ``down_e(act(up_e(x)))`` on the rows routed to expert ``e``.

    ``forward`` is the reference per-expert loop over contiguous row ranges; a grouped-GEMM backend can
    replace it without changing parameters or call signature. ``matmul(x, weight)`` (default
    ``F.linear``) is the one place each expert GEMM happens, so a precision backend (FP8/NVFP4 emulation)
    can wrap it without touching the routing maths.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "relu2"):
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACTIVATIONS[activation]
        self.matmul = F.linear

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert.tolist()
        outs = []
        for e, rows in enumerate(x_sorted.split(counts)):
            if rows.shape[0]:
                outs.append(self.matmul(self.act_fn(self.matmul(rows, self.up_proj[e])), self.down_proj[e]))
        if not outs:
            return x_sorted.new_zeros(0, self.down_proj.shape[1])
        return torch.cat(outs)


class MoE(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.n_routed_experts
        self.gate = TopKRouter(config)
        expert_dim = config.moe_latent_size or config.hidden_size
        if config.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(config.hidden_size, config.moe_latent_size, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(config.moe_latent_size, config.hidden_size, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        self.experts = GroupedExperts(config.n_routed_experts, expert_dim, config.moe_intermediate_size, config.mlp_hidden_act)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_shared_expert_intermediate_size, config.mlp_bias, config.mlp_hidden_act)
            if config.n_shared_experts else None
        )
        # Routing statistics of the last forward (detached), read by load-balancing/monitoring code.
        self.last_tokens_per_expert: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        routing = self.gate(x)
        if self.fc1_latent_proj is not None:
            x = self.fc1_latent_proj(x)
        x_sorted, order, tokens_per_expert = permute_tokens(x, routing.topk_idx, self.num_experts)
        self.last_tokens_per_expert = tokens_per_expert.detach()
        y_sorted = self.experts(x_sorted, tokens_per_expert)
        y = unpermute_tokens(y_sorted, order, routing.topk_weights, x.shape[0]).to(hidden.dtype)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        y = y.view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden)
        return y
