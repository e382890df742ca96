"""SSD steps 3–4: each chunk's own final state, and the inter-chunk state passing.

Step 3 (``chunk_state_fwd``), per chunk ``c``, head ``h`` (group ``g``), with ``Q`` positions ``j``:

    states[c] = Σ_j exp(dA_cumsum[Q-1] − dA_cumsum[j]) · dt'[j] · [doc(j) = doc(end of c)] · x[j] ⊗ B[j]

Step 4 (``state_passing_fwd``), a short sequential scan over chunks:

    S_in[0] = initial_states (or 0)
    S_in[c+1] = exp(dA_cumsum[c, Q-1]) · [doc(end of c) = doc_in(c)] · S_in[c] + states[c]

where ``doc_in(c)`` is the document of the state entering chunk ``c``: that of token ``c·Q − 1`` (of
token 0 for ``c = 0``: the initial state belongs to the first token's document). The final state is
``S_in[nchunks]``.

The same step-3 kernel, with another weight, gives the backward's ``d S_in`` from the off-diagonal output
(``Σ_i exp(dA_cumsum[i]) [doc(i) = doc_in(c)] dy[i] ⊗ C[i]``), hence the ``MODE`` switch.
Backward of step 4 (``state_passing_bwd``) is the same scan in reverse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton_utils import device_guard, pow2_block

__all__ = ["chunk_state_fwd", "chunk_state_ref", "state_passing_fwd", "state_passing_bwd", "state_passing_ref",
           "off_state_grad", "off_state_grad_ref"]

MODE_STATES = 0  # weight exp(cs_end - cs_j) · dt'_j · [doc_j = doc_end]
MODE_OFF_GRAD = 1  # weight exp(cs_j) · [doc_j = doc_in]


@triton.jit
def _chunk_state_kernel(
    X_ptr, Y_ptr, dtp_ptr, cs_ptr, seq_ptr, out_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_y_b, stride_y_l, stride_y_g, stride_y_n,
    stride_cs_b, stride_cs_h, stride_cs_c,
    stride_seq_b, stride_seq_l,
    stride_o_b, stride_o_c, stride_o_h, stride_o_p,
    MODE: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = pid // (nchunks * nheads)
    pid_c = (pid // nheads) % nchunks
    pid_h = pid % nheads
    pid_g = pid_h // (nheads // ngroups)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    cs_base = cs_ptr + pid_b * stride_cs_b + pid_h * stride_cs_h + pid_c * stride_cs_c
    dtp_base = dtp_ptr + pid_b * stride_cs_b + pid_h * stride_cs_h + pid_c * stride_cs_c
    cs_end = tl.load(cs_base + chunk_size - 1)
    if HAS_SEQ:
        seq_base = seq_ptr + pid_b * stride_seq_b
        seq_end = tl.load(seq_base + (chunk_start + chunk_len - 1) * stride_seq_l)
        doc_in = tl.load(seq_base + tl.maximum(chunk_start - 1, 0) * stride_seq_l)
    x_base = X_ptr + pid_b * stride_x_b + chunk_start * stride_x_l + pid_h * stride_x_h
    y_base = Y_ptr + pid_b * stride_y_b + chunk_start * stride_y_l + pid_g * stride_y_g
    acc = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    for k0 in range(0, chunk_len, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < chunk_len
        xk = tl.load(x_base + offs_k[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                     mask=mk[:, None] & (offs_p < headdim)[None, :], other=0.0).to(tl.float32)
        yk = tl.load(y_base + offs_k[:, None] * stride_y_l + offs_n[None, :] * stride_y_n,
                     mask=mk[:, None] & (offs_n < dstate)[None, :], other=0.0).to(tl.float32)
        cs_k = tl.load(cs_base + offs_k, mask=mk, other=0.0)
        if MODE == 0:
            w = tl.exp(cs_end - cs_k) * tl.load(dtp_base + offs_k, mask=mk, other=0.0)
        else:
            w = tl.exp(cs_k)
        if HAS_SEQ:
            seq_k = tl.load(seq_base + (chunk_start + offs_k) * stride_seq_l, mask=mk, other=-1)
            if MODE == 0:
                w = tl.where(seq_k == seq_end, w, 0.0)
            else:
                w = tl.where(seq_k == doc_in, w, 0.0)
        w = tl.where(mk, w, 0.0)
        acc += tl.dot(tl.trans(xk * w[:, None]), yk, input_precision=DOT_PREC)
    o = out_ptr + pid_b * stride_o_b + pid_c * stride_o_c + pid_h * stride_o_h
    tl.store(o + offs_p[:, None] * stride_o_p + offs_n[None, :],
             acc, mask=(offs_p < headdim)[:, None] & (offs_n < dstate)[None, :])


@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, cs_ptr, seq_ptr, init_ptr, S_in_ptr, final_ptr,
    seqlen, nheads, chunk_size, nchunks, size,
    stride_st_b, stride_st_c, stride_st_h,
    stride_cs_b, stride_cs_h, stride_cs_c,
    stride_seq_b, stride_seq_l,
    stride_init_b, stride_init_h,
    HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_b, pid_h = tl.program_id(0), tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)  # over the flattened [p, n] state
    m = offs < size
    if HAS_INIT:
        S = tl.load(init_ptr + pid_b * stride_init_b + pid_h * stride_init_h + offs, mask=m, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK,), tl.float32)
    if HAS_SEQ:
        doc_in = tl.load(seq_ptr + pid_b * stride_seq_b)
    for c in range(nchunks):
        base = pid_b * stride_st_b + c * stride_st_c + pid_h * stride_st_h
        tl.store(S_in_ptr + base + offs, S, mask=m)
        keep = tl.exp(tl.load(cs_ptr + pid_b * stride_cs_b + pid_h * stride_cs_h + c * stride_cs_c + chunk_size - 1))
        if HAS_SEQ:
            doc_end = tl.load(seq_ptr + pid_b * stride_seq_b
                              + tl.minimum(c * chunk_size + chunk_size - 1, seqlen - 1) * stride_seq_l)
            keep = tl.where(doc_end == doc_in, keep, 0.0)
            doc_in = doc_end
        S = keep * S + tl.load(states_ptr + base + offs, mask=m, other=0.0)
    tl.store(final_ptr + (pid_b * nheads + pid_h) * size + offs, S, mask=m)


@triton.jit
def _state_passing_bwd_kernel(
    dS_off_ptr, S_in_ptr, cs_ptr, seq_ptr, dfinal_ptr, dstates_ptr, dinit_ptr, dcs_end_part_ptr,
    seqlen, nheads, chunk_size, nchunks, size, nblocks,
    stride_st_b, stride_st_c, stride_st_h,
    stride_cs_b, stride_cs_h, stride_cs_c,
    stride_seq_b, stride_seq_l,
    stride_df_b, stride_df_h,
    HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_b, pid_h, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid_s * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + pid_b * stride_df_b + pid_h * stride_df_h + offs, mask=m, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BLOCK,), tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        base = pid_b * stride_st_b + c * stride_st_c + pid_h * stride_st_h
        # dS is d(state leaving chunk c) = d states[c]; S_out = keep · S_in + states.
        tl.store(dstates_ptr + base + offs, dS, mask=m)
        keep = tl.exp(tl.load(cs_ptr + pid_b * stride_cs_b + pid_h * stride_cs_h + c * stride_cs_c + chunk_size - 1))
        if HAS_SEQ:
            doc_end = tl.load(seq_ptr + pid_b * stride_seq_b
                              + tl.minimum(c * chunk_size + chunk_size - 1, seqlen - 1) * stride_seq_l)
            doc_in = tl.load(seq_ptr + pid_b * stride_seq_b + tl.maximum(c * chunk_size - 1, 0) * stride_seq_l)
            keep = tl.where(doc_end == doc_in, keep, 0.0)
        S_in = tl.load(S_in_ptr + base + offs, mask=m, other=0.0)
        # d keep = <dS, S_in>; keep = exp(cs_end)·mask, so d cs_end = keep · d keep (partial over this block).
        tl.store(dcs_end_part_ptr + ((pid_b * nheads + pid_h) * nchunks + c) * nblocks + pid_s,
                 keep * tl.sum(dS * S_in, axis=0))
        dS = keep * dS + tl.load(dS_off_ptr + base + offs, mask=m, other=0.0)
    if HAS_INIT:
        tl.store(dinit_ptr + (pid_b * nheads + pid_h) * size + offs, dS, mask=m)


# ------------------------------------------------------------------------------------------- launchers
def dot_prec(dtype):
    # fp32 inputs: exact fp32 products (tests compare fp32 tightly). Half inputs carry ≤ 10 mantissa bits,
    # so tf32 tensor cores lose nothing that the inputs had.
    return "ieee" if dtype == torch.float32 else "tf32"


def warps(tile_elems: int, per_warp: int = 512) -> int:
    """Warps for a kernel whose largest fp32 accumulator tile has ``tile_elems`` elements: about ``per_warp``
    elements (16 registers per thread at 512) per warp, between 4 and 16, so the big tiles do not spill."""
    return max(4, min(16, tile_elems // per_warp))


def _chunk_state(X, Y, dtp, cs, seq_idx, chunk_size, mode):
    b, l, h, p = X.shape
    g, n = Y.shape[2], Y.shape[3]
    nchunks = dtp.shape[2]
    out = torch.empty(b, nchunks, h, p, n, device=X.device, dtype=torch.float32)
    BLOCK_P, BLOCK_N, BLOCK_K = pow2_block(p), pow2_block(n), pow2_block(chunk_size, hi=32)
    grid = (b * nchunks * h, triton.cdiv(p, BLOCK_P), triton.cdiv(n, BLOCK_N))
    seq = seq_idx if seq_idx is not None else cs
    with device_guard(X):
        _chunk_state_kernel[grid](
            X, Y, dtp, cs, seq, out,
            l, h, g, p, n, chunk_size, nchunks,
            X.stride(0), X.stride(1), X.stride(2), X.stride(3),
            Y.stride(0), Y.stride(1), Y.stride(2), Y.stride(3),
            cs.stride(0), cs.stride(1), cs.stride(2),
            seq.stride(0), seq.stride(1) if seq_idx is not None else 0,
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            MODE=mode, HAS_SEQ=seq_idx is not None, DOT_PREC=dot_prec(X.dtype),
            BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=warps(BLOCK_P * BLOCK_N),
        )
    return out


def chunk_state_fwd(x, B, dtp, cs, chunk_size, seq_idx=None):
    """x [b, l, h, p], B [b, l, g, n], dt'/dA_cumsum [b, h, c, Q] → states [b, c, h, p, n] fp32."""
    return _chunk_state(x, B, dtp, cs, seq_idx, chunk_size, MODE_STATES)


def off_state_grad(dy, C, cs, chunk_size, seq_idx=None):
    """d S_in from the off-diagonal output: Σ_i exp(cs_i) [doc_i = doc_in] dy_i ⊗ C_i → [b, c, h, p, n] fp32."""
    return _chunk_state(dy, C, cs, cs, seq_idx, chunk_size, MODE_OFF_GRAD)


def state_passing_fwd(states, cs, chunk_size, seqlen, seq_idx=None, initial_states=None):
    """states [b, c, h, p, n] → (S_in [b, c, h, p, n] fp32: the state entering each chunk, final [b, h, p, n])."""
    b, nchunks, h, p, n = states.shape
    S_in = torch.empty_like(states)
    final = torch.empty(b, h, p, n, device=states.device, dtype=torch.float32)
    size = p * n
    BLOCK = min(1024, triton.next_power_of_2(size))
    init = initial_states.contiguous() if initial_states is not None else None
    with device_guard(states):
        _state_passing_fwd_kernel[(b, h, triton.cdiv(size, BLOCK))](
            states, cs, seq_idx if seq_idx is not None else cs, init if init is not None else states, S_in, final,
            seqlen, h, chunk_size, nchunks, size,
            states.stride(0), states.stride(1), states.stride(2),
            cs.stride(0), cs.stride(1), cs.stride(2),
            seq_idx.stride(0) if seq_idx is not None else 0, seq_idx.stride(1) if seq_idx is not None else 0,
            init.stride(0) if init is not None else 0, init.stride(1) if init is not None else 0,
            HAS_SEQ=seq_idx is not None, HAS_INIT=init is not None, BLOCK=BLOCK,
        )
    return S_in, final


def state_passing_bwd(dS_off, S_in, cs, chunk_size, seqlen, seq_idx=None, dfinal=None, has_initial_states=False):
    """Reverse of :func:`state_passing_fwd`.

    ``dS_off`` [b, c, h, p, n]: gradient reaching each ``S_in[c]`` directly (from the off-diagonal output).
    Returns ``(d states [b, c, h, p, n], d initial_states [b, h, p, n] or None, d dA_cumsum[:, :, :, Q-1]
    [b, h, c])`` — the last is the decay term's gradient, added by the caller to the chunk's last position.
    """
    b, nchunks, h, p, n = S_in.shape
    dstates = torch.empty_like(S_in)
    size = p * n
    BLOCK = min(1024, triton.next_power_of_2(size))
    nblocks = triton.cdiv(size, BLOCK)
    dcs_end_part = torch.empty(b, h, nchunks, nblocks, device=S_in.device, dtype=torch.float32)
    dinit = torch.empty(b, h, p, n, device=S_in.device, dtype=torch.float32) if has_initial_states else None
    df = dfinal.contiguous() if dfinal is not None else None
    dS_off = dS_off.contiguous()
    with device_guard(S_in):
        _state_passing_bwd_kernel[(b, h, nblocks)](
            dS_off, S_in, cs, seq_idx if seq_idx is not None else cs, df if df is not None else S_in,
            dstates, dinit if dinit is not None else S_in, dcs_end_part,
            seqlen, h, chunk_size, nchunks, size, nblocks,
            S_in.stride(0), S_in.stride(1), S_in.stride(2),
            cs.stride(0), cs.stride(1), cs.stride(2),
            seq_idx.stride(0) if seq_idx is not None else 0, seq_idx.stride(1) if seq_idx is not None else 0,
            df.stride(0) if df is not None else 0, df.stride(1) if df is not None else 0,
            HAS_SEQ=seq_idx is not None, HAS_DFINAL=df is not None, HAS_INIT=has_initial_states, BLOCK=BLOCK,
        )
    return dstates, dinit, dcs_end_part.sum(-1)


# ------------------------------------------------------------------------------------------- references
def doc_masks(seq_idx, b, l, nchunks, Q, device):
    """(doc_j == doc_end(c)) [b, c, Q], (doc_j == doc_in(c)) [b, c, Q], keep-mask [b, c] — all ones without seq_idx."""
    if seq_idx is None:
        ones = torch.ones(b, nchunks, Q, device=device)
        return ones, ones, torch.ones(b, nchunks, device=device)
    pad = nchunks * Q - l
    s = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1).view(b, nchunks, Q)
    doc_end = s[:, :, -1]
    doc_in = torch.cat([s[:, :1, 0], s[:, :-1, -1]], dim=1)
    return ((s == doc_end[..., None]).float(), (s == doc_in[..., None]).float(), (doc_end == doc_in).float())


def chunked(t, Q, nchunks):
    """[b, l, k, m] → [b, c, Q, k, m] fp32, zero-padded."""
    b, l = t.shape[:2]
    t = torch.nn.functional.pad(t.float(), (0, 0, 0, 0, 0, nchunks * Q - l))
    return t.view(b, nchunks, Q, *t.shape[2:])


def chunk_state_ref(x, B, dtp, cs, chunk_size, seq_idx=None):
    b, l, h, p = x.shape
    g = B.shape[2]
    nchunks = dtp.shape[2]
    same_end, _, _ = doc_masks(seq_idx, b, l, nchunks, chunk_size, x.device)
    w = torch.exp(cs[..., -1:] - cs) * dtp * same_end[:, None]  # [b, h, c, Q]
    xc = chunked(x, chunk_size, nchunks)
    Bc = chunked(B, chunk_size, nchunks).repeat_interleave(h // g, dim=3)
    return torch.einsum("bhcj,bcjhp,bcjhn->bchpn", w, xc, Bc)


def off_state_grad_ref(dy, C, cs, chunk_size, seq_idx=None):
    b, l, h, p = dy.shape
    g = C.shape[2]
    nchunks = cs.shape[2]
    _, same_in, _ = doc_masks(seq_idx, b, l, nchunks, chunk_size, dy.device)
    w = torch.exp(cs) * same_in[:, None]
    return torch.einsum("bhci,bcihp,bcihn->bchpn", w, chunked(dy, chunk_size, nchunks),
                        chunked(C, chunk_size, nchunks).repeat_interleave(h // g, dim=3))


def state_passing_ref(states, cs, chunk_size, seqlen, seq_idx=None, initial_states=None):
    b, nchunks, h, p, n = states.shape
    _, _, keep_mask = doc_masks(seq_idx, b, seqlen, nchunks, chunk_size, states.device)
    keep = torch.exp(cs[..., -1]) * keep_mask[:, None]  # [b, h, c]
    S = initial_states.float() if initial_states is not None else states.new_zeros(b, h, p, n)
    S_in = []
    for c in range(nchunks):
        S_in.append(S)
        S = keep[:, :, c, None, None] * S + states[:, c]
    return torch.stack(S_in, dim=1), S
