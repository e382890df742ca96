"""SSD step 2a: the chunk-local ``C · Bᵀ`` per group, ``CB[b, c, g, i, j] = Σ_n C[c·Q+i, g, n] · B[c·Q+j, g, n]``.

Computed once per *group* (not per head), since all heads of a group share B and C. fp32 output
``[b, c, g, Q, Q]``; rows/columns past the end of the sequence are 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton_utils import device_guard, pow2_block

from .chunk_state import chunked, dot_prec, warps

__all__ = ["bmm_chunk_fwd", "bmm_chunk_ref"]


@triton.jit
def _bmm_chunk_kernel(
    C_ptr, B_ptr, out_ptr,
    seqlen, ngroups, dstate, chunk_size, nchunks,
    stride_b, stride_l, stride_g, stride_n,
    stride_cb_b, stride_cb_l, stride_cb_g, stride_cb_n,
    stride_o_b, stride_o_c, stride_o_g, stride_o_i,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = pid // (nchunks * ngroups)
    pid_c = (pid // ngroups) % nchunks
    pid_g = pid % ngroups
    offs_i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = pid_c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - chunk_start)
    c_base = C_ptr + pid_b * stride_b + chunk_start * stride_l + pid_g * stride_g
    b_base = B_ptr + pid_b * stride_cb_b + chunk_start * stride_cb_l + pid_g * stride_cb_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, dstate, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < dstate
        c = tl.load(c_base + offs_i[:, None] * stride_l + offs_k[None, :] * stride_n,
                    mask=(offs_i < chunk_len)[:, None] & mk[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_base + offs_j[None, :] * stride_cb_l + offs_k[:, None] * stride_cb_n,
                     mask=(offs_j < chunk_len)[None, :] & mk[:, None], other=0.0).to(tl.float32)
        acc += tl.dot(c, bt, input_precision=DOT_PREC)
    o = out_ptr + pid_b * stride_o_b + pid_c * stride_o_c + pid_g * stride_o_g
    tl.store(o + offs_i[:, None] * stride_o_i + offs_j[None, :], acc,
             mask=(offs_i < chunk_size)[:, None] & (offs_j < chunk_size)[None, :])


def bmm_chunk_fwd(C, B, chunk_size):
    """C, B [b, l, g, n] → CB [b, c, g, Q, Q] fp32."""
    b, l, g, n = C.shape
    Q = chunk_size
    nchunks = triton.cdiv(l, Q)
    out = torch.empty(b, nchunks, g, Q, Q, device=C.device, dtype=torch.float32)
    BLOCK_M = BLOCK_N = pow2_block(Q)
    BLOCK_K = pow2_block(n)
    grid = (b * nchunks * g, triton.cdiv(Q, BLOCK_M), triton.cdiv(Q, BLOCK_N))
    with device_guard(C):
        _bmm_chunk_kernel[grid](
            C, B, out, l, g, n, Q, nchunks,
            C.stride(0), C.stride(1), C.stride(2), C.stride(3),
            B.stride(0), B.stride(1), B.stride(2), B.stride(3),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            DOT_PREC=dot_prec(C.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            num_warps=warps(BLOCK_M * BLOCK_N),
        )
    return out


def bmm_chunk_ref(C, B, chunk_size):
    nchunks = -(-C.shape[1] // chunk_size)
    return torch.einsum("bcign,bcjgn->bcgij", chunked(C, chunk_size, nchunks), chunked(B, chunk_size, nchunks))
