"""SSD step 1: dt processing and the per-chunk cumulative decay ``dA_cumsum``.

For chunk ``c`` and position ``q`` (token ``t = c·Q + q``):

    dt'[t]          = clamp(softplus?(dt[t] + dt_bias), dt_limit)      (0 on padding, t ≥ l)
    dA_cumsum[c, q] = Σ_{k ≤ q} A · dt'[c·Q + k]

Outputs are fp32 in the chunked layout ``[b, h, c, Q]`` every later step reads. Padding positions get
``dt' = 0``: no input and decay ``exp(0) = 1``, exactly as the reference pads the sequence.

Backward: given ``d dt'`` and ``d dA_cumsum`` (both ``[b, h, c, Q]``), ``d dA = reverse cumsum(d dA_cumsum)``,
``d dt' += A · d dA``, then back through clamp and softplus to ``d dt``; per-chunk partial sums for
``dA`` and ``d dt_bias`` are returned and reduced by the caller.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tandem.kernels.triton_utils import device_guard

from .reference import process_dt

__all__ = ["chunk_cumsum_fwd", "chunk_cumsum_bwd", "chunk_cumsum_ref"]


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _process_dt(dt, bias, DT_SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, dt_min, dt_max):
    """Returns (dt', d dt'/d dt). Softplus threshold 20 as in ``F.softplus``; clamp gradient as ``torch.clamp``
    (passes where lo ≤ v ≤ hi)."""
    v = dt + bias
    grad = tl.full(v.shape, 1.0, tl.float32)
    if DT_SOFTPLUS:
        ev = tl.exp(tl.minimum(v, 20.0))
        grad = tl.where(v <= 20.0, ev / (1.0 + ev), 1.0)
        # log(1 + e) loses e's digits for tiny e (no log1p in tl); its series is exact to fp32 there.
        sp = tl.where(ev < 1e-4, ev - 0.5 * ev * ev, tl.log(1.0 + ev))
        v = tl.where(v <= 20.0, sp, v)
    if HAS_LIMIT:
        grad = tl.where((v >= dt_min) & (v <= dt_max), grad, 0.0)
        v = tl.minimum(tl.maximum(v, dt_min), dt_max)
    return v, grad


@triton.jit
def _chunk_cumsum_fwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dtp_ptr, cs_ptr,
    seqlen, nheads, chunk_size, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_o_b, stride_o_h, stride_o_c,
    HAS_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid_b, pid_c, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, BLOCK_Q)
    t = pid_c * chunk_size + offs_q
    mask_h = offs_h < nheads
    valid = (offs_q < chunk_size) & (t < seqlen)
    m2 = mask_h[:, None] & valid[None, :]
    dt = tl.load(dt_ptr + pid_b * stride_dt_b + t[None, :] * stride_dt_l + offs_h[:, None] * stride_dt_h,
                 mask=m2, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_H,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    dtp, _ = _process_dt(dt, bias[:, None], DT_SOFTPLUS, HAS_LIMIT, dt_min, dt_max)
    dtp = tl.where(m2, dtp, 0.0)  # padding contributes nothing (softplus(bias) would not be 0)
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    cs = tl.cumsum(dtp * A[:, None], axis=1)
    o = pid_b * stride_o_b + offs_h[:, None] * stride_o_h + pid_c * stride_o_c + offs_q[None, :]
    mo = mask_h[:, None] & (offs_q < chunk_size)[None, :]
    tl.store(dtp_ptr + o, dtp, mask=mo)
    tl.store(cs_ptr + o, cs, mask=mo)


@triton.jit
def _chunk_cumsum_bwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dtp_ptr, ddtp_ptr, dcs_ptr,
    ddt_ptr, dA_part_ptr, dbias_part_ptr,
    seqlen, nheads, chunk_size, nchunks, dt_min, dt_max,
    stride_dt_b, stride_dt_l, stride_dt_h,
    stride_o_b, stride_o_h, stride_o_c,
    stride_ddt_b, stride_ddt_l, stride_ddt_h,
    HAS_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid_b, pid_c, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, BLOCK_Q)
    t = pid_c * chunk_size + offs_q
    mask_h = offs_h < nheads
    valid = (offs_q < chunk_size) & (t < seqlen)
    m2 = mask_h[:, None] & valid[None, :]
    mo = mask_h[:, None] & (offs_q < chunk_size)[None, :]
    o = pid_b * stride_o_b + offs_h[:, None] * stride_o_h + pid_c * stride_o_c + offs_q[None, :]
    dcs = tl.load(dcs_ptr + o, mask=mo, other=0.0)
    ddtp = tl.load(ddtp_ptr + o, mask=mo, other=0.0)
    dtp = tl.load(dtp_ptr + o, mask=mo, other=0.0)
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    # dA_cumsum[q] = Σ_{k≤q} dA[k]  ⇒  d dA[k] = Σ_{q≥k} d dA_cumsum[q] (a reverse cumulative sum).
    ddA = tl.sum(dcs, axis=1)[:, None] - tl.cumsum(dcs, axis=1) + dcs
    ddA = tl.where(mo, ddA, 0.0)
    ddtp = ddtp + ddA * A[:, None]
    dt = tl.load(dt_ptr + pid_b * stride_dt_b + t[None, :] * stride_dt_l + offs_h[:, None] * stride_dt_h,
                 mask=m2, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_H,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    _, g = _process_dt(dt, bias[:, None], DT_SOFTPLUS, HAS_LIMIT, dt_min, dt_max)
    ddt = tl.where(m2, ddtp * g, 0.0)
    tl.store(ddt_ptr + pid_b * stride_ddt_b + t[None, :] * stride_ddt_l + offs_h[:, None] * stride_ddt_h,
             ddt, mask=m2)
    part = (pid_b * nchunks + pid_c) * nheads + offs_h  # partial sums [b, c, h], reduced by the caller
    tl.store(dA_part_ptr + part, tl.sum(ddA * dtp, axis=1), mask=mask_h)
    tl.store(dbias_part_ptr + part, tl.sum(ddt, axis=1), mask=mask_h)


# ------------------------------------------------------------------------------------------- launchers
def _limit_args(dt_limit):
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    has_limit = lo > 0.0 or hi < math.inf
    # The kernel never reads these when has_limit is False; finite stand-ins keep the launch arguments simple.
    return has_limit, lo, (hi if hi < math.inf else 3.0e38)


def chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    """dt [b, l, h] → (dt' [b, h, c, Q] fp32, dA_cumsum [b, h, c, Q] fp32)."""
    b, l, h = dt.shape
    Q = chunk_size
    nchunks = triton.cdiv(l, Q)
    dtp = torch.empty(b, h, nchunks, Q, device=dt.device, dtype=torch.float32)
    cs = torch.empty_like(dtp)
    has_limit, lo, hi = _limit_args(dt_limit)
    BLOCK_H = min(8, triton.next_power_of_2(h))
    grid = (b, nchunks, triton.cdiv(h, BLOCK_H))
    with device_guard(dt):
        _chunk_cumsum_fwd_kernel[grid](
            dt, A, dt_bias if dt_bias is not None else A, dtp, cs,
            l, h, Q, lo, hi,
            dt.stride(0), dt.stride(1), dt.stride(2),
            dtp.stride(0), dtp.stride(1), dtp.stride(2),
            HAS_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit,
            BLOCK_H=BLOCK_H, BLOCK_Q=triton.next_power_of_2(Q),
        )
    return dtp, cs


def chunk_cumsum_bwd(ddtp, dcs, dt, A, dtp, chunk_size, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, math.inf)):
    """Returns (d dt [b, l, h] fp32, dA [h] fp32, d dt_bias [h] fp32 or None)."""
    b, l, h = dt.shape
    Q = chunk_size
    nchunks = triton.cdiv(l, Q)
    ddt = torch.empty(b, l, h, device=dt.device, dtype=torch.float32)
    dA_part = torch.empty(b, nchunks, h, device=dt.device, dtype=torch.float32)
    dbias_part = torch.empty_like(dA_part)
    has_limit, lo, hi = _limit_args(dt_limit)
    BLOCK_H = min(8, triton.next_power_of_2(h))
    grid = (b, nchunks, triton.cdiv(h, BLOCK_H))
    ddtp, dcs = ddtp.contiguous(), dcs.contiguous()
    with device_guard(dt):
        _chunk_cumsum_bwd_kernel[grid](
            dt, A, dt_bias if dt_bias is not None else A, dtp, ddtp, dcs,
            ddt, dA_part, dbias_part,
            l, h, Q, nchunks, lo, hi,
            dt.stride(0), dt.stride(1), dt.stride(2),
            dtp.stride(0), dtp.stride(1), dtp.stride(2),
            ddt.stride(0), ddt.stride(1), ddt.stride(2),
            HAS_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit,
            BLOCK_H=BLOCK_H, BLOCK_Q=triton.next_power_of_2(Q),
        )
    # The cross-chunk reductions are tiny ([b, c, h] → [h]) and stay in torch.
    return ddt, dA_part.sum((0, 1)), (dbias_part.sum((0, 1)) if dt_bias is not None else None)


# ------------------------------------------------------------------------------------------- reference
def chunk_cumsum_ref(dt, A, chunk_size, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    """Torch form of :func:`chunk_cumsum_fwd` (differentiable), the same maths as step 1 of the reference."""
    b, l, h = dt.shape
    Q = chunk_size
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    pad = (-l) % Q
    dtp = torch.nn.functional.pad(dtp, (0, 0, 0, pad))
    dtp = dtp.view(b, -1, Q, h).permute(0, 3, 1, 2)  # [b, h, c, Q]
    return dtp, torch.cumsum(dtp * A.float()[None, :, None, None], dim=-1)
