"""Causal depthwise conv1d (+ bias, + SiLU) with packed-document resets, on Triton: kernels, launchers,
autograd Function and public function. Same maths and arguments as :func:`tandem.kernels.conv1d.reference.causal_conv1d_ref`:

    pre[t, d] = bias[d] + Σ_{k<K} w[d, k] · x̃[t − (K−1) + k, d] · [doc(t − (K−1) + k) = doc(t)]
    out[t, d] = act(pre[t, d])

where ``x̃`` is ``x`` preceded by ``initial_states`` (positions −(K−1)…−1, which belong to token 0's document).

Forward: one Triton kernel (``_conv_fwd_kernel``). Backward: ``_conv_bwd_dpre_kernel`` recomputes ``pre``, forms
``d pre = d out · act'(pre)`` and per-block partial sums of ``d weight`` and ``d bias``;
``_conv_bwd_dx_kernel`` scatters ``d pre`` back through the taps into ``dx`` and ``d initial_states``.
In torch: the sum of the ``d weight`` / ``d bias`` partials over batch and sequence blocks, and the
returned final conv states (a slice of the last K−1 inputs, differentiated by autograd).
Accumulation is fp32; outputs are in ``x.dtype``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton_utils import check_launchable, device_guard

from .reference import check_conv1d_args, check_conv1d_update_args

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton"]


@triton.jit
def _tap(x_ptr, init_ptr, seq_ptr, pid_b, pos, offs_d, mt, md, seq_t,
         stride_x_b, stride_x_l, stride_x_d, stride_i_b, stride_i_d, stride_i_k, stride_s_b, stride_s_l,
         K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """x̃[pos, d] for a [BL] vector of positions (pos may be negative: the initial state), 0 across documents."""
    in_x = pos >= 0
    m = mt[:, None] & md[None, :]
    v = tl.load(x_ptr + pid_b * stride_x_b + pos[:, None] * stride_x_l + offs_d[None, :] * stride_x_d,
                mask=m & in_x[:, None], other=0.0).to(tl.float32)
    if HAS_INIT:
        iv = tl.load(init_ptr + pid_b * stride_i_b + offs_d[None, :] * stride_i_d + (pos + K - 1)[:, None] * stride_i_k,
                     mask=m & (pos < 0)[:, None], other=0.0).to(tl.float32)
        v = tl.where(in_x[:, None], v, iv)
    if HAS_SEQ:
        seq_pos = tl.load(seq_ptr + pid_b * stride_s_b + tl.maximum(pos, 0) * stride_s_l, mask=mt, other=-1)
        v = tl.where((seq_pos == seq_t)[:, None], v, 0.0)
    return v


@triton.jit
def _conv_pre(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, pid_b, offs_t, offs_d, mt, md, seq_t,
              stride_x_b, stride_x_l, stride_x_d, stride_w_d, stride_w_k,
              stride_i_b, stride_i_d, stride_i_k, stride_s_b, stride_s_l,
              K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    acc = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w = tl.load(w_ptr + offs_d * stride_w_d + k * stride_w_k, mask=md, other=0.0).to(tl.float32)
        v = _tap(x_ptr, init_ptr, seq_ptr, pid_b, offs_t - (K - 1) + k, offs_d, mt, md, seq_t,
                 stride_x_b, stride_x_l, stride_x_d, stride_i_b, stride_i_d, stride_i_k, stride_s_b, stride_s_l,
                 K, HAS_INIT, HAS_SEQ)
        acc += w[None, :] * v
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, out_ptr,
    seqlen, dim,
    stride_x_b, stride_x_l, stride_x_d, stride_w_d, stride_w_k,
    stride_i_b, stride_i_d, stride_i_k, stride_s_b, stride_s_l,
    stride_o_b, stride_o_l, stride_o_d,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (offs_t < seqlen)[:, None] & (offs_d < dim)[None, :]
    seq_t = offs_t
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + pid_b * stride_s_b + offs_t * stride_s_l, mask=offs_t < seqlen, other=-2)
    pre = _conv_pre(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, pid_b, offs_t, offs_d, offs_t < seqlen, offs_d < dim, seq_t,
                    stride_x_b, stride_x_l, stride_x_d, stride_w_d, stride_w_k,
                    stride_i_b, stride_i_d, stride_i_k, stride_s_b, stride_s_l,
                    K, BLOCK_L, BLOCK_D, HAS_BIAS, HAS_INIT, HAS_SEQ)
    if SILU:
        pre = pre * tl.sigmoid(pre)
    tl.store(out_ptr + pid_b * stride_o_b + offs_t[:, None] * stride_o_l + offs_d[None, :] * stride_o_d, pre, mask=m)


@triton.jit
def _conv_bwd_dpre_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dout_ptr, dpre_ptr, dw_part_ptr, db_part_ptr,
    seqlen, dim, nblocks_l,
    stride_x_b, stride_x_l, stride_x_d, stride_w_d, stride_w_k,
    stride_i_b, stride_i_d, stride_i_k, stride_s_b, stride_s_l,
    stride_do_b, stride_do_l, stride_do_d,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b, pid_l = tl.program_id(0), tl.program_id(1)
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < dim
    m = (offs_t < seqlen)[:, None] & md[None, :]
    seq_t = offs_t
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + pid_b * stride_s_b + offs_t * stride_s_l, mask=offs_t < seqlen, other=-2)
    dpre = tl.load(dout_ptr + pid_b * stride_do_b + offs_t[:, None] * stride_do_l + offs_d[None, :] * stride_do_d,
                   mask=m, other=0.0).to(tl.float32)
    if SILU:
        pre = _conv_pre(x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, pid_b, offs_t, offs_d, offs_t < seqlen, offs_d < dim, seq_t,
                        stride_x_b, stride_x_l, stride_x_d, stride_w_d, stride_w_k,
                        stride_i_b, stride_i_d, stride_i_k, stride_s_b, stride_s_l,
                        K, BLOCK_L, BLOCK_D, HAS_BIAS, HAS_INIT, HAS_SEQ)
        sg = tl.sigmoid(pre)
        dpre = dpre * sg * (1.0 + pre * (1.0 - sg))  # d/dv [v·σ(v)]
    dpre = tl.where(m, dpre, 0.0)
    tl.store(dpre_ptr + (pid_b * seqlen + offs_t[:, None]) * dim + offs_d[None, :], dpre, mask=m)
    part = (pid_b * nblocks_l + pid_l) * dim + offs_d  # partials [b, blocks_l, d(, K)], summed by the caller
    if HAS_BIAS:
        tl.store(db_part_ptr + part, tl.sum(dpre, axis=0), mask=md)
    for k in tl.static_range(K):
        v = _tap(x_ptr, init_ptr, seq_ptr, pid_b, offs_t - (K - 1) + k, offs_d, offs_t < seqlen, offs_d < dim, seq_t,
                 stride_x_b, stride_x_l, stride_x_d, stride_i_b, stride_i_d, stride_i_k, stride_s_b, stride_s_l,
                 K, HAS_INIT, HAS_SEQ)
        tl.store(dw_part_ptr + part * K + k, tl.sum(dpre * v, axis=0), mask=md)


@triton.jit
def _conv_bwd_dx_kernel(
    dpre_ptr, w_ptr, seq_ptr, dx_ptr, dinit_ptr,
    seqlen, dim,
    stride_w_d, stride_w_k, stride_s_b, stride_s_l,
    stride_dx_b, stride_dx_l, stride_dx_d, stride_di_b, stride_di_d, stride_di_k,
    K: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Input positions s run over −(K−1) … l−1: the negative ones are the initial state's.
    pid_b = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L) - (K - 1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < dim
    ms = offs_s < seqlen
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + pid_b * stride_s_b + tl.maximum(offs_s, 0) * stride_s_l, mask=ms, other=-1)
    acc = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    for k in tl.static_range(K):
        t = offs_s + (K - 1) - k  # the output that reads input s through tap k
        mt = (t >= 0) & (t < seqlen) & ms
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + pid_b * stride_s_b + t * stride_s_l, mask=mt, other=-2)
            mt = mt & (seq_t == seq_s)
        dp = tl.load(dpre_ptr + (pid_b * seqlen + t[:, None]) * dim + offs_d[None, :],
                     mask=mt[:, None] & md[None, :], other=0.0)
        w = tl.load(w_ptr + offs_d * stride_w_d + k * stride_w_k, mask=md, other=0.0).to(tl.float32)
        acc += w[None, :] * dp
    tl.store(dx_ptr + pid_b * stride_dx_b + offs_s[:, None] * stride_dx_l + offs_d[None, :] * stride_dx_d, acc,
             mask=((offs_s >= 0) & ms)[:, None] & md[None, :])
    if HAS_INIT:
        tl.store(dinit_ptr + pid_b * stride_di_b + offs_d[None, :] * stride_di_d + (offs_s + K - 1)[:, None] * stride_di_k,
                 acc, mask=(offs_s < 0)[:, None] & md[None, :])


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr, new_state_ptr,
    dim,
    stride_x_b, stride_x_d, stride_s_b, stride_s_d, stride_s_k, stride_w_d, stride_w_k,
    stride_o_b, stride_o_d, stride_n_b, stride_n_d, stride_n_k,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One decoding step: window = [conv_state (K−1 inputs), x]; out = act(bias + Σ_k w[:, k] window[:, k]);
    the new state is the window's last K−1 inputs."""
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < dim
    acc = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        if k < K - 1:
            v = tl.load(state_ptr + pid_b * stride_s_b + offs_d * stride_s_d + k * stride_s_k, mask=md, other=0.0)
        else:
            v = tl.load(x_ptr + pid_b * stride_x_b + offs_d * stride_x_d, mask=md, other=0.0)
        if k > 0:
            tl.store(new_state_ptr + pid_b * stride_n_b + offs_d * stride_n_d + (k - 1) * stride_n_k, v, mask=md)
        acc += tl.load(w_ptr + offs_d * stride_w_d + k * stride_w_k, mask=md, other=0.0).to(tl.float32) * v.to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_b * stride_o_b + offs_d * stride_o_d, acc, mask=md)


# ------------------------------------------------------------------------------------------- launchers
def _blocks(l, d):
    return min(32, triton.next_power_of_2(max(l, 1))), min(64, triton.next_power_of_2(d))


def _warps(BL, BD):
    # Every tap's loads (and their 64-bit addresses) are in flight at once: 8 warps on a full 32×64 tile keep
    # the backward kernel clear of register spills (bench/compile_kernels.py shows REG / STACK per kernel).
    return 8 if BL * BD >= 2048 else 4


def _strides_or_zero(t, n):
    return tuple(t.stride()) if t is not None else (0,) * n


def _conv_fwd(x, weight, bias, seq_idx, init, silu):
    b, l, d = x.shape
    K = weight.shape[1]
    out = torch.empty_like(x)
    BL, BD = _blocks(l, d)
    with device_guard(x):
        _conv_fwd_kernel[(b, triton.cdiv(l, BL), triton.cdiv(d, BD))](
            x, weight, bias if bias is not None else weight, init if init is not None else x,
            seq_idx if seq_idx is not None else x, out,
            l, d, *x.stride(), *weight.stride(), *_strides_or_zero(init, 3), *_strides_or_zero(seq_idx, 2),
            *out.stride(),
            K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, HAS_SEQ=seq_idx is not None, SILU=silu,
            BLOCK_L=BL, BLOCK_D=BD, num_warps=_warps(BL, BD),
        )
    return out


def _conv_bwd(dout, x, weight, bias, seq_idx, init, silu):
    b, l, d = x.shape
    K = weight.shape[1]
    BL, BD = _blocks(l, d)
    nbl = triton.cdiv(l, BL)
    dpre = torch.empty(b, l, d, device=x.device, dtype=torch.float32)
    dw_part = torch.empty(b, nbl, d, K, device=x.device, dtype=torch.float32)
    db_part = torch.empty(b, nbl, d, device=x.device, dtype=torch.float32) if bias is not None else None
    with device_guard(x):
        _conv_bwd_dpre_kernel[(b, nbl, triton.cdiv(d, BD))](
            x, weight, bias if bias is not None else weight, init if init is not None else x,
            seq_idx if seq_idx is not None else x, dout, dpre, dw_part, db_part if db_part is not None else dw_part,
            l, d, nbl, *x.stride(), *weight.stride(), *_strides_or_zero(init, 3), *_strides_or_zero(seq_idx, 2),
            *dout.stride(),
            K=K, HAS_BIAS=bias is not None, HAS_INIT=init is not None, HAS_SEQ=seq_idx is not None, SILU=silu,
            BLOCK_L=BL, BLOCK_D=BD, num_warps=_warps(BL, BD),
        )
        dx = torch.empty_like(x)
        dinit = torch.empty(b, d, K - 1, device=x.device, dtype=torch.float32) if init is not None else None
        _conv_bwd_dx_kernel[(b, triton.cdiv(l + K - 1, BL), triton.cdiv(d, BD))](
            dpre, weight, seq_idx if seq_idx is not None else x, dx, dinit if dinit is not None else dx,
            l, d, *weight.stride(), *_strides_or_zero(seq_idx, 2), *dx.stride(), *_strides_or_zero(dinit, 3),
            K=K, HAS_INIT=init is not None, HAS_SEQ=seq_idx is not None, BLOCK_L=BL, BLOCK_D=BD,
            num_warps=_warps(BL, BD),
        )
    dw = dw_part.sum((0, 1))
    db = db_part.sum((0, 1)) if db_part is not None else None
    return dx, dw, db, dinit


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, seq_idx, silu):
        ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
        ctx.silu = silu
        return _conv_fwd(x, weight, bias, seq_idx, initial_states, silu)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, init, seq_idx = ctx.saved_tensors
        dx, dw, db, dinit = _conv_bwd(dout, x, weight, bias, seq_idx, init, ctx.silu)
        return (dx, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else None,
                dinit.to(init.dtype) if init is not None else None, None, None)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    activation: str | None = None,
    return_final_states: bool = False,
):
    """Same arguments and results as :func:`tandem.kernels.conv1d.reference.causal_conv1d_ref` (x [b, l, d], weight [d, K])."""
    b, l, d, K = check_conv1d_args(x, weight, bias, seq_idx, initial_states, activation)
    check_launchable("causal_conv1d(impl='triton')", x, weight, bias, seq_idx, initial_states)
    out = _CausalConv1d.apply(x, weight, bias, initial_states, seq_idx, activation is not None)
    if not return_final_states:
        return out
    # The decoder's conv window: the last K−1 inputs (reaching into the initial state when l < K−1).
    prefix = initial_states if initial_states is not None else x.new_zeros(b, d, K - 1)
    tail = torch.cat([prefix.to(x.dtype), x[:, max(0, l - (K - 1)):].transpose(1, 2)], dim=-1)
    return out, tail[:, :, tail.shape[-1] - (K - 1):]


def causal_conv1d_update_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
):
    """Same arguments and results as :func:`tandem.kernels.conv1d.reference.causal_conv1d_update_ref`: x [b, d],
    conv_state [b, d, K-1] → ``(out [b, d], new_conv_state [b, d, K-1])``, the state not modified in place.

    A decode-time op: forward only. With autograd recording and an input that requires grad it raises rather
    than return a result that silently has no gradient (use ``impl="torch"`` for that).
    """
    b, d, K = check_conv1d_update_args(x, conv_state, weight, bias, activation)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, conv_state, weight, bias)):
        raise ValueError("causal_conv1d_update(impl='triton') has no backward; call it under torch.no_grad() "
                         "or use impl='torch'")
    check_launchable("causal_conv1d_update(impl='triton')", x, conv_state, weight, bias)
    out = torch.empty_like(x)
    new_state = torch.empty_like(conv_state)
    BD = min(256, triton.next_power_of_2(d))
    with device_guard(x):
        _conv_update_kernel[(b, triton.cdiv(d, BD))](
            x, conv_state, weight, bias if bias is not None else weight, out, new_state, d,
            *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(), *new_state.stride(),
            K=K, HAS_BIAS=bias is not None, SILU=activation is not None, BLOCK_D=BD,
        )
    return out, new_state
