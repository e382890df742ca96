"""Quantize–dequantize linear: ``y = x Wᵀ + b`` with every GEMM operand quantized per the recipe.

The autograd Function emulates a low-precision GEMM as an fp32 matmul of the *dequantized* operands:
the operands are bit-exact format values times their scales; the GEMM's own accumulation order and
precision (tensor cores accumulate in fp32 with their own blocking) are not reproduced, so outputs agree
with hardware to fp32 rounding, not bit for bit. Biases, and everything outside the GEMMs, stay in high
precision. Under ``torch.autocast`` the GEMM still runs in fp32 (autocast is disabled inside) and the
output takes the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .recipes import LinearQuantizers, apply_rht
from .scaled import pad_to

__all__ = ["quantized_linear"]


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, q: LinearQuantizers):
        out_dtype = _out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xq = q.input(x2)
            wq = q.weight(weight)
            y = xq @ wq.t()
            if bias is not None:
                y = y + bias.float()
        ctx.q, ctx.x_shape, ctx.x_dtype, ctx.has_bias = q, x.shape, x.dtype, bias is not None
        ctx.xq = xq if q.input.per_tensor else None
        ctx.wq_col = wq if (q.weight.per_tensor or q.weight.square) else None
        ctx.save_for_backward(x2, weight)
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        q: LinearQuantizers = ctx.q
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).float()
            # dgrad: dx = dy · W, reduction over N — dy rowwise, W columnwise
            dyq = q.grad(dy2)
            wq_col = ctx.wq_col if ctx.wq_col is not None else q.weight.columnwise(weight)
            dx = dyq @ wq_col
            # wgrad: dW = dyᵀ · x, reduction over the tokens M — both operands columnwise
            if q.rht is not None:
                # (H dy)ᵀ (H x) = dyᵀ x for orthogonal block-diagonal H; zero rows pad M to 16s
                dy_t = apply_rht(pad_to(dy2, 16, 1), q.rht)
                x_t = apply_rht(pad_to(x2.float(), 16, 1), q.rht)
                dw = q.grad.columnwise(dy_t).t() @ q.input.columnwise(x_t)
            else:
                dyq_col = dyq if q.grad.per_tensor else q.grad.columnwise(dy2)
                xq_col = ctx.xq if ctx.xq is not None else q.input.columnwise(x2)
                dw = dyq_col.t() @ xq_col
            db = dy2.sum(0) if ctx.has_bias else None
        ctx.xq = ctx.wq_col = None
        return dx.reshape(ctx.x_shape).to(ctx.x_dtype), dw.to(weight.dtype), (db.to(weight.dtype) if db is not None else None), None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, quantizers: LinearQuantizers | None):
    """``F.linear`` with the recipe's quantize–dequantize on every GEMM operand (``None``: plain F.linear)."""
    if quantizers is None:
        return F.linear(x, weight, bias)
    return _QuantizedLinear.apply(x, weight, bias, quantizers)
