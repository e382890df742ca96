"""Sparse MoE of NemotronH: router, token dispatch and grouped experts as sibling pieces.

- :class:`TopKRouter` (checkpoint name ``gate``): fp32 logits → sigmoid scores; experts are *chosen* on
  ``score + e_score_correction_bias`` (the aux-loss-free balancing bias, a buffer never touched by
  gradients) but *weighted* by the unbiased scores, normalised to sum 1, times ``routed_scaling_factor``.
- a *dispatcher* (:class:`LocalDispatcher`: :func:`permute_tokens` / :func:`unpermute_tokens`) sorts
  token copies by expert and back (dropless). Expert parallelism installs an all-to-all dispatcher (in
  ``trainer/``) without touching the maths. Permutation is one gather and one scatter-add: memory-bound
  index ops that torch runs as single kernels, so no custom kernel is needed for them.
- :class:`GroupedExperts`: all routed experts' weights as 3-D tensors ``up_proj [E, I, H]`` and
  ``down_proj [E, H, I]``; they see ``(tokens sorted by expert, tokens_per_expert)``.
- a shared expert (a plain :class:`~tandem.model.mlp.MLP`), added unscaled.

Training-time extras (only in ``train()`` mode): an optional sequence-level balance loss
(``moe_aux_loss_coeff``, DeepSeek-V3) and router z-loss (``moe_z_loss_coeff``) collected by
:meth:`MoE.aux_loss`, and per-expert token counts accumulated in ``tokens_per_expert_acc`` for the
aux-loss-free bias update the trainer applies after each optimizer step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig
from .mlp import ACTIVATIONS, MLP


class RouterOutput(NamedTuple):
    """A tuple, so module hooks that walk outputs (ZeRO-3's re-gather before backward) see its tensors."""

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


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


class GroupedExperts(nn.Module):
    """The routed experts held by this process: ``down_e(act(up_e(x)))`` on the rows routed to expert ``e``.

    Called with ``(x_sorted, tokens_per_expert)`` — rows sorted by expert. Two paths, same parameters:

    - grouped: one ``torch.nn.functional.grouped_mm`` per projection over all experts (CPU; CUDA bf16 on
      SM ≥ 9.0), used when ``grouped`` is true and ``matmul`` is the default;
    - reference: a per-expert loop through ``matmul(x, weight)`` (default ``F.linear``), the one place a
      precision backend (FP8/NVFP4 emulation) wraps every expert GEMM.

    ``expert_offset`` is the global id of the first expert held here (non-zero under expert parallelism);
    checkpoint loading uses it to pick this process's experts.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "relu2",
                 grouped: bool = True, expert_offset: int = 0):
        super().__init__()
        self.num_experts = num_experts  # held here
        self.total_experts = num_experts  # in the layer (set by expert parallelism when sharding)
        self.expert_offset = expert_offset
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACTIVATIONS[activation]
        self.matmul = F.linear
        self.grouped = grouped

    def keep_experts(self, offset: int, count: int) -> None:
        """Hold only experts ``[offset, offset + count)`` of the layer (expert parallelism's slice).

        Works on the meta device, so a sharded model is built without ever allocating the other
        experts; :meth:`HybridLM.init_weights <tandem.model.hybrid.HybridLM.init_weights>` then initialises
        each held expert from its global id, as an unsharded model would.
        """
        if not 0 <= offset < offset + count <= self.total_experts or self.num_experts != self.total_experts:
            raise ValueError(f"cannot keep experts [{offset}, {offset + count}) of a layer holding "
                             f"[{self.expert_offset}, {self.expert_offset + self.num_experts}) of {self.total_experts}")
        self.up_proj = nn.Parameter(self.up_proj[offset: offset + count].clone())
        self.down_proj = nn.Parameter(self.down_proj[offset: offset + count].clone())
        self.num_experts, self.expert_offset = count, offset

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self.grouped and self.matmul is F.linear and x_sorted.shape[0] and _grouped_mm_supported(x_sorted):
            return self._forward_grouped(x_sorted, tokens_per_expert)
        return self.forward_loop(x_sorted, tokens_per_expert)

    def _forward_grouped(self, x_sorted, tokens_per_expert):
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        h = F.grouped_mm(x_sorted, self.up_proj.transpose(-2, -1), offs=offs)
        h = self.act_fn(_ContiguousGrad.apply(h))
        return _ContiguousGrad.apply(F.grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offs))

    def forward_loop(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert.tolist()
        outs = []
        for e, rows in enumerate(x_sorted.split(counts)):
            if rows.shape[0]:
                outs.append(self.matmul(self.act_fn(self.matmul(rows, self.up_proj[e])), self.down_proj[e]))
        if not outs:
            # keep the graph connected to the weights so every rank's backward touches them
            return x_sorted.new_zeros(0, self.down_proj.shape[1]) + 0.0 * (self.up_proj.sum() + self.down_proj.sum())
        return torch.cat(outs)


class LocalDispatcher:
    """All experts on this process: permute by expert, run, unpermute with the routing weights."""

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
        x_sorted, order, tokens_per_expert = permute_tokens(x, topk_idx, num_experts)
        return x_sorted, tokens_per_expert, order

    def combine(self, y_sorted: torch.Tensor, ctx, topk_weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return unpermute_tokens(y_sorted, ctx, topk_weights, num_tokens)


def sequence_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, context=None) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (without its coefficient), averaged over sequences.

    Per sequence of T tokens: ``f_i = E / (k·T) · #{t : i ∈ topk_t}``, ``P_i = mean_t s_ti / Σ_j s_tj`` and
    ``L = Σ_i f_i · P_i`` (1.0 when perfectly balanced). ``scores`` [B·T, E], ``topk_idx`` [B·T, k].

    Context parallelism (``context``: the object the trainer installs; this rank holds ``T/N`` of every
    row's ``T`` tokens): the counts are summed over the CP group (``context.all_reduce_sum``, no gradient:
    selection is discrete), and this rank returns its **share** ``Σ_i f_i · P_i^(r)``, ``P_i^(r)`` its own
    tokens' part of ``P_i``. ``L`` is linear in the ``P``'s for fixed ``f``, so the shares sum to the whole
    sequence's loss and each share's gradient is that loss's gradient with respect to this rank's scores.
    """
    n, e = scores.shape
    k = topk_idx.shape[1]
    t = n // batch
    counts = torch.zeros(n, e, dtype=scores.dtype, device=scores.device).scatter_(1, topk_idx, 1.0).view(batch, t, e).sum(1)
    p_sum = (scores / scores.sum(-1, keepdim=True)).view(batch, t, e).sum(1)
    if context is not None:
        counts = context.all_reduce_sum(counts)
        t = t * context.size
    f = counts * (e / (k * t))
    return (f * (p_sum / t)).sum(-1).mean()


def router_z_loss(logits: torch.Tensor, context=None) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)²; keeps router logits small. Under
    context parallelism (every CP rank holds the same number of tokens) this rank's share: its mean / N."""
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return z / context.size if context is not None else z


class MoE(nn.Module):
    #: context parallelism: set by the trainer (``trainer/parallel/context.py``); None = single rank. Only
    #: the aux losses read it (they are per sequence); routing and experts are per token.
    cp = None

    def __init__(self, config: HybridConfig, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.n_routed_experts
        self.aux_loss_coeff = config.moe_aux_loss_coeff
        self.z_loss_coeff = config.moe_z_loss_coeff
        self.gate = TopKRouter(config)
        expert_dim = config.moe_latent_size or config.hidden_size
        if config.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(config.hidden_size, config.moe_latent_size, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(config.moe_latent_size, config.hidden_size, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        self.experts = GroupedExperts(
            config.n_routed_experts, expert_dim, config.moe_intermediate_size, config.mlp_hidden_act,
            grouped=config.moe_grouped_gemm,
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_shared_expert_intermediate_size, config.mlp_bias, config.mlp_hidden_act)
            if config.n_shared_experts else None
        )
        self.dispatcher = LocalDispatcher()
        # Tokens routed to each (global) expert since the trainer last read them (aux-loss-free balancing
        # and load metrics); training mode only. Not saved: it is reset after every optimizer step.
        self.register_buffer("tokens_per_expert_acc", torch.zeros(self.num_experts, dtype=torch.float64), persistent=False)
        self._aux_loss: torch.Tensor | None = None
        # False while activation checkpointing recomputes this layer's forward in the backward: the
        # original forward already counted its tokens and recorded its aux loss (same routing).
        self.record_routing = True

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.tokens_per_expert_acc.dtype != torch.float64:  # counts stay exact under model.to(dtype)
            self.tokens_per_expert_acc = self.tokens_per_expert_acc.double()
        return self

    def aux_loss(self) -> torch.Tensor | None:
        """Weighted balance + z losses of the last training forward (None when both are off)."""
        return self._aux_loss

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        routing = self.gate(x)
        record = self.record_routing
        if record:
            self._aux_loss = None
        if self.training:
            if record:
                with torch.no_grad():
                    self.tokens_per_expert_acc += torch.bincount(routing.topk_idx.reshape(-1), minlength=self.num_experts).double()
            if self.aux_loss_coeff > 0 or self.z_loss_coeff > 0:
                batch = shape[0] if len(shape) == 3 else 1
                aux = routing.logits.new_zeros(())
                if self.aux_loss_coeff > 0:
                    aux = aux + self.aux_loss_coeff * sequence_aux_loss(routing.scores, routing.topk_idx, batch, self.cp)
                if self.z_loss_coeff > 0:
                    aux = aux + self.z_loss_coeff * router_z_loss(routing.logits, self.cp)
                if record:  # a recompute still builds aux: checkpointing needs the same saved tensors
                    self._aux_loss = aux
        if self.fc1_latent_proj is not None:
            x = self.fc1_latent_proj(x)
        x_sorted, tokens_per_expert, ctx = self.dispatcher.dispatch(x, routing.topk_idx, self.num_experts)
        y_sorted = self.experts(x_sorted, tokens_per_expert)
        y = self.dispatcher.combine(y_sorted, ctx, routing.topk_weights, x.shape[0]).to(hidden.dtype)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        y = y.view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden)
        return y
