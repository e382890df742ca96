"""SSD steps 2 and 5: the chunk output, and the fused backward of everything inside a chunk.

Forward (``chunk_scan_fwd``), per chunk ``c``, head ``h`` (group ``g``), position ``i``:

    Y_diag[i] = Σ_{j ≤ i, doc(j) = doc(i)} CB[g, i, j] · exp(cs[i] − cs[j]) · dt'[j] · x[j]
    Y_off[i]  = [doc(i) = doc_in(c)] · exp(cs[i]) · S_in[c] · C[i]
    y[i]      = Y_diag[i] + Y_off[i] + D · x[i]

with ``cs = dA_cumsum`` (step 1), ``CB`` from step 2a and ``S_in`` from step 4.

Backward (``chunk_scan_bwd``): given ``dy`` and ``d states`` (from the reverse state passing), one kernel
launched twice — over blocks of source positions ``j`` and over blocks of target positions ``i`` of each
(batch, chunk, head), tiles of at most 32 × 32 of the ``[Q, Q]`` matrices (so nothing spills at Q = 128) —
produces

    G[j]   = Σ_i L[i, j] dy[i] + w_state[j] · d states · B[j]        (L = CB ∘ exp(segsum) ∘ same-doc)
    dx[j]  = dt'[j] · G[j] + D · dy[j]              d dt'[j] = x[j] · G[j]
    dC[i]  = Σ_j dCB[i, j] B[j] + w_off[i] · dy[i] · S_in      (per head; summed over the group by the caller)
    dB[j]  = Σ_i dCB[i, j] C[i] + w_state[j] dt'[j] · x[j] · d states
    d cs   : from Y_diag (rows +, columns −), from Y_off (+ dy · Y_off) and from states (− at j, + at Q−1)

where ``dCB[i, j] = exp(cs[i] − cs[j]) · dt'[j] · (dy[i] · x[j])`` (masked as L), ``w_state[j] =
exp(cs[Q−1] − cs[j]) [doc(j) = doc(end)]`` and ``w_off[i] = exp(cs[i]) [doc(i) = doc_in]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton_utils import device_guard, pow2_block

from .chunk_state import chunked, doc_masks, dot_prec, warps

__all__ = ["chunk_scan_fwd", "chunk_scan_bwd", "chunk_scan_ref"]


@triton.jit
def _chunk_scan_fwd_kernel(
    CB_ptr, x_ptr, dtp_ptr, cs_ptr, C_ptr, S_in_ptr, D_ptr, seq_ptr, y_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_i,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_cs_b, stride_cs_h, stride_cs_c,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p,
    stride_D_h, stride_D_p,
    stride_seq_b, stride_seq_l,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = pid // (nchunks * nheads)
    pid_c = (pid // nheads) % nchunks
    pid_h = pid % nheads
    pid_g = pid_h // (nheads // ngroups)
    offs_i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    mi = offs_i < chunk_len
    mp = offs_p < headdim
    cs_base = cs_ptr + pid_b * stride_cs_b + pid_h * stride_cs_h + pid_c * stride_cs_c
    dtp_base = dtp_ptr + pid_b * stride_cs_b + pid_h * stride_cs_h + pid_c * stride_cs_c
    cs_i = tl.load(cs_base + offs_i, mask=mi, other=0.0)
    if HAS_SEQ:
        seq_base = seq_ptr + pid_b * stride_seq_b
        seq_i = tl.load(seq_base + (chunk_start + offs_i) * stride_seq_l, mask=mi, other=-1)
        doc_in = tl.load(seq_base + tl.maximum(chunk_start - 1, 0) * stride_seq_l)

    # Y_off: the incoming state read out by C_i, decayed to position i.
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    C_base = C_ptr + pid_b * stride_C_b + chunk_start * stride_C_l + pid_g * stride_C_g
    s_base = S_in_ptr + pid_b * stride_s_b + pid_c * stride_s_c + pid_h * stride_s_h
    for k0 in range(0, dstate, BLOCK_S):
        offs_k = k0 + tl.arange(0, BLOCK_S)
        mk = offs_k < dstate
        c = tl.load(C_base + offs_i[:, None] * stride_C_l + offs_k[None, :] * stride_C_n,
                    mask=mi[:, None] & mk[None, :], other=0.0).to(tl.float32)
        s = tl.load(s_base + offs_p[None, :] * stride_s_p + offs_k[:, None],
                    mask=mp[None, :] & mk[:, None], other=0.0)
        acc += tl.dot(c, s, input_precision=DOT_PREC)
    w_off = tl.exp(cs_i)
    if HAS_SEQ:
        w_off = tl.where(seq_i == doc_in, w_off, 0.0)
    acc = acc * w_off[:, None]

    # Y_diag: causal, same-document, decay-weighted C·Bᵀ applied to dt'·x. Blocks past the diagonal are skipped.
    cb_base = CB_ptr + pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g
    x_base = x_ptr + pid_b * stride_x_b + chunk_start * stride_x_l + pid_h * stride_x_h
    hi = tl.minimum((tl.program_id(1) + 1) * BLOCK_M, chunk_len)
    for k0 in range(0, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < chunk_len
        cb = tl.load(cb_base + offs_i[:, None] * stride_cb_i + offs_k[None, :],
                     mask=mi[:, None] & mk[None, :], other=0.0)
        cs_k = tl.load(cs_base + offs_k, mask=mk, other=0.0)
        dtp_k = tl.load(dtp_base + offs_k, mask=mk, other=0.0)
        m = (offs_k[None, :] <= offs_i[:, None]) & mk[None, :] & mi[:, None]
        if HAS_SEQ:
            seq_k = tl.load(seq_base + (chunk_start + offs_k) * stride_seq_l, mask=mk, other=-2)
            m = m & (seq_i[:, None] == seq_k[None, :])
        # exp only where masked in: above the diagonal cs_i − cs_k > 0 could overflow.
        w = tl.where(m, cb * tl.exp(tl.where(m, cs_i[:, None] - cs_k[None, :], 0.0)) * dtp_k[None, :], 0.0)
        xk = tl.load(x_base + offs_k[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                     mask=mk[:, None] & mp[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(w, xk, input_precision=DOT_PREC)

    xi = tl.load(x_base + offs_i[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                 mask=mi[:, None] & mp[None, :], other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + pid_h * stride_D_h + offs_p * stride_D_p, mask=mp, other=0.0).to(tl.float32)
        acc += xi * Dv[None, :]
    y_base = y_ptr + pid_b * stride_y_b + chunk_start * stride_y_l + pid_h * stride_y_h
    tl.store(y_base + offs_i[:, None] * stride_y_l + offs_p[None, :] * stride_y_p, acc,
             mask=mi[:, None] & mp[None, :])


@triton.jit
def _decay(cs_i, cs_j, offs_i, offs_j, mi, mj, seq_i, seq_j, HAS_SEQ: tl.constexpr):
    """[BI, BJ] tile exp(cs_i − cs_j) on the causal same-document mask (j ≤ i, doc_i = doc_j), 0 elsewhere."""
    m = (offs_j[None, :] <= offs_i[:, None]) & mi[:, None] & mj[None, :]
    if HAS_SEQ:
        m = m & (seq_i[:, None] == seq_j[None, :])
    return tl.where(m, tl.exp(tl.where(m, cs_i[:, None] - cs_j[None, :], 0.0)), 0.0)


@triton.jit
def _chunk_scan_bwd_kernel(
    x_ptr, dy_ptr, dtp_ptr, cs_ptr, seq_ptr, CB_ptr, B_ptr, C_ptr, S_in_ptr, dst_ptr, D_ptr,
    dx_ptr, ddtp_ptr, dcs_ptr, u_part_ptr, dD_ptr, dBC_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks, nblocks,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_dy_b, stride_dy_l, stride_dy_h, stride_dy_p,
    stride_cs_b, stride_cs_h, stride_cs_c,
    stride_seq_b, stride_seq_l,
    stride_cb_b, stride_cb_c, stride_cb_g, stride_cb_i,
    stride_B_b, stride_B_l, stride_B_g, stride_B_n,
    stride_C_b, stride_C_l, stride_C_g, stride_C_n,
    stride_s_b, stride_s_c, stride_s_h, stride_s_p,
    stride_D_h, stride_D_p,
    stride_dx_b, stride_dx_l, stride_dx_h, stride_dx_p,
    stride_dBC_b, stride_dBC_l, stride_dBC_h,
    COLUMNS: tl.constexpr, HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (batch·chunk·head, block of BLOCK positions), whole headdim and dstate per tile.

    COLUMNS: the block is a set of *source* positions j, looping over the blocks i ≥ j:
        G[j] = Σ_i L[i, j] dy[i] + w_state[j] · B[j]·dstatesᵀ;  dx, d dt', dB (per head), d cs (− column
        sums, − u), Σ u (enters d cs at Q−1), dD partials.
    rows (not COLUMNS): the block is a set of *target* positions i, looping over the blocks j ≤ i:
        dC (per head) and d cs (+ row sums, + dy·Y_off).
    The two programs recompute dy·xᵀ for their tile instead of sharing it through memory.
    """
    pid = tl.program_id(0)
    pid_b = pid // (nchunks * nheads)
    pid_c = (pid // nheads) % nchunks
    pid_h = pid % nheads
    pid_g = pid_h // (nheads // ngroups)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # this program's positions (j or i)
    mk = offs_k < chunk_len
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp = offs_p < headdim
    mn = offs_n < dstate
    cs_off = pid_b * stride_cs_b + pid_h * stride_cs_h + pid_c * stride_cs_c
    cs_k = tl.load(cs_ptr + cs_off + offs_k, mask=mk, other=0.0)
    seq_k = offs_k
    if HAS_SEQ:
        seq_base = seq_ptr + pid_b * stride_seq_b
        seq_k = tl.load(seq_base + (chunk_start + offs_k) * stride_seq_l, mask=mk, other=-1)
    x_base = x_ptr + pid_b * stride_x_b + chunk_start * stride_x_l + pid_h * stride_x_h
    dy_base = dy_ptr + pid_b * stride_dy_b + chunk_start * stride_dy_l + pid_h * stride_dy_h
    B_base = B_ptr + pid_b * stride_B_b + chunk_start * stride_B_l + pid_g * stride_B_g
    C_base = C_ptr + pid_b * stride_C_b + chunk_start * stride_C_l + pid_g * stride_C_g
    cb_base = CB_ptr + pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g
    st_off = pid_b * stride_s_b + pid_c * stride_s_c + pid_h * stride_s_h
    m_pn = mp[:, None] & mn[None, :]
    kp = mk[:, None] & mp[None, :]
    kn = mk[:, None] & mn[None, :]
    dBC_ptrs = dBC_ptr + pid_b * stride_dBC_b + (chunk_start + offs_k[:, None]) * stride_dBC_l \
        + pid_h * stride_dBC_h + offs_n[None, :]

    if COLUMNS:
        j = offs_k
        dtp_j = tl.load(dtp_ptr + cs_off + j, mask=mk, other=0.0)
        x_j = tl.load(x_base + j[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=kp, other=0.0).to(tl.float32)
        g_diag = tl.zeros((BLOCK, BLOCK_P), tl.float32)
        dB = tl.zeros((BLOCK, BLOCK_N), tl.float32)
        dcs = tl.zeros((BLOCK,), tl.float32)
        for i0 in range(tl.program_id(1) * BLOCK, chunk_len, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            mi = i < chunk_len
            cs_i = tl.load(cs_ptr + cs_off + i, mask=mi, other=0.0)
            seq_i = i
            if HAS_SEQ:
                seq_i = tl.load(seq_base + (chunk_start + i) * stride_seq_l, mask=mi, other=-1)
            dy_i = tl.load(dy_base + i[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p,
                           mask=mi[:, None] & mp[None, :], other=0.0).to(tl.float32)
            C_i = tl.load(C_base + i[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                          mask=mi[:, None] & mn[None, :], other=0.0).to(tl.float32)
            cb = tl.load(cb_base + i[:, None] * stride_cb_i + j[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
            decay = _decay(cs_i, cs_k, i, j, mi, mk, seq_i, seq_k, HAS_SEQ)
            g_diag += tl.dot(tl.trans(cb * decay), dy_i, input_precision=DOT_PREC)
            dcb = tl.dot(dy_i, tl.trans(x_j), input_precision=DOT_PREC) * decay * dtp_j[None, :]  # d CB[i, j]
            dB += tl.dot(tl.trans(dcb), C_i, input_precision=DOT_PREC)
            dcs -= tl.sum(cb * dcb, axis=0)  # exp(cs_i − cs_j): column sums leave d cs at j
        # The chunk's own final state: states = Σ_j w_state[j] dt'[j] x[j] ⊗ B[j].
        cs_end = tl.load(cs_ptr + cs_off + chunk_size - 1)
        w_state = tl.exp(cs_end - cs_k)
        if HAS_SEQ:
            seq_end = tl.load(seq_base + (chunk_start + chunk_len - 1) * stride_seq_l)
            w_state = tl.where(seq_k == seq_end, w_state, 0.0)
        w_state = tl.where(mk, w_state, 0.0)
        dst = tl.load(dst_ptr + st_off + offs_p[:, None] * stride_s_p + offs_n[None, :], mask=m_pn, other=0.0)
        B_j = tl.load(B_base + j[:, None] * stride_B_l + offs_n[None, :] * stride_B_n, mask=kn, other=0.0).to(tl.float32)
        g_state = tl.dot(B_j, tl.trans(dst), input_precision=DOT_PREC)  # [j, p]
        G = g_diag + w_state[:, None] * g_state
        dy_j = tl.load(dy_base + j[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p, mask=kp, other=0.0).to(tl.float32)
        dx = dtp_j[:, None] * G
        if HAS_D:
            Dv = tl.load(D_ptr + pid_h * stride_D_h + offs_p * stride_D_p, mask=mp, other=0.0).to(tl.float32)
            dx += Dv[None, :] * dy_j
            # dD partials [b, c, block, h, p], summed by the caller.
            tl.store(dD_ptr + (((pid_b * nchunks + pid_c) * nblocks + tl.program_id(1)) * nheads + pid_h) * headdim
                     + offs_p, tl.sum(dy_j * x_j, axis=0), mask=mp)
        tl.store(dx_ptr + pid_b * stride_dx_b + (chunk_start + j[:, None]) * stride_dx_l + pid_h * stride_dx_h
                 + offs_p[None, :] * stride_dx_p, dx, mask=kp)
        tl.store(ddtp_ptr + cs_off + j, tl.sum(x_j * G, axis=1), mask=offs_k < chunk_size)
        u = dtp_j * w_state * tl.sum(x_j * g_state, axis=1)  # d log w_state[j]: − at j, + at Q−1 (by the caller)
        tl.store(dcs_ptr + cs_off + j, dcs - u, mask=offs_k < chunk_size)
        tl.store(u_part_ptr + ((pid_b * nheads + pid_h) * nchunks + pid_c) * nblocks + tl.program_id(1), tl.sum(u, axis=0))
        dB += (w_state * dtp_j)[:, None] * tl.dot(x_j, dst, input_precision=DOT_PREC)
        tl.store(dBC_ptrs, dB, mask=kn)
    else:
        i = offs_k
        dy_i = tl.load(dy_base + i[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p, mask=kp, other=0.0).to(tl.float32)
        dC = tl.zeros((BLOCK, BLOCK_N), tl.float32)
        dcs = tl.zeros((BLOCK,), tl.float32)
        hi = tl.minimum((tl.program_id(1) + 1) * BLOCK, chunk_len)
        for j0 in range(0, hi, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            mj = j < chunk_len
            cs_j = tl.load(cs_ptr + cs_off + j, mask=mj, other=0.0)
            dtp_j = tl.load(dtp_ptr + cs_off + j, mask=mj, other=0.0)
            seq_j = j
            if HAS_SEQ:
                seq_j = tl.load(seq_base + (chunk_start + j) * stride_seq_l, mask=mj, other=-1)
            x_j = tl.load(x_base + j[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                          mask=mj[:, None] & mp[None, :], other=0.0).to(tl.float32)
            B_j = tl.load(B_base + j[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                          mask=mj[:, None] & mn[None, :], other=0.0).to(tl.float32)
            cb = tl.load(cb_base + i[:, None] * stride_cb_i + j[None, :], mask=mk[:, None] & mj[None, :], other=0.0)
            decay = _decay(cs_k, cs_j, i, j, mk, mj, seq_k, seq_j, HAS_SEQ)
            dcb = tl.dot(dy_i, tl.trans(x_j), input_precision=DOT_PREC) * decay * dtp_j[None, :]
            dC += tl.dot(dcb, B_j, input_precision=DOT_PREC)
            dcs += tl.sum(cb * dcb, axis=1)  # exp(cs_i − cs_j): row sums enter d cs at i
        # Y_off[i] = w_off[i] · C[i]·S_inᵀ: dC[i] += w_off[i] dy[i]·S_in, d cs[i] += dy[i]·Y_off[i].
        w_off = tl.exp(cs_k)
        if HAS_SEQ:
            doc_in = tl.load(seq_base + tl.maximum(chunk_start - 1, 0) * stride_seq_l)
            w_off = tl.where(seq_k == doc_in, w_off, 0.0)
        w_off = tl.where(mk, w_off, 0.0)
        s_in = tl.load(S_in_ptr + st_off + offs_p[:, None] * stride_s_p + offs_n[None, :], mask=m_pn, other=0.0)
        C_i = tl.load(C_base + i[:, None] * stride_C_l + offs_n[None, :] * stride_C_n, mask=kn, other=0.0).to(tl.float32)
        y_off = tl.dot(C_i, tl.trans(s_in), input_precision=DOT_PREC)  # [i, p], without w_off
        dcs += w_off * tl.sum(dy_i * y_off, axis=1)
        dC += w_off[:, None] * tl.dot(dy_i, s_in, input_precision=DOT_PREC)
        tl.store(dcs_ptr + cs_off + i, dcs, mask=offs_k < chunk_size)
        tl.store(dBC_ptrs, dC, mask=kn)


# ------------------------------------------------------------------------------------------- launchers
def _D_strides(D):
    if D is None:
        return 0, 0
    return (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))


def chunk_scan_fwd(CB, x, dtp, cs, C, S_in, chunk_size, D=None, seq_idx=None, out_dtype=None, block_m=None):
    """→ y [b, l, h, p] in ``out_dtype`` (default x.dtype). ``block_m`` overrides the row block (tests use it to
    run the multi-block paths at small chunk sizes)."""
    b, l, h, p = x.shape
    g, n = C.shape[2], C.shape[3]
    nchunks = dtp.shape[2]
    y = torch.empty(b, l, h, p, device=x.device, dtype=out_dtype or x.dtype)
    BLOCK_M, BLOCK_N = block_m or pow2_block(chunk_size), pow2_block(p)
    BLOCK_K, BLOCK_S = pow2_block(chunk_size, hi=32), pow2_block(n)
    grid = (b * nchunks * h, triton.cdiv(chunk_size, BLOCK_M), triton.cdiv(p, BLOCK_N))
    seq = seq_idx if seq_idx is not None else cs
    sD = _D_strides(D)
    with device_guard(x):
        _chunk_scan_fwd_kernel[grid](
            CB, x, dtp, cs, C, S_in, D if D is not None else cs, seq, y,
            l, h, g, p, n, chunk_size, nchunks,
            CB.stride(0), CB.stride(1), CB.stride(2), CB.stride(3),
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            cs.stride(0), cs.stride(1), cs.stride(2),
            C.stride(0), C.stride(1), C.stride(2), C.stride(3),
            S_in.stride(0), S_in.stride(1), S_in.stride(2), S_in.stride(3),
            sD[0], sD[1],
            seq.stride(0), seq.stride(1) if seq_idx is not None else 0,
            y.stride(0), y.stride(1), y.stride(2), y.stride(3),
            HAS_D=D is not None, HAS_SEQ=seq_idx is not None, DOT_PREC=dot_prec(x.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S, num_warps=warps(BLOCK_M * BLOCK_N),
        )
    return y


def chunk_scan_bwd(dy, x, dtp, cs, CB, B, C, S_in, dstates, chunk_size, D=None, seq_idx=None, block=None):
    """Returns ``(dx [x.dtype], d dt' [b,h,c,Q], d cs [b,h,c,Q] (without the state-passing term),
    dD [h] or [h, p] or None, dB_per_head [b,l,h,n], dC_per_head [b,l,h,n])`` — fp32 except dx.

    Two launches of one kernel: over blocks of source positions (dx, d dt', dB, column terms of d cs) and
    over blocks of target positions (dC, row terms of d cs). Whole headdim and dstate are one tile each.
    ``block`` overrides the position block (tests use it to run the multi-block paths at small chunk sizes).
    """
    b, l, h, p = x.shape
    g, n = C.shape[2], C.shape[3]
    nchunks = dtp.shape[2]
    BLOCK = block or pow2_block(chunk_size, hi=32)
    BLOCK_P, BLOCK_N = pow2_block(p, hi=256), pow2_block(n, hi=256)
    if BLOCK_P < p or BLOCK_N < n:
        raise ValueError(f"chunk_scan_bwd supports headdim and dstate up to 256, got {p} and {n}")
    nblocks = triton.cdiv(chunk_size, BLOCK)
    dx = torch.empty_like(x)
    ddtp = torch.empty_like(dtp)
    dcs_col, dcs_row = torch.empty_like(cs), torch.empty_like(cs)
    u_part = torch.empty(b, h, nchunks, nblocks, device=x.device, dtype=torch.float32)
    dD_part = torch.empty(b, nchunks, nblocks, h, p, device=x.device, dtype=torch.float32) if D is not None else None
    dB = torch.empty(b, l, h, n, device=x.device, dtype=torch.float32)
    dC = torch.empty_like(dB)
    seq = seq_idx if seq_idx is not None else cs
    sD = _D_strides(D)
    with device_guard(x):
        for columns, dcs, dBC in ((True, dcs_col, dB), (False, dcs_row, dC)):
            _chunk_scan_bwd_kernel[(b * nchunks * h, nblocks)](
                x, dy, dtp, cs, seq, CB, B, C, S_in, dstates, D if D is not None else cs,
                dx, ddtp, dcs, u_part, dD_part if dD_part is not None else cs, dBC,
                l, h, g, p, n, chunk_size, nchunks, nblocks,
                x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                dy.stride(0), dy.stride(1), dy.stride(2), dy.stride(3),
                cs.stride(0), cs.stride(1), cs.stride(2),
                seq.stride(0), seq.stride(1) if seq_idx is not None else 0,
                CB.stride(0), CB.stride(1), CB.stride(2), CB.stride(3),
                B.stride(0), B.stride(1), B.stride(2), B.stride(3),
                C.stride(0), C.stride(1), C.stride(2), C.stride(3),
                S_in.stride(0), S_in.stride(1), S_in.stride(2), S_in.stride(3),
                sD[0], sD[1],
                dx.stride(0), dx.stride(1), dx.stride(2), dx.stride(3),
                dBC.stride(0), dBC.stride(1), dBC.stride(2),
                COLUMNS=columns, HAS_D=D is not None, HAS_SEQ=seq_idx is not None, DOT_PREC=dot_prec(x.dtype),
                BLOCK=BLOCK, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
                num_warps=warps(BLOCK * BLOCK_N),
            )
    dcs = dcs_row + dcs_col
    dcs[..., -1] += u_part.sum(-1)  # Σ_j u_j enters at the chunk's last position (cs[Q-1] in w_state)
    dD = None
    if D is not None:
        dD = dD_part.sum((0, 1, 2))  # [h, p]
        if D.dim() == 1:
            dD = dD.sum(-1)
    return dx, ddtp, dcs, dD, dB, dC


# ------------------------------------------------------------------------------------------- reference
def chunk_scan_ref(CB, x, dtp, cs, C, S_in, chunk_size, D=None, seq_idx=None):
    """Torch form of :func:`chunk_scan_fwd` on the same intermediates (fp32 result)."""
    b, l, h, p = x.shape
    g = C.shape[2]
    nchunks = dtp.shape[2]
    Q = chunk_size
    xc = chunked(x, Q, nchunks)  # [b, c, Q, h, p]
    Cc = chunked(C, Q, nchunks).repeat_interleave(h // g, dim=3)
    CBh = CB.repeat_interleave(h // g, dim=2)  # [b, c, h, Q, Q]
    seg = cs[..., :, None] - cs[..., None, :]  # [b, h, c, i, j]
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device))
    mask = causal.expand(b, nchunks, Q, Q)
    _, same_in, _ = doc_masks(seq_idx, b, l, nchunks, Q, x.device)
    if seq_idx is not None:
        s = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, nchunks * Q - l)], 1).view(b, nchunks, Q)
        mask = mask & (s[..., :, None] == s[..., None, :])
    Lm = torch.exp(seg.masked_fill(~mask[:, None].expand_as(seg), -torch.inf))
    Lm = Lm.permute(0, 2, 1, 3, 4) * CBh  # [b, c, h, i, j]
    y_diag = torch.einsum("bchij,bhcj,bcjhp->bcihp", Lm, dtp, xc)
    y_off = torch.einsum("bcihn,bchpn,bhci->bcihp", Cc, S_in, torch.exp(cs) * same_in[:, None])
    y = (y_diag + y_off).reshape(b, nchunks * Q, h, p)[:, :l]
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    return y
