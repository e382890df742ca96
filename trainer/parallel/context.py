"""Context parallelism: every row's sequence split over the ``parallel.cp`` ranks of a CP group.

**Layout (load-balanced causal split).** A row of ``T`` tokens is cut into ``2N`` chunks of ``T / 2N``;
CP rank ``r`` holds chunks ``r`` and ``2N−1−r``, concatenated (``[chunk r | chunk 2N−1−r]``, ``T / N``
tokens). Under causal attention chunk ``c`` does work ∝ ``c``, so every rank gets the same total
(``r + 2N−1−r``). Inputs, labels, ``seq_idx`` and the loss mask are all sliced this way
(:meth:`ContextParallel.shard`); ``seq_idx`` keeps its *global* document ids, so packed documents may
cross any rank boundary.

**What the model calls.** Model code (``model/``) never sees a process group: the trainer installs one
:class:`ContextParallel` on the backbone and on every attention and Mamba-2 mixer
(:func:`apply_context_parallel`), and those call

- :meth:`~ContextParallel.gather_sequence` — all-gather along the sequence dimension back into global
  token order (attention's keys/values; the backbone's ``seq_idx``, once per forward);
- :meth:`~ContextParallel.gather_chunks` — all-gather of a small per-chunk tensor ``[2, ...]`` into all
  ``2N`` chunks in global order (Mamba-2: conv windows, final SSM states and chunk decays).

Both are autograd functions: the backward of an all-gather is a reduce-scatter of the gradient (each
rank receives the sum, over ranks, of the gradient with respect to its own piece) — ``reduce_scatter_tensor``
on NCCL, ``all_to_all_single`` + a local sum on gloo (which has no reduce-scatter).

**Why all-gather, not a ring, for attention.** The gathered K/V of one layer is ``2 · Hkv · D · T`` values
per row: nano3 has 2 KV heads × 128, so 512 values per token — 0.5 GiB in bf16 for a 512k-token row,
small next to the per-rank activations, and it is freed after the layer (recomputed under activation
checkpointing). One all-gather (NCCL's best collective) beats ``2N − 1`` ring steps that each need an
overlap-tuned kernel and a log-sum-exp merge; a ring only pays off when K/V per layer (many KV heads,
multi-million-token rows) no longer fits. The Mamba-2 layers exchange only per-chunk states (see
:mod:`tandem.model.mamba2`), so no layer ever gathers a full-length activation other than K/V.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ContextParallel", "apply_context_parallel", "check_context_parallel", "remove_context_parallel",
           "shard_batch", "shard_stage_batches"]

#: the batch key holding a CP-sharded micro-batch's target tokens before the split (the aux-loss weight)
AUX_WEIGHT_KEY = "aux_weight_tokens"

#: stages whose rows are fixed-length token windows the CP split applies to (GRPO/RLHF generate)
CP_STAGES = ("pretrain", "sft", "cpt")


class _AllGather(torch.autograd.Function):
    """``x`` → ``[N, *x.shape]`` (every rank's ``x``, by rank); backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty(n, *x.shape)
        if dist.get_backend(group) == "nccl":
            dist.all_gather_into_tensor(out, x, group=group)
        else:
            dist.all_gather(list(out.unbind(0)), x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        recv = torch.empty_like(grad)
        dist.all_to_all_single(recv, grad, group=ctx.group)  # row s: rank s's gradient for my piece
        return recv.sum(0), None


class ContextParallel:
    """This rank's place in a context-parallel group and the collectives the model layers call.

    ``group``: the CP process group (megatron-core's ``get_context_parallel_group()`` in the trainer).
    ``size``/``rank``: its size ``N`` and this rank's index; ``chunk_ids`` = ``(r, 2N−1−r)``.
    """

    def __init__(self, group, attention: str = "sdpa"):
        if attention not in CP_ATTENTION:
            raise ValueError(f"context-parallel attention must be one of {CP_ATTENTION}, got {attention!r}")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.chunk_ids = (self.rank, 2 * self.size - 1 - self.rank)
        self.attention = attention
        self._te_modules: dict = {}

    def __deepcopy__(self, memo):
        return self  # a handle on process groups: a copied model shares its CP group

    def __repr__(self) -> str:
        return f"ContextParallel(size={self.size}, rank={self.rank}, chunks={self.chunk_ids})"

    # -- layout -------------------------------------------------------------------------------------
    def check_length(self, t: int, what: str = "sequence length") -> int:
        """Chunk length for a global length ``t``; ``t`` must split into ``2N`` equal chunks."""
        if t % (2 * self.size):
            raise ValueError(f"{what} {t} must be divisible by 2 × parallel.cp = {2 * self.size} "
                             "(the load-balanced causal split gives each CP rank two equal chunks)")
        return t // (2 * self.size)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's load-balanced slice of a full-length tensor: chunks ``r`` and ``2N−1−r`` along ``dim``."""
        tc = self.check_length(x.shape[dim])
        a, b = self.chunk_ids
        return torch.cat([x.narrow(dim, a * tc, tc), x.narrow(dim, b * tc, tc)], dim=dim)

    def positions(self, t_local: int, device=None) -> torch.Tensor:
        """Global positions [T/N] of this rank's tokens (in its local order)."""
        tc = t_local // 2
        a, b = self.chunk_ids
        return torch.cat([torch.arange(a * tc, (a + 1) * tc, device=device),
                          torch.arange(b * tc, (b + 1) * tc, device=device)])

    # -- collectives (autograd) ---------------------------------------------------------------------
    def gather_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [2, ...] (this rank's two chunks, local order) → [2N, ...] every chunk in global order."""
        if x.shape[0] != 2:
            raise ValueError(f"gather_chunks expects this rank's two chunks stacked on dim 0, got shape {tuple(x.shape)}")
        g = _AllGather.apply(x, self.group)  # [N, 2, ...]: rank j holds chunks j and 2N-1-j
        return torch.cat([g[:, 0], g[:, 1].flip(0)], dim=0)

    def gather_sequence(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's ``[.., T/N, ..]`` (along ``dim``) → the full ``[.., T, ..]`` in global token order."""
        dim = dim % x.dim()
        if x.shape[dim] % 2:
            raise ValueError(f"local sequence length {x.shape[dim]} must be even (two chunks per CP rank)")
        chunks = self.gather_chunks(torch.stack(x.chunk(2, dim=dim), dim=0))  # [2N, ..., T/2N, ...]
        return torch.cat(chunks.unbind(0), dim=dim)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ of ``x`` over the CP group, without gradient (the MoE balance loss's per-row expert counts)."""
        out = x.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    # -- Transformer Engine (GPU-only) ---------------------------------------------------------------
    def te_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float):
        """Transformer Engine's context-parallel causal attention, or None where it does not apply.

        **GPU-only** (CUDA tensors, ``transformer_engine`` importable — imported here, lazily), and only when
        chosen (``parallel.cp_attention=te``; default ``sdpa``: this path has not been run on a GPU by this
        work). TE's ``DotProductAttention`` with ``qkv_format="bshd"``, ``attn_mask_type="causal"`` and
        ``cp_comm_type="all_gather"`` expects exactly this module's layout (chunks r and 2N−1−r of every
        row), so it takes the local q/k/v as they are and runs its fused kernels on them. TE's packed
        (``thd``) CP format splits every *document* into 2N chunks instead of the row, which is not this
        layout, so the caller uses it only for rows holding one document each. ``q`` [B, H, T/N, D],
        ``k, v`` [B, Hkv, T/N, D] → [B, H, T/N, D].
        """
        if self.attention != "te" or not q.is_cuda:
            return None
        try:
            from transformer_engine.pytorch import DotProductAttention
        except ImportError:
            return None
        b, h, t, d = q.shape
        key = (h, k.shape[1], d, float(scale))
        if key not in self._te_modules:
            mod = DotProductAttention(h, d, num_gqa_groups=k.shape[1], attention_dropout=0.0, qkv_format="bshd",
                                      attn_mask_type="causal", softmax_scale=scale)
            mod.set_context_parallel_group(self.group, dist.get_process_group_ranks(self.group), torch.cuda.Stream(),
                                           cp_comm_type="all_gather")
            self._te_modules[key] = mod
        out = self._te_modules[key](*(x.transpose(1, 2).contiguous() for x in (q, k, v)))  # [B, T/N, H·D]
        return out.view(b, t, h, d).transpose(1, 2)


def apply_context_parallel(model: nn.Module, group, attention: str = "sdpa") -> ContextParallel:
    """Install one :class:`ContextParallel` on the backbone, every attention / Mamba-2 mixer and every MoE
    (whose per-sequence balance loss sums its routing counts over the CP group).

    Nothing else changes: MLP, expert routing, norms, embeddings and the loss are per token. The model's parameters
    are untouched (every CP rank holds the same ones; gradients are reduced over DP × CP by the engine).
    """
    from tandem.model.attention import Attention
    from tandem.model.hybrid import HybridBackbone
    from tandem.model.mamba2 import Mamba2Mixer
    from tandem.model.moe import MoE

    cp = ContextParallel(group, attention)
    found = False
    for m in model.modules():
        if isinstance(m, (HybridBackbone, Attention, Mamba2Mixer, MoE)):
            m.cp = cp
            found = found or isinstance(m, HybridBackbone)
    if not found:
        raise ValueError("context parallelism needs a HybridLM (no HybridBackbone found in the model)")
    return cp


def remove_context_parallel(model: nn.Module) -> None:
    """Back to the single-rank path (e.g. for generation on one rank)."""
    for m in model.modules():
        if getattr(m, "cp", None) is not None:
            m.cp = None


#: ``parallel.cp_attention`` values: ``sdpa`` (all-gathered K/V, per-document SDPA; every device) or ``te``
#: (Transformer Engine's CP attention on CUDA for one-document rows, else sdpa)
CP_ATTENTION = ("sdpa", "te")


# -- trainer side ------------------------------------------------------------------------------------
def check_context_parallel(cfg, model_cfg) -> None:
    """Refuse (``ConfigError`` naming the key) what ``parallel.cp > 1`` cannot train exactly."""
    from tandem.trainer.config import ConfigError

    cp = cfg.parallel.cp
    if cp < 1:
        raise ConfigError(f"parallel.cp must be >= 1, got {cp}")
    if cp == 1:
        return
    if cfg.stage.name not in CP_STAGES:
        raise ConfigError(f"parallel.cp={cp} with stage.name={cfg.stage.name}: context parallelism trains fixed-length "
                          f"rows ({', '.join(CP_STAGES)}); a generating stage needs parallel.cp=1")
    from tandem.trainer.config import row_length

    seq, key = row_length(cfg)
    if seq % (2 * cp):
        raise ConfigError(f"{key}={seq} must be divisible by 2 × parallel.cp = {2 * cp} (each CP rank holds two "
                          f"equal chunks of every row)")
    k1 = model_cfg.conv_kernel - 1
    if "M" in model_cfg.hybrid_override_pattern and seq // (2 * cp) < k1:
        raise ConfigError(f"{key}={seq} with parallel.cp={cp}: chunks of {seq // (2 * cp)} tokens are shorter "
                          f"than the Mamba conv window ({k1}); lower parallel.cp")


def shard_batch(batch: dict, cp: ContextParallel) -> dict:
    """Every per-token tensor of a batch (``[B, T, ...]``: inputs, labels, ``seq_idx``, loss mask, ``valid``)
    → this rank's load-balanced slice; per-row tensors (``[B]``) stay whole."""
    from tandem.trainer.data import DataError

    t = batch["input_ids"].shape[1]
    if t % (2 * cp.size):
        raise DataError(f"a batch of {t}-token rows cannot be split over parallel.cp={cp.size} (needs a multiple of "
                        f"{2 * cp.size}; rows are data.seq_len long)")
    out = {k: cp.shard(v, 1) if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == t else v
           for k, v in batch.items()}
    if "loss_mask" in batch:
        # the MoE aux losses are per micro-batch means whose shares sum over the CP group; each share is
        # weighted by the whole micro-batch's target tokens (token_cross_entropy), as on one rank
        w = batch["loss_mask"]
        out[AUX_WEIGHT_KEY] = (w * batch["loss_weight"] if "loss_weight" in batch else w).sum()
    return out


def shard_stage_batches(stage, cp: ContextParallel) -> None:
    """Make a stage yield this CP rank's slices: its ``batches_for_step`` / ``eval_batches`` are wrapped on
    the instance, so every count the loop takes (target and input tokens) is of local tokens and their
    all-reduced sums over DP × CP are the global ones (each token is on exactly one rank)."""
    rows_for_step, eval_rows = stage.batches_for_step, stage.eval_batches
    stage.batches_for_step = lambda step: [shard_batch(b, cp) for b in rows_for_step(step)]
    stage.eval_batches = lambda: (shard_batch(b, cp) for b in eval_rows())
