"""Token losses straight from hidden states: the vocabulary projection and the softmax in chunks of tokens,
so full-vocabulary fp32 logits [N, V] never exist (4.3 GB per 8k-token row at V = 131072).

:func:`chunked_token_logprobs` computes ``log softmax(h Wᵀ / T)[label]`` per token (and, optionally, the
entropy of that distribution) over ``chunk_tokens`` rows at a time. Under autograd each chunk runs in
``torch.utils.checkpoint`` (non-reentrant): the forward keeps only the chunk's inputs (views of ``hidden``
and ``labels``), the backward recomputes the chunk's logits, backpropagates through them and frees them
before the next chunk. Peak extra memory is a few [chunk, V] fp32 tensors; the price is one more
[chunk, H] × [H, V] GEMM per chunk (4 GEMMs instead of 3). Numerics are the plain path's: the same
``F.linear`` → ``.float()`` → ``log_softmax`` → gather per row, so loss and gradients agree with
``F.cross_entropy`` on full logits to rounding.

Why not a fused kernel (Liger's fused linear cross-entropy, Apple's cut-cross-entropy): they compute the
gradient inside the forward for a *scalar* loss, while the stages here need per-token values (loss masks,
advantages, importance ratios) weighted after the call; and they are CUDA-only. Recomputation keeps one
path for CPU and GPU, autocast included (checkpoint restores the autocast state).

:class:`LMHead` is the model's ``lm_head`` (an ``nn.Linear``, same parameter and checkpoint name) whose
forward also takes labels: the loss is computed *inside the head's own forward*, so wrappers that gather a
module's parameters around its forward (DeepSpeed ZeRO-3) gather the weight once for all chunks, and
FSDP2 (``lm_head`` in the root unit) sees it unsharded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["DEFAULT_CHUNK_BYTES", "LMHead", "chunked_cross_entropy", "chunked_token_logprobs", "default_chunk_tokens",
           "logprobs_from_logits"]

#: fp32 logits of one chunk are at most this many bytes by default (512 tokens at V = 131072)
DEFAULT_CHUNK_BYTES = 256 * 2**20


def default_chunk_tokens(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most ``budget_bytes``."""
    return max(1, budget_bytes // (4 * vocab_size))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, entropy: bool = False):
    """``log_softmax(logits / T)[label]`` per position in fp32 (0 where the label is negative, i.e. ignored);
    with ``entropy`` also the per-position entropy of that distribution (no gradient). The plain form of
    :func:`chunked_token_logprobs`, which applies it one chunk of logits at a time."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(labels >= 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    if not entropy:
        return logp
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def _chunk(hidden, weight, labels, temperature: float, with_entropy: bool):
    return logprobs_from_logits(F.linear(hidden, weight), labels, temperature, with_entropy)


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int,
                           temperature: float = 1.0, entropy: bool = False):
    """Per-token ``log softmax(hidden @ weightᵀ / temperature)[labels]`` in fp32, ``chunk_tokens`` rows at a time.

    ``hidden`` [N, H], ``weight`` [V, H], ``labels`` [N] (int; a negative label is ignored: its value is
    exactly 0 and it gets no gradient). Returns ``logp`` [N]; with ``entropy`` also ``(logp, entropy)``,
    the entropy [N] of each row's distribution, without gradient.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and labels [N], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = hidden.shape[0]
    starts = range(0, n, chunk_tokens) if n else [0]
    # Recompute only when there is a backward to prepare and more than one chunk: a single chunk holds no
    # more logits than the chunk budget anyway.
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad) and n > chunk_tokens
    parts = []
    for s in starts:
        args = (hidden[s:s + chunk_tokens], weight, labels[s:s + chunk_tokens], temperature, entropy)
        parts.append(checkpoint(_chunk, *args, use_reentrant=False, preserve_rng_state=False) if recompute else _chunk(*args))
    if not entropy:
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int) -> torch.Tensor:
    """Per-token next-token cross-entropy [N] (fp32; 0 where ``labels < 0``) without [N, V] logits: the
    negated :func:`chunked_token_logprobs` at temperature 1, i.e. ``F.cross_entropy(..., reduction="none")``."""
    return -chunked_token_logprobs(hidden, weight, labels, chunk_tokens=chunk_tokens)


class LMHead(nn.Linear):
    """The untied output projection (``lm_head``): logits, or per-token losses computed in chunks.

    ``head(h)`` → logits (an ``nn.Linear``). ``head(h, labels)`` → per-token cross-entropy of
    ``softmax(logits / temperature)`` with the shape of ``labels``; with ``entropy=True`` the pair
    ``(cross-entropy, entropy)``. ``chunk_tokens`` (None: :func:`default_chunk_tokens` of the vocabulary)
    bounds how many tokens' logits exist at once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        if bias:
            raise ValueError("lm_head has no bias")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.chunk_tokens: int | None = None

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, *, temperature: float = 1.0,
                entropy: bool = False):
        if labels is None:
            return super().forward(hidden)
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal the tokens' shape {tuple(hidden.shape[:-1])}")
        chunk = self.chunk_tokens or default_chunk_tokens(self.out_features)
        out = chunked_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), self.weight, labels.reshape(-1),
                                     chunk_tokens=chunk, temperature=temperature, entropy=entropy)
        if entropy:
            logp, ent = out
            return -logp.view(labels.shape), ent.view(labels.shape)
        return -out.view(labels.shape)
