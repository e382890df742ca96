"""The fast pure-torch causal conv1d: the model's CPU path, equal to :func:`~tandem.kernels.conv1d.reference.causal_conv1d_ref`.

The reference transposes the channels-last input to ``[b, d, l]``, concatenates the prefix and runs
``F.conv1d``; autograd then pays for the transposes and the ``cat`` again, and applies SiLU's backward
out of layout. Here (:class:`_CausalConv1dFn`) everything stays channels-last ``[b, l, d]``: the prefix and
the input are written once into a padded buffer, the ``K`` taps are ``K`` fused multiply-adds of shifted
views of it, and the backward is written by hand: SiLU's derivative from the saved pre-activation in one
pass, then ``K`` multiply-adds for the input gradient and ``K`` products reduced over (batch, time) for the
weight gradient. With ``seq_idx`` a tap reads a token only within the output token's document (the mask is
applied to the tap's weight, so the padded buffer stays shared). Computes in the weight's dtype, or fp32
for half inputs, like the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import check_conv1d_args, compute_dtype

__all__ = ["causal_conv1d_fast"]


def _tap_masks(seq_idx: torch.Tensor | None, K: int, l: int):
    """``masks[i]`` [b, l, 1] bool: tap ``i`` of token ``t`` (input ``t − (K−1) + i``) is in ``t``'s document."""
    if seq_idx is None:
        return None
    b = seq_idx.shape[0]
    seq_p = torch.cat([seq_idx[:, :1].expand(b, K - 1), seq_idx], dim=1)  # the prefix belongs to token 0's doc
    return [(seq_p[:, i: i + l] == seq_idx)[..., None] for i in range(K - 1)]


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, prefix, seq_idx, silu: bool, cd):
        b, l, d = x.shape
        K = weight.shape[1]
        xp = x.new_empty(b, l + K - 1, d, dtype=cd)
        xp[:, : K - 1] = prefix
        xp[:, K - 1:] = x
        wt = weight.to(cd).t().contiguous()  # [K, d]
        masks = _tap_masks(seq_idx, K, l)
        pre = xp[:, K - 1:] * wt[K - 1]  # the last tap reads token t itself
        for i in range(K - 1):
            pre.addcmul_(xp[:, i: i + l], wt[i] if masks is None else wt[i] * masks[i])
        if bias is not None:
            pre.add_(bias.to(cd))
        out = F.silu(pre) if silu else pre
        ctx.save_for_backward(xp, wt, pre, seq_idx)
        ctx.silu, ctx.has_bias, ctx.x_dtype = silu, bias is not None, x.dtype
        ctx.weight_dtype, ctx.prefix_dtype = weight.dtype, prefix.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        xp, wt, pre, seq_idx = ctx.saved_tensors
        K, d = wt.shape
        b, l = pre.shape[:2]
        dpre = dout.to(pre.dtype)
        if ctx.silu:
            dpre = torch.ops.aten.silu_backward(dpre, pre)  # one fused pass: dout · d silu / d pre
        masks = _tap_masks(seq_idx, K, l)
        dbias = dpre.sum((0, 1)).to(ctx.weight_dtype) if ctx.has_bias else None
        dw = torch.empty(K, d, dtype=pre.dtype, device=pre.device)
        dxp = torch.empty_like(xp)
        dxp[:, : K - 1] = 0
        dxp[:, K - 1:] = dpre * wt[K - 1]
        dw[K - 1] = (dpre * xp[:, K - 1:]).sum((0, 1))
        for i in range(K - 1):
            dpre_i = dpre if masks is None else dpre * masks[i]
            dxp[:, i: i + l].addcmul_(dpre_i, wt[i])
            dw[i] = (dpre_i * xp[:, i: i + l]).sum((0, 1))
        dx = dxp[:, K - 1:].to(ctx.x_dtype)
        dprefix = dxp[:, : K - 1].to(ctx.prefix_dtype) if ctx.needs_input_grad[3] else None
        return dx, dw.t().to(ctx.weight_dtype), dbias, dprefix, None, None, None


def causal_conv1d_fast(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    activation: str | None = None,
    return_final_states: bool = False,
):
    """Arguments, shapes and results exactly as :func:`~tandem.kernels.conv1d.reference.causal_conv1d_ref`."""
    b, l, d, K = check_conv1d_args(x, weight, bias, seq_idx, initial_states, activation)
    cd = compute_dtype(x, weight)
    prefix = initial_states.transpose(1, 2) if initial_states is not None else x.new_zeros(b, K - 1, d)
    silu = activation in ("silu", "swish")  # every accepted activation is the identity or SiLU
    out = _CausalConv1dFn.apply(x, weight, bias, prefix, seq_idx, silu, cd)
    if return_final_states:
        window = torch.cat([prefix.to(x.dtype), x], dim=1)[:, l:]  # the last K-1 inputs
        return out, window.transpose(1, 2)
    return out
