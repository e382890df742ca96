"""Grouped-query attention of NemotronH: no positional embedding (no RoPE), no QK-norm, no biases
by default. Position information comes from the Mamba-2 layers around it.

With a :class:`model.cache.HybridCache`, :meth:`Attention.forward_cached` writes each row's new keys and
values at its own positions (``cache.lengths[b] + t``) in the preallocated KV cache and attends over the
cached prefix, masked per row to that row's length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig


def document_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """``seq_idx [b, t]`` → boolean mask [b, 1, t, t]: causal and within the same packed document."""
    t = seq_idx.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_idx.device).tril()
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]
    return (causal & same_doc)[:, None]


class Attention(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if seq_idx is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.scale, enable_gqa=True)
        else:
            mask = document_causal_mask(seq_idx)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward_cached(self, x: torch.Tensor, cache) -> torch.Tensor:
        """``x`` [B, T, H], appended after each row's ``cache.lengths[b]`` cached tokens (right-padded rows
        write pad keys past their length; the length mask hides them and the next real token overwrites them).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        K, V = cache.key[self.layer_idx], cache.value[self.layer_idx]
        start = cache.lengths
        if cache.seen == 0:
            # Fresh prefill: every row starts at 0, so plain causal attention over the new tokens.
            K[:, :, :t] = k.transpose(1, 2)
            V[:, :, :t] = v.transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               scale=self.scale, enable_gqa=True)
        else:
            if t == 1:
                rows = torch.arange(b, device=x.device)
                K[rows, :, start] = k[:, 0]
                V[rows, :, start] = v[:, 0]
            else:
                pos = start[:, None] + cache._positions[:t]  # [B, T]
                rows = torch.arange(b, device=x.device)[:, None]
                K[rows, :, pos] = k
                V[rows, :, pos] = v
            s = cache.seen + t  # ≥ every row's new length
            mask = cache._positions[:s][None, None, :] <= (start[:, None] + cache._positions[:t])[:, :, None]
            o = F.scaled_dot_product_attention(q, K[:, :, :s], V[:, :, :s], attn_mask=mask[:, None],
                                               scale=self.scale, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
