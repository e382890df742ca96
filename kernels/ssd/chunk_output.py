"""SSD steps 2 and 5: the chunk output, and the fused backward of everything inside a chunk.

Forward (``chunk_scan_fwd``), per chunk ``c``, head ``h`` (group ``g``), position ``i``:

    Y_diag[i] = Σ_{j ≤ i, doc(j) = doc(i)} CB[g, i, j] · exp(cs[i] − cs[j]) · dt'[j] · x[j]
    Y_off[i]  = [doc(i) = doc_in(c)] · exp(cs[i]) · S_in[c] · C[i]
    y[i]      = Y_diag[i] + Y_off[i] + D · x[i]

with ``cs = dA_cumsum`` (step 1), ``CB`` from step 2a and ``S_in`` from step 4.

Backward (``chunk_scan_bwd``): one program per (batch, chunk, head) holds the chunk's whole ``[Q, Q]``
decay-weighted ``CB`` tile and, given ``dy`` and ``d states`` (from the reverse state passing), produces

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

from kernels._triton_utils import device_guard, pow2_block

from .chunk_state import _chunked, _doc_masks, _dot_prec, _warps

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
def _decay(cs, offs_q, mq, seq, HAS_SEQ: tl.constexpr):
    """[Q, Q] tile exp(cs_i − cs_j) on the causal same-document mask (j ≤ i, doc_i = doc_j), 0 elsewhere.
    Recomputed where needed rather than kept live: it is cheap, registers are not."""
    m = (offs_q[None, :] <= offs_q[:, None]) & mq[:, None] & mq[None, :]
    if HAS_SEQ:
        m = m & (seq[:, None] == seq[None, :])
    return tl.where(m, tl.exp(tl.where(m, cs[:, None] - cs[None, :], 0.0)), 0.0)


@triton.jit
def _chunk_scan_bwd_kernel(
    x_ptr, dy_ptr, dtp_ptr, cs_ptr, seq_ptr, CB_ptr, B_ptr, C_ptr, S_in_ptr, dst_ptr, D_ptr,
    dx_ptr, ddtp_ptr, dcs_ptr, dD_ptr, dB_ptr, dC_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size, nchunks,
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
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = pid // (nchunks * nheads)
    pid_c = (pid // nheads) % nchunks
    pid_h = pid % nheads
    pid_g = pid_h // (nheads // ngroups)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    offs_q = tl.arange(0, BLOCK_Q)
    mq = offs_q < chunk_len
    cs_off = pid_b * stride_cs_b + pid_h * stride_cs_h + pid_c * stride_cs_c
    cs = tl.load(cs_ptr + cs_off + offs_q, mask=mq, other=0.0)
    dtp = tl.load(dtp_ptr + cs_off + offs_q, mask=mq, other=0.0)
    cs_end = tl.load(cs_ptr + cs_off + chunk_size - 1)

    # Weights shared by every term (see the module docstring).
    seq = offs_q
    w_state = tl.exp(cs_end - cs)
    w_off = tl.exp(cs)
    if HAS_SEQ:
        seq_base = seq_ptr + pid_b * stride_seq_b
        seq = tl.load(seq_base + (chunk_start + offs_q) * stride_seq_l, mask=mq, other=-1)
        seq_end = tl.load(seq_base + (chunk_start + chunk_len - 1) * stride_seq_l)
        doc_in = tl.load(seq_base + tl.maximum(chunk_start - 1, 0) * stride_seq_l)
        w_state = tl.where(seq == seq_end, w_state, 0.0)
        w_off = tl.where(seq == doc_in, w_off, 0.0)
    w_state = tl.where(mq, w_state, 0.0)
    w_off = tl.where(mq, w_off, 0.0)
    cb_ptrs = (CB_ptr + pid_b * stride_cb_b + pid_c * stride_cb_c + pid_g * stride_cb_g
               + offs_q[:, None] * stride_cb_i + offs_q[None, :])
    x_base = x_ptr + pid_b * stride_x_b + chunk_start * stride_x_l + pid_h * stride_x_h
    dy_base = dy_ptr + pid_b * stride_dy_b + chunk_start * stride_dy_l + pid_h * stride_dy_h
    dx_base = dx_ptr + pid_b * stride_dx_b + chunk_start * stride_dx_l + pid_h * stride_dx_h
    B_base = B_ptr + pid_b * stride_B_b + chunk_start * stride_B_l + pid_g * stride_B_g
    C_base = C_ptr + pid_b * stride_C_b + chunk_start * stride_C_l + pid_g * stride_C_g
    s_base = S_in_ptr + pid_b * stride_s_b + pid_c * stride_s_c + pid_h * stride_s_h
    ds_base = dst_ptr + pid_b * stride_s_b + pid_c * stride_s_c + pid_h * stride_s_h

    # Three phases, so that at most one [Q, Q] tile is live through any loop (at Q = 128 two would spill):
    # A. dy·xᵀ → dCB and the decay's share of d cs;  B. dB, dC from dCB;  C. dx, d dt' and the rest of d cs from L.
    # x and dy are read once per phase (from L2 after the first).

    # Phase A.
    dyx = tl.zeros((BLOCK_Q, BLOCK_Q), tl.float32)  # dy_i · x_j
    for p0 in range(0, headdim, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mqp = mq[:, None] & (offs_p < headdim)[None, :]
        xb = tl.load(x_base + offs_q[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=mqp, other=0.0).to(tl.float32)
        dyb = tl.load(dy_base + offs_q[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p, mask=mqp, other=0.0).to(tl.float32)
        dyx += tl.dot(dyb, tl.trans(xb), input_precision=DOT_PREC)
    dcb = dyx * _decay(cs, offs_q, mq, seq, HAS_SEQ) * dtp[None, :]  # d CB for this head (zero outside the causal same-document mask)
    t = tl.load(cb_ptrs, mask=mq[:, None] & mq[None, :], other=0.0) * dcb  # CB ∘ dCB
    # cs[i] − cs[j] in the exponent: row sums enter d cs at i, column sums leave at j.
    dcs = tl.sum(t, axis=1) - tl.sum(t, axis=0)

    # Phase B.
    w_db = w_state * dtp
    dB_base = dB_ptr + pid_b * stride_dBC_b + chunk_start * stride_dBC_l + pid_h * stride_dBC_h
    dC_base = dC_ptr + pid_b * stride_dBC_b + chunk_start * stride_dBC_l + pid_h * stride_dBC_h
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < dstate
        mqn = mq[:, None] & mn[None, :]
        Bb = tl.load(B_base + offs_q[:, None] * stride_B_l + offs_n[None, :] * stride_B_n, mask=mqn, other=0.0).to(tl.float32)
        Cb = tl.load(C_base + offs_q[:, None] * stride_C_l + offs_n[None, :] * stride_C_n, mask=mqn, other=0.0).to(tl.float32)
        dC = tl.dot(dcb, Bb, input_precision=DOT_PREC)
        dB = tl.dot(tl.trans(dcb), Cb, input_precision=DOT_PREC)
        dC_off = tl.zeros((BLOCK_Q, BLOCK_N), tl.float32)
        dB_st = tl.zeros((BLOCK_Q, BLOCK_N), tl.float32)
        for p0 in range(0, headdim, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mp = offs_p < headdim
            mqp = mq[:, None] & mp[None, :]
            xb = tl.load(x_base + offs_q[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=mqp, other=0.0).to(tl.float32)
            dyb = tl.load(dy_base + offs_q[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p, mask=mqp, other=0.0).to(tl.float32)
            s = tl.load(s_base + offs_p[:, None] * stride_s_p + offs_n[None, :], mask=mp[:, None] & mn[None, :], other=0.0)
            ds = tl.load(ds_base + offs_p[:, None] * stride_s_p + offs_n[None, :], mask=mp[:, None] & mn[None, :], other=0.0)
            dC_off += tl.dot(dyb, s, input_precision=DOT_PREC)
            dB_st += tl.dot(xb, ds, input_precision=DOT_PREC)
        dC += w_off[:, None] * dC_off
        dB += w_db[:, None] * dB_st
        tl.store(dC_base + offs_q[:, None] * stride_dBC_l + offs_n[None, :], dC, mask=mqn)
        tl.store(dB_base + offs_q[:, None] * stride_dBC_l + offs_n[None, :], dB, mask=mqn)

    # Phase C.
    L = tl.load(cb_ptrs, mask=mq[:, None] & mq[None, :], other=0.0) * _decay(cs, offs_q, mq, seq, HAS_SEQ)
    ddtp = tl.zeros((BLOCK_Q,), tl.float32)
    u = tl.zeros((BLOCK_Q,), tl.float32)  # gradient of log w_state[j] (a "− at j, + at Q−1" term of d cs)
    for p0 in range(0, headdim, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mp = offs_p < headdim
        mqp = mq[:, None] & mp[None, :]
        xb = tl.load(x_base + offs_q[:, None] * stride_x_l + offs_p[None, :] * stride_x_p, mask=mqp, other=0.0).to(tl.float32)
        dyb = tl.load(dy_base + offs_q[:, None] * stride_dy_l + offs_p[None, :] * stride_dy_p, mask=mqp, other=0.0).to(tl.float32)
        g_diag = tl.dot(tl.trans(L), dyb, input_precision=DOT_PREC)  # [j, p]
        g_state = tl.zeros((BLOCK_Q, BLOCK_P), tl.float32)  # B_j · d states[p, :]
        y_off = tl.zeros((BLOCK_Q, BLOCK_P), tl.float32)  # C_i · S_in[p, :]
        for n0 in range(0, dstate, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mn = offs_n < dstate
            Bb = tl.load(B_base + offs_q[:, None] * stride_B_l + offs_n[None, :] * stride_B_n,
                         mask=mq[:, None] & mn[None, :], other=0.0).to(tl.float32)
            Cb = tl.load(C_base + offs_q[:, None] * stride_C_l + offs_n[None, :] * stride_C_n,
                         mask=mq[:, None] & mn[None, :], other=0.0).to(tl.float32)
            sT = tl.load(s_base + offs_p[None, :] * stride_s_p + offs_n[:, None], mask=mp[None, :] & mn[:, None], other=0.0)
            dsT = tl.load(ds_base + offs_p[None, :] * stride_s_p + offs_n[:, None], mask=mp[None, :] & mn[:, None], other=0.0)
            g_state += tl.dot(Bb, dsT, input_precision=DOT_PREC)
            y_off += tl.dot(Cb, sT, input_precision=DOT_PREC)
        G = g_diag + w_state[:, None] * g_state
        dx = dtp[:, None] * G
        if HAS_D:
            Dv = tl.load(D_ptr + pid_h * stride_D_h + offs_p * stride_D_p, mask=mp, other=0.0).to(tl.float32)
            dx += Dv[None, :] * dyb
            # dD partial for this chunk (the caller sums over batch and chunks).
            tl.store(dD_ptr + (pid_b * nchunks + pid_c) * nheads * headdim + pid_h * headdim + offs_p,
                     tl.sum(dyb * xb, axis=0), mask=mp)
        tl.store(dx_base + offs_q[:, None] * stride_dx_l + offs_p[None, :] * stride_dx_p, dx, mask=mqp)
        ddtp += tl.sum(xb * G, axis=1)
        dcs += w_off * tl.sum(dyb * y_off, axis=1)  # Y_off = w_off · C·S_in: d cs_i += dy_i · Y_off_i
        u += dtp * w_state * tl.sum(xb * g_state, axis=1)
    dcs += tl.where(offs_q == chunk_size - 1, tl.sum(u, axis=0), 0.0) - u
    mqs = offs_q < chunk_size
    tl.store(dcs_ptr + cs_off + offs_q, dcs, mask=mqs)
    tl.store(ddtp_ptr + cs_off + offs_q, ddtp, mask=mqs)


# ------------------------------------------------------------------------------------------- launchers
def _D_strides(D):
    if D is None:
        return 0, 0
    return (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))


def chunk_scan_fwd(CB, x, dtp, cs, C, S_in, chunk_size, D=None, seq_idx=None, out_dtype=None):
    """→ y [b, l, h, p] in ``out_dtype`` (default x.dtype)."""
    b, l, h, p = x.shape
    g, n = C.shape[2], C.shape[3]
    nchunks = dtp.shape[2]
    y = torch.empty(b, l, h, p, device=x.device, dtype=out_dtype or x.dtype)
    BLOCK_M, BLOCK_N = pow2_block(chunk_size), pow2_block(p)
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
            HAS_D=D is not None, HAS_SEQ=seq_idx is not None, DOT_PREC=_dot_prec(x.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S, num_warps=_warps(BLOCK_M * BLOCK_N),
        )
    return y


def chunk_scan_bwd(dy, x, dtp, cs, CB, B, C, S_in, dstates, chunk_size, D=None, seq_idx=None):
    """Returns ``(dx [x.dtype], d dt' [b,h,c,Q], d cs [b,h,c,Q] (without the state-passing term),
    dD [h] or [h, p] or None, dB_per_head [b,l,h,n], dC_per_head [b,l,h,n])`` — fp32 except dx."""
    b, l, h, p = x.shape
    g, n = C.shape[2], C.shape[3]
    nchunks = dtp.shape[2]
    dx = torch.empty_like(x)
    ddtp = torch.empty_like(dtp)
    dcs = torch.empty_like(cs)
    dD_part = torch.empty(b, nchunks, h, p, device=x.device, dtype=torch.float32) if D is not None else None
    dB = torch.empty(b, l, h, n, device=x.device, dtype=torch.float32)
    dC = torch.empty_like(dB)
    BLOCK_Q = pow2_block(chunk_size, hi=256)
    BLOCK_P, BLOCK_N = pow2_block(p, hi=32), pow2_block(n, hi=32)
    seq = seq_idx if seq_idx is not None else cs
    sD = _D_strides(D)
    with device_guard(x):
        _chunk_scan_bwd_kernel[(b * nchunks * h,)](
            x, dy, dtp, cs, seq, CB, B, C, S_in, dstates, D if D is not None else cs,
            dx, ddtp, dcs, dD_part if dD_part is not None else cs, dB, dC,
            l, h, g, p, n, chunk_size, nchunks,
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
            dB.stride(0), dB.stride(1), dB.stride(2),
            HAS_D=D is not None, HAS_SEQ=seq_idx is not None, DOT_PREC=_dot_prec(x.dtype),
            BLOCK_Q=BLOCK_Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
            num_warps=_warps(BLOCK_Q * BLOCK_Q, per_warp=1024),
        )
    dD = None
    if D is not None:
        dD = dD_part.sum((0, 1))  # [h, p]
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
    xc = _chunked(x, Q, nchunks)  # [b, c, Q, h, p]
    Cc = _chunked(C, Q, nchunks).repeat_interleave(h // g, dim=3)
    CBh = CB.repeat_interleave(h // g, dim=2)  # [b, c, h, Q, Q]
    seg = cs[..., :, None] - cs[..., None, :]  # [b, h, c, i, j]
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device))
    mask = causal.expand(b, nchunks, Q, Q)
    _, same_in, _ = _doc_masks(seq_idx, b, l, nchunks, Q, x.device)
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
