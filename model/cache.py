"""Inference cache of the hybrid stack: attention KV, Mamba-2 conv window and SSM state, per layer.

One :class:`HybridCache` holds every layer's state for a batch of ``B`` rows:

==========  ==========================================  ==========================  ======================
layer kind  tensor                                      dtype                       grows with max_len?
==========  ==========================================  ==========================  ======================
``*``       ``key``, ``value`` [B, kv_heads, max_len, head_dim]   model dtype                  yes (preallocated)
``M``       ``conv`` [B, conv_dim, K-1] (the last K-1 conv *inputs*)  model dtype (exact copies)   no
``M``       ``ssm`` [B, heads, head_dim, N]             fp32                        no
``-``/``E`` nothing                                     —                           —
==========  ==========================================  ==========================  ======================

``lengths`` [B] (int64) counts the tokens each row has in the cache; row ``b``'s next token goes to
position ``lengths[b]``. Rows advance independently: a forward through the model with
``cache=...`` and per-row ``lengths`` of new tokens (right-padded input) appends each row's real
tokens only.

Variable-length prompts are **right-padded**. Pads come after a row's real tokens, so causality already
keeps them out of every real token's output; what must not happen is pads leaking into the *state* a
row carries into decoding. The Mamba layers make pad positions the identity for the SSM (``dt = 0``:
decay ``exp(0) = 1``, input ``dt·x⊗B = 0``) so the scan's final state is each row's state at its own
length, and take the conv window from each row's last real inputs; attention writes pad keys past the
row's length, where the per-row length mask hides them and the next real token overwrites them.
(Left padding would be wrong for Mamba unless pads were masked out of the state: they would sit at the
*start* of the recurrence and of the conv window.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HybridConfig

__all__ = ["HybridCache", "CacheBytes"]


@dataclass(frozen=True)
class CacheBytes:
    """Bytes held per layer kind (all rows, all layers of that kind) and per single layer."""

    attention: int
    mamba: int
    attention_per_layer: int
    mamba_per_layer: int

    @property
    def total(self) -> int:
        return self.attention + self.mamba


class HybridCache:
    """Preallocated per-layer decoding state. Build with :meth:`allocate`; pass to ``HybridLM(..., cache=)``.

    >>> cache = HybridCache.allocate(model.config, batch=4, max_len=2048, device="cpu", dtype=torch.float32)
    >>> logits = model(prompt_ids, cache=cache, lengths=prompt_lengths)   # prefill (right-padded)
    >>> logits = model(next_ids[:, None], cache=cache)                     # one decode step
    """

    def __init__(self, config: HybridConfig, batch: int, max_len: int, device, dtype: torch.dtype,
                 key: dict[int, torch.Tensor], value: dict[int, torch.Tensor],
                 conv: dict[int, torch.Tensor], ssm: dict[int, torch.Tensor], lengths: torch.Tensor):
        self.config = config
        self.batch = batch
        self.max_len = max_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.key, self.value, self.conv, self.ssm = key, value, conv, ssm
        self.lengths = lengths
        # Upper bound on lengths.max(), tracked in Python so attention can slice the KV cache without a
        # device sync every step (exact after prefill; rows may only lag behind it).
        self.seen = 0
        self._positions = torch.arange(max_len, device=self.device)

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def allocate(cls, config: HybridConfig, batch: int, max_len: int, device="cpu",
                 dtype: torch.dtype = torch.float32) -> "HybridCache":
        """Zeroed state for ``batch`` rows of up to ``max_len`` tokens (prompt + generated) each."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"batch and max_len must be positive, got batch={batch}, max_len={max_len}")
        key, value, conv, ssm = {}, {}, {}, {}
        for i, ch in enumerate(config.hybrid_override_pattern):
            if ch == "*":
                shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
                key[i] = torch.zeros(shape, device=device, dtype=dtype)
                value[i] = torch.zeros(shape, device=device, dtype=dtype)
            elif ch == "M":
                conv[i] = torch.zeros(batch, config.mamba_conv_dim, config.conv_kernel - 1, device=device, dtype=dtype)
                ssm[i] = torch.zeros(batch, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size,
                                     device=device, dtype=torch.float32)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(config, batch, max_len, device, dtype, key, value, conv, ssm, lengths)

    @staticmethod
    def bytes_for(config: HybridConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> CacheBytes:
        """Memory :meth:`allocate` would take, without allocating (e.g. to size a batch for a GPU)."""
        item = torch.empty((), dtype=dtype).element_size()
        attn_layer = 2 * batch * config.num_key_value_heads * max_len * config.head_dim * item
        mamba_layer = (batch * config.mamba_conv_dim * (config.conv_kernel - 1) * item
                       + batch * config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * 4)
        n_attn = config.hybrid_override_pattern.count("*")
        n_mamba = config.hybrid_override_pattern.count("M")
        return CacheBytes(attention=n_attn * attn_layer, mamba=n_mamba * mamba_layer,
                          attention_per_layer=attn_layer if n_attn else 0, mamba_per_layer=mamba_layer if n_mamba else 0)

    def nbytes(self) -> CacheBytes:
        """Bytes this cache actually holds, per layer kind."""
        attn = sum(t.numel() * t.element_size() for d in (self.key, self.value) for t in d.values())
        mamba = sum(t.numel() * t.element_size() for d in (self.conv, self.ssm) for t in d.values())
        n_attn, n_mamba = len(self.key), len(self.conv)
        return CacheBytes(attention=attn, mamba=mamba, attention_per_layer=attn // n_attn if n_attn else 0,
                          mamba_per_layer=mamba // n_mamba if n_mamba else 0)

    # ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty every row (state to zero, lengths to 0) without reallocating."""
        for d in (self.key, self.value, self.conv, self.ssm):
            for t in d.values():
                t.zero_()
        self.lengths.zero_()
        self.seen = 0

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only ``rows`` (in that order), in place: drops finished rows or reorders (beam search).

        Copies each layer's rows once (``index_select``); the KV cache keeps its ``max_len``.
        """
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        for d in (self.key, self.value, self.conv, self.ssm):
            for i, t in d.items():
                d[i] = t.index_select(0, idx)
        self.lengths = self.lengths.index_select(0, idx)
        self.batch = int(idx.numel())

    # ------------------------------------------------------------------------------------------------
    def check_room(self, new_tokens: int) -> None:
        if self.seen + new_tokens > self.max_len:
            raise ValueError(
                f"HybridCache is full: {self.seen} tokens cached + {new_tokens} new > max_len {self.max_len}; "
                f"allocate a larger cache"
            )

    def advance(self, new_lengths: torch.Tensor | None, new_tokens: int) -> None:
        """After every layer has consumed a step: rows gain their new tokens."""
        if new_lengths is None:
            self.lengths += new_tokens
        else:
            self.lengths += new_lengths
        self.seen += new_tokens

    def __repr__(self) -> str:
        b = self.nbytes()
        return (f"HybridCache(batch={self.batch}, max_len={self.max_len}, dtype={self.dtype}, "
                f"attention_layers={len(self.key)}, mamba_layers={len(self.conv)}, "
                f"bytes attention={b.attention} mamba={b.mamba})")
