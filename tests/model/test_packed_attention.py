"""Packed-document attention without a T×T mask: varlen (CPU) and FlexAttention (CUDA) equal the dense-mask
reference, forward and backward, on uneven documents (1-token ones included) with grouped-query heads."""

import warnings

import pytest
import torch

import tandem.model.attention as attention
from tandem.model import HybridConfig, HybridLM
from tandem.model.attention import (
    FLEX_BLOCK, Attention, PackedDocuments, dense_document_attention, document_starts, flex_document_attention,
    varlen_document_attention,
)

LAYOUTS = {
    # name: per-row document lengths (each row sums to T)
    "uneven_with_1_token_docs": ([7, 1, 1, 30, 1, 24], [64]),
    "one_token_docs_only": ([1] * 16, [3, 1, 12]),
    "first_and_last_single": ([1, 62, 1], [32, 32]),
}


def _seq_idx(rows):
    return torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in rows])


def _qkv(b, t, hq=4, hkv=2, d=8, grad=True):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g, requires_grad=grad) for h in (hq, hkv, hkv))
    return q, k, v


@pytest.mark.parametrize("layout", LAYOUTS)
def test_varlen_equals_dense_forward_and_backward(layout):
    seq_idx = _seq_idx(LAYOUTS[layout])
    b, t = seq_idx.shape
    q, k, v = _qkv(b, t)
    g_out = torch.randn(b, 4, t, 8, generator=torch.Generator().manual_seed(1))
    ref = dense_document_attention(q, k, v, seq_idx, scale=0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g_out)
    out = varlen_document_attention(q, k, v, PackedDocuments(seq_idx), scale=0.3)
    grads = torch.autograd.grad(out, (q, k, v), g_out)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_spans_are_the_document_runs():
    seq_idx = _seq_idx([[2, 1, 3], [6]])
    assert PackedDocuments(seq_idx).spans() == [(0, 0, 2), (0, 2, 3), (0, 3, 6), (1, 0, 6)]


@pytest.mark.parametrize("t", [5, FLEX_BLOCK, FLEX_BLOCK + 1, 3 * FLEX_BLOCK + 44])
def test_flex_block_mask_equals_torch_create_block_mask_and_dense_forward(t):
    """The BlockMask built from document boundaries has the tiles torch's own create_block_mask finds
    by evaluating the dense mask, and flex (eager, forward only on CPU) equals the dense reference."""
    from torch.nn.attention.flex_attention import create_block_mask

    cuts = [1, 2, FLEX_BLOCK - 1, FLEX_BLOCK + 3, 2 * FLEX_BLOCK, 2 * FLEX_BLOCK + 1]
    rows = []
    for r in range(2):  # row 0: many boundaries incl. 1-token docs and tile edges; row 1: one document
        idx = torch.zeros(t, dtype=torch.long)
        for c in (cuts if r == 0 else []):
            if c < t:
                idx[c:] += 1
        rows.append(idx)
    seq_idx = torch.stack(rows)
    docs = PackedDocuments(seq_idx)
    ours = docs.block_mask()
    run = document_starts(seq_idx).int().cumsum(1)
    theirs = create_block_mask(lambda b, h, q, kv: (run[b, q] == run[b, kv]) & (q >= kv), 2, None, t, t, device="cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        n = getattr(ours, num)
        for b in range(2):
            for i in range(n.shape[-1]):
                k = int(n[b, 0, i])
                assert set(getattr(ours, idx)[b, 0, i, :k].tolist()) == set(getattr(theirs, idx)[b, 0, i, :k].tolist())
    q, k, v = _qkv(2, t, grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = flex_document_attention(q, k, v, docs, scale=0.3, compiled=False)
    torch.testing.assert_close(out, dense_document_attention(q, k, v, seq_idx, scale=0.3), atol=1e-6, rtol=1e-5)


def test_mask_memory_is_linear_for_varlen_and_tiles_squared_for_flex():
    """At 16k tokens the dense mask is 256 MiB per row; varlen holds O(T), flex O((T/128)²)."""
    t = 16384
    lengths = [5000, 1, 3000, 1, 8382]
    docs = PackedDocuments(_seq_idx([lengths]))
    dense, varlen, flex = docs.mask_bytes("dense"), docs.mask_bytes("varlen"), docs.mask_bytes("flex")
    assert dense == t * t
    assert varlen == 8 * t + 24 * len(lengths)  # seq_idx (int64) + the spans
    tiles = t // FLEX_BLOCK
    assert flex <= 4 * (t + 4 * tiles + 4 * tiles * tiles)  # run ids + 4 counts [tiles] + 4 index maps [tiles²], int32
    assert flex < dense / 200 and varlen < dense / 2000


def test_attention_module_never_builds_the_dense_mask(monkeypatch):
    cfg = HybridConfig.preset("tiny")
    attn = Attention(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    seq_idx = _seq_idx([[5, 1, 10], [16]])
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, 2, 16).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, 2, 16).transpose(1, 2)
    ref = attn.o_proj(dense_document_attention(q, k, v, seq_idx, scale=attn.scale).transpose(1, 2).reshape(b, t, 64))
    ref_grad = torch.autograd.grad(ref.square().sum(), x)[0]

    def refuse(*a, **k):
        raise AssertionError("dense [T, T] mask built")

    monkeypatch.setattr(attention, "document_causal_mask", refuse)
    out = attn(x, seq_idx)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), x)[0], ref_grad, atol=1e-5, rtol=1e-5)


def test_document_boundaries_reach_the_host_once_per_forward(monkeypatch):
    """Two attention layers, activation checkpointing (recompute) on: one boundary computation per step."""
    calls = []
    real = attention.document_starts
    monkeypatch.setattr(attention, "document_starts", lambda s: calls.append(1) or real(s))
    model = HybridLM(HybridConfig.preset("tiny", hybrid_override_pattern="*M*E"), init_seed=0)
    model.set_activation_checkpointing("all")
    ids = torch.randint(0, 512, (2, 24))
    loss = model(ids, _seq_idx([[3, 1, 20], [24]]), labels=ids).sum()
    loss.backward()
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_compiled_on_cuda_equals_dense_forward_and_backward(layout):
    """The GPU path: compiled FlexAttention with the document BlockMask (also what Attention picks on CUDA)."""
    seq_idx = _seq_idx(LAYOUTS[layout]).cuda()
    seq_idx = torch.cat([seq_idx] * 5, dim=1)  # 320 tokens: several 128-token tiles
    seq_idx = seq_idx + torch.arange(5, device="cuda").repeat_interleave(64)[None] * 100
    b, t = seq_idx.shape
    q, k, v = (x.detach().cuda().requires_grad_() for x in _qkv(b, t, d=16))
    g_out = torch.randn(b, 4, t, 16, device="cuda")
    ref = dense_document_attention(q, k, v, seq_idx, scale=0.25)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g_out)
    out = flex_document_attention(q, k, v, PackedDocuments(seq_idx), scale=0.25)
    grads = torch.autograd.grad(out, (q, k, v), g_out)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    assert attention.packed_attention(q, k, v, PackedDocuments(seq_idx), scale=0.25).shape == ref.shape


def test_masked_gqa_attention_expanded_heads_equal_enable_gqa():
    """The cached-prefill attention after the first chunk: expanding the K/V heads (what CUDA runs, so the
    memory-efficient kernel can take the mask instead of the math kernel's [B, H, T, S] scores) gives the
    ``enable_gqa`` result."""
    from tandem.model.attention import masked_gqa_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 5, 16, generator=g)
    k, v = torch.randn(3, 2, 11, 16, generator=g), torch.randn(3, 2, 11, 16, generator=g)
    lengths = torch.tensor([6, 3, 0])  # rows already hold this many tokens; the 5 new ones follow
    mask = (torch.arange(11)[None, None, :] <= (lengths[:, None] + torch.arange(5))[:, :, None])[:, None]
    a = masked_gqa_attention(q, k, v, mask, 0.25, expand=False)
    b = masked_gqa_attention(q, k, v, mask, 0.25, expand=True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
