"""Grouped-query attention of NemotronH: no positional embedding (no RoPE), no QK-norm, no biases
by default. Position information comes from the Mamba-2 layers around it.

Packed documents (``seq_idx``) attend causally within their own document, and no [T, T] mask is ever
built (at 512k tokens one would be 256 GB). :class:`PackedDocuments` describes a packed batch once per
forward and is shared by every attention layer; two exact paths read it:

- **flex** (CUDA only): FlexAttention (``torch.nn.attention.flex_attention``, compiled) with a
  document-causal ``BlockMask`` built straight from the document boundaries — O((T/128)²) int32 per row,
  never the [T, T] boolean ``create_block_mask`` would evaluate;
- **varlen** (CPU, and CUDA with attention dropout, which FlexAttention lacks): each row split at its
  document boundaries (one host copy of the boundaries per forward), causal SDPA per document, outputs
  concatenated. Mask memory O(#documents); FlexAttention has no backward on CPU in torch 2.13, so this is
  the CPU training path.

:func:`dense_document_attention` (the [B, 1, T, T] boolean mask through SDPA) is kept as the reference
the tests compare both paths with. Unpacked input (``seq_idx=None``) is plain causal SDPA.

With a :class:`model.cache.HybridCache`, :meth:`Attention.forward_cached` writes each row's new keys and
values at its own positions (``cache.lengths[b] + t``) in the preallocated KV cache and attends over the
cached prefix, masked per row to that row's length.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig

#: FlexAttention tile (query and key block) of the document BlockMask: the kernels' default
FLEX_BLOCK = 128


def document_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """``seq_idx [b, t]`` → boolean mask [b, 1, t, t]: causal and within the same packed document.

    O(T²): the reference for tests and benches, never used by :class:`Attention`.
    """
    t = seq_idx.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_idx.device).tril()
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]
    return (causal & same_doc)[:, None]


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: true where a document starts (position 0 of every row, and every change of ``seq_idx``)."""
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class PackedDocuments:
    """The document layout of a packed batch, derived from ``seq_idx`` [B, T] once per forward.

    A document is a maximal run of equal ``seq_idx`` values in a row (``seq_idx`` is non-decreasing by
    contract, so runs and values agree). The backbone builds one per forward and hands it to every
    attention layer; activation checkpointing's recompute reuses it. Each path's structure is computed
    on first use and cached:

    - :meth:`spans` — ``[(row, start, end), ...]``, one host copy of the boundaries (varlen path);
    - :meth:`block_mask` — FlexAttention's document-causal ``BlockMask`` (flex path, no host sync).
    """

    def __init__(self, seq_idx: torch.Tensor, context=None):
        if seq_idx.dim() != 2:
            raise ValueError(f"seq_idx must be [batch, seqlen], got shape {tuple(seq_idx.shape)}")
        self.seq_idx = seq_idx
        self._spans: list[tuple[int, int, int]] | None = None
        # Context parallelism (``context``: the object the trainer installed, see the module doc): this
        # rank holds chunks (r, 2N-1-r) of every row; the global document ids are gathered once here.
        self.context = context
        self.global_seq_idx = None
        self._cp_spans = None
        if context is not None:
            self.chunk_len = context.check_length(seq_idx.shape[1] * context.size, "packed sequence length")
            with torch.no_grad():
                self.global_seq_idx = context.gather_sequence(seq_idx, dim=1)
        self._block_mask = None
        self._flex_doc: torch.Tensor | None = None  # the run ids the BlockMask's mask_mod reads

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.seq_idx.shape)

    def spans(self) -> list[tuple[int, int, int]]:
        """``(row, start, end)`` of every document, row-major; the boundaries reach the host once."""
        if self._spans is None:
            b, t = self.seq_idx.shape
            starts = document_starts(self.seq_idx).nonzero().tolist()  # [[row, start], ...] in row-major order
            spans = []
            for i, (row, start) in enumerate(starts):
                nxt = starts[i + 1] if i + 1 < len(starts) else None
                end = nxt[1] if nxt is not None and nxt[0] == row else t
                spans.append((row, start, end))
            self._spans = spans
        return self._spans

    def context_spans(self) -> list[tuple[int, int, int, int, int]]:
        """Context parallelism: ``(row, q_start, q_end, k_start, k_end)`` per piece of a document inside one
        of this rank's chunks — queries ``[q_start, q_end)`` in *local* order, keys ``[k_start, k_end)`` in
        *global* order (the document's first token up to the piece's last query). Row-major, local order;
        the global boundaries reach the host once per forward."""
        if self._cp_spans is None:
            b, t = self.global_seq_idx.shape
            tc = self.chunk_len
            starts: list[list[int]] = [[] for _ in range(b)]
            for row, pos in document_starts(self.global_seq_idx).nonzero().tolist():
                starts[row].append(pos)
            spans = []
            for row in range(b):
                row_starts = starts[row]
                for i, c in enumerate(self.context.chunk_ids):
                    lo, hi = c * tc, (c + 1) * tc
                    cuts = [lo] + [p for p in row_starts if lo < p < hi] + [hi]
                    for a, e in zip(cuts[:-1], cuts[1:]):
                        doc_start = row_starts[bisect.bisect_right(row_starts, a) - 1]
                        spans.append((row, i * tc + a - lo, i * tc + e - lo, doc_start, e))
            self._cp_spans = spans
        return self._cp_spans

    def one_document_per_row(self) -> bool:
        """Context parallelism: every row is a single document (no boundary anywhere in the global row)."""
        return all(s[3] == 0 for s in self.context_spans())

    def block_mask(self):
        """FlexAttention ``BlockMask``: causal within documents, built from per-tile document ranges.

        Tile pair (query tile i, key tile j ≤ i) has some allowed (q, k) iff j = i or the last document of
        tile j is the first of tile i (documents are contiguous and ordered); it is *full* (no mask_mod
        needed) iff j < i and tiles i and j lie in one document with no padding. Memory: a few
        [B, T/128, T/128] int32 tensors, nothing [T, T]; all on the device, no host sync.
        """
        if self._block_mask is None:
            self._block_mask, self._flex_doc = _document_block_mask(self.seq_idx)
        return self._block_mask

    def mask_bytes(self, path: str) -> int:
        """Bytes of the mask structure a path holds: ``varlen`` (its spans, counted as 3 int64 each, plus
        ``seq_idx``), ``flex`` (the BlockMask's tensors) or ``dense`` (what the dense reference would build)."""
        b, t = self.seq_idx.shape
        if path == "dense":
            return b * t * t  # torch.bool
        if path == "varlen":
            return 3 * 8 * len(self.spans()) + self.seq_idx.numel() * self.seq_idx.element_size()
        if path == "flex":
            bm = self.block_mask()
            tensors = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                       bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices]
            held = sum(x.numel() * x.element_size() for x in tensors if x is not None)
            return held + self._flex_doc.numel() * self._flex_doc.element_size()
        raise ValueError(f"unknown attention path {path!r}; expected dense, varlen or flex")


def _document_block_mask(seq_idx: torch.Tensor):
    from torch.nn.attention.flex_attention import BlockMask

    b, t = seq_idx.shape
    blk = FLEX_BLOCK
    nb = -(-t // blk)
    pad = nb * blk - t
    doc = document_starts(seq_idx).to(torch.int32).cumsum(1, dtype=torch.int32)  # run id, 1-based, non-decreasing
    # Padded positions (t..nb·blk) get id 0, which no real token has: mask_mod is false there and every
    # index flex may pass stays in bounds.
    doc_padded = F.pad(doc, (0, pad), value=0)
    tiles = F.pad(doc, (0, pad), value=-1).view(b, nb, blk)  # -1 marks padding for the tile ranges below
    real = tiles >= 0
    first = tiles[:, :, 0]  # a tile's first token is always real
    last = torch.where(real, tiles, torch.zeros((), dtype=tiles.dtype, device=tiles.device)).amax(-1)
    has_pad = ~real.all(-1)
    i = torch.arange(nb, device=seq_idx.device)
    below = (i[None, :] < i[:, None])[None]  # [1, q tile, k tile]: j < i
    diag = (i[None, :] == i[:, None])[None]
    touches = (below & (last[:, None, :] == first[:, :, None])) | diag  # [B, nq, nk]
    full = below & (first[:, None, :] == last[:, :, None]) & ~has_pad[:, :, None] & ~has_pad[:, None, :]
    partial = touches & ~full

    def ordered(m: torch.Tensor):
        m = m.to(torch.int32)
        return (m.sum(-1).to(torch.int32)[:, None].contiguous(),
                torch.argsort(m, dim=-1, descending=True, stable=True).to(torch.int32)[:, None].contiguous())

    def mask_mod(bi, h, q, kv):
        return (doc_padded[bi, q] == doc_padded[bi, kv]) & (q >= kv)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=blk, mask_mod=mask_mod,
                                    seq_lengths=(t, t))
    return mask, doc_padded


def dense_document_attention(q, k, v, seq_idx, *, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Reference: SDPA with the dense [B, 1, T, T] document-causal mask. ``q`` [B, Hq, T, D], ``k, v`` [B, Hkv, T, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(seq_idx), dropout_p=dropout_p,
                                          scale=scale, enable_gqa=True)


def varlen_document_attention(q, k, v, docs: PackedDocuments, *, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Exact packed attention without a mask: causal SDPA per document, concatenated back along T.

    The per-document calls take the memory-efficient causal SDPA path (O(T) extra memory); the
    concatenation's backward is a split, so gradients cost no [T, T] either. One Python-level SDPA call
    per document: cheap for the document counts packing produces (tens per row), slower for thousands of
    one-token documents, where the work itself is tiny.
    """
    spans = docs.spans()
    rows: list[list[torch.Tensor]] = [[] for _ in range(q.shape[0])]
    for row, s, e in spans:
        rows[row].append(F.scaled_dot_product_attention(
            q[row:row + 1, :, s:e], k[row:row + 1, :, s:e], v[row:row + 1, :, s:e],
            is_causal=True, dropout_p=dropout_p, scale=scale, enable_gqa=True))
    return torch.cat([torch.cat(parts, dim=2) if len(parts) > 1 else parts[0] for parts in rows], dim=0)


_compiled_flex = None


def flex_document_attention(q, k, v, docs: PackedDocuments, *, scale: float, compiled: bool = True) -> torch.Tensor:
    """FlexAttention with the document BlockMask. GPU path: compiled (``torch.compile(flex_attention)``,
    fused kernels, forward and backward). ``compiled=False`` runs the unfused eager implementation, which
    materialises scores and has no backward on CPU — only for checking the mask on CPU in tests."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if compiled:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=docs.block_mask(), scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def context_parallel_attention(q, k, v, docs: PackedDocuments, *, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Context parallelism: this rank's queries (its two chunks) against the whole row's keys/values.

    K and V are all-gathered over the CP group into global order in one collective
    (``docs.context.gather_sequence``; its backward reduce-scatters dK/dV to their owners). Each piece of
    a document inside a local chunk attends to the document from its first token (possibly on another
    rank) up to the piece's own last query: SDPA with a lower-right causal bias
    (``torch.nn.attention.bias.causal_lower_right``), which on CUDA runs the flash / memory-efficient
    kernels without a mask; on CPU that piece's [queries, keys] boolean is built (what ``CausalBias``
    would materialise there; at most T/2N × T for one document — the CPU path is for tests and small runs). A piece starting its
    document is plain causal SDPA. There are no positions to fix: the attention layers have no RoPE.

    Dropout, if on, draws a different pattern than the single-rank path (the calls differ), so CP runs
    with attention dropout are statistically, not bitwise, equivalent.
    """
    from torch.nn.attention.bias import causal_lower_right

    if dropout_p == 0.0 and q.is_cuda and docs.one_document_per_row():
        o = docs.context.te_attention(q, k, v, scale=scale)  # Transformer Engine's CP path, where chosen
        if o is not None:
            return o
    hkv = k.shape[1]
    kv = docs.context.gather_sequence(torch.cat([k, v], dim=1), dim=2)  # [B, 2·Hkv, T, D], global order
    k_all, v_all = kv[:, :hkv], kv[:, hkv:]
    rows: list[list[torch.Tensor]] = [[] for _ in range(q.shape[0])]
    for row, qs, qe, ks, ke in docs.context_spans():
        nq, nk = qe - qs, ke - ks
        qi, ki, vi = q[row:row + 1, :, qs:qe], k_all[row:row + 1, :, ks:ke], v_all[row:row + 1, :, ks:ke]
        if nq == nk:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, dropout_p=dropout_p, scale=scale,
                                               enable_gqa=True)
        else:
            if q.is_cuda:  # flash / memory-efficient kernels take the lower-right causal bias without a mask
                mask = causal_lower_right(nq, nk)
            else:  # CPU: what CausalBias would materialise anyway, without the tensor subclass
                mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                               enable_gqa=True)
        rows[row].append(o)
    return torch.cat([torch.cat(parts, dim=2) if len(parts) > 1 else parts[0] for parts in rows], dim=0)


def packed_attention(q, k, v, docs: PackedDocuments, *, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """The packed-document path for this input: context-parallel when the layout carries a CP group,
    else flex on CUDA (without dropout), varlen otherwise."""
    if docs.context is not None:
        return context_parallel_attention(q, k, v, docs, scale=scale, dropout_p=dropout_p)
    if q.is_cuda and dropout_p == 0.0 and flex_available():
        return flex_document_attention(q, k, v, docs, scale=scale)
    return varlen_document_attention(q, k, v, docs, scale=scale, dropout_p=dropout_p)


def masked_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                         expand: bool | None = None) -> torch.Tensor:
    """SDPA of ``q`` [B, H, T, D] over grouped ``k``/``v`` [B, Hkv, S, D] under a boolean ``mask``
    (broadcastable to [B, H, T, S]) — the cached prefill of a chunk after the first.

    On CUDA a boolean mask with ``enable_gqa`` leaves SDPA only its math kernel, which materialises the
    [B, H, T, S] scores (for 16 rows × 32 heads × a 2048-token chunk × 20k cached keys, ~43 GB in bf16);
    with the K/V heads expanded instead (``expand``, default: on CUDA), the memory-efficient kernel, which
    takes a mask, is eligible and the transient is the expanded K/V ([B, H, S, D] each). The same maths either
    way (tested on CPU, where ``enable_gqa`` is kept: its kernels take masks with GQA)."""
    if expand is None:
        expand = q.is_cuda
    if not expand or q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
                                          attn_mask=mask, scale=scale)


class Attention(nn.Module):
    #: context parallelism: set by the trainer (``trainer/parallel/context.py``); None = single rank
    cp = None

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

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None,
                docs: PackedDocuments | None = None) -> torch.Tensor:
        """``x`` [B, T, H]; packed documents by ``seq_idx`` (``docs``: its layout, if the caller built one
        for several layers)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if self.cp is not None and (docs is None or docs.context is None):
            # called outside the backbone (which builds one layout per forward): one document per row
            if seq_idx is None:
                seq_idx = torch.zeros(b, t, dtype=torch.long, device=x.device)
            docs = PackedDocuments(seq_idx, context=self.cp)
        if seq_idx is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.scale, enable_gqa=True)
        else:
            o = packed_attention(q, k, v, docs if docs is not None else PackedDocuments(seq_idx), scale=self.scale,
                                 dropout_p=dropout)
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
            o = masked_gqa_attention(q, K[:, :, :s], V[:, :, :s], mask[:, None], self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def decode_static(self, x: torch.Tensor, cache) -> torch.Tensor:
        """One token per row at shapes fixed for the whole generation: ``x`` [B, 1, H] → [B, 1, H].

        Row ``b``'s key/value go to position ``cache.lengths[b]`` (an index tensor: no Python int, so the
        step's shapes never change) and the query attends over the **whole** preallocated ``max_len``
        under the mask ``position <= lengths[b]`` instead of a slice up to ``cache.seen``. That reads
        ``max_len`` keys per step rather than the filled prefix — the price of a shape that lets one
        compiled graph (``torch.compile``, CUDA graphs) serve every step. Does not advance the cache.
        """
        b = x.shape[0]
        q = self.q_proj(x).view(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x[:, 0]).view(b, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x[:, 0]).view(b, self.num_kv_heads, self.head_dim)
        K, V = cache.key[self.layer_idx], cache.value[self.layer_idx]
        pos = cache.lengths
        rows = torch.arange(b, device=x.device)
        K[rows, :, pos] = k
        V[rows, :, pos] = v
        mask = cache._positions[None, :] <= pos[:, None]  # [B, max_len]
        o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask[:, None, None, :], scale=self.scale,
                                           enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, 1, self.num_heads * self.head_dim))
