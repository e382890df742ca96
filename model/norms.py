"""RMSNorm and the grouped, gated RMSNorm of the Mamba-2 mixer. Both normalise in fp32.

The modules run :class:`_RMSNormFn`, one autograd function for both norms: it saves the input (and the
gate), the weight and one ``rstd`` per row/group, and its backward is the closed form
``dg = rstd · (dĝ − ĝ · mean(dĝ · ĝ))`` (plus SiLU's backward for the gate) in a few fused passes, where
autograd through the plain ops saves every intermediate (``x²``, the mean, ``x · rstd``, ``y · silu(z)``, …)
and walks one backward node per op. :func:`rms_norm_ref` / :func:`gated_rms_norm_ref` are the same maths
in plain ops, kept as the readable definition the tests compare against (``tests/model/test_norms_fast.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(weight · x · rsqrt(mean(x²) + eps))`` in fp32, cast back to ``x.dtype`` (the reference)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(xf.dtype) * xf).to(x.dtype)


def gated_rms_norm_ref(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group_size: int,
                       eps: float) -> torch.Tensor:
    """``weight · rmsnorm_per_group(y · silu(z))`` (the reference); the normalised value is cast to
    ``y.dtype`` before the weight multiplies it, as in the original Mamba-2 norm."""
    g = y.to(torch.promote_types(y.dtype, torch.float32))
    if z is not None:
        g = g * F.silu(z.to(g.dtype))
    *lead, d = g.shape
    g = g.view(*lead, d // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.view(*lead, d).to(y.dtype)


class _RMSNormFn(torch.autograd.Function):
    """``out = w · ĝ``, ``ĝ = g · rstd`` per group of ``group_size``, ``g = x`` (or ``x · silu(z)``).

    ``cast_first``: the gated norm's order (ĝ cast to ``x.dtype``, then times the weight); otherwise the
    product is formed in fp32 and cast. Computes in fp32 (fp64 stays fp64); ``dw`` is accumulated in fp32.
    """

    @staticmethod
    def forward(ctx, x, z, weight, group_size: int, eps: float, cast_first: bool):
        cdt = torch.promote_types(x.dtype, torch.float32)
        g = x.to(cdt)
        if z is not None:
            g = g * F.silu(z.to(cdt))
        shape = g.shape
        gv = g.view(*shape[:-1], shape[-1] // group_size, group_size)
        rstd = torch.rsqrt(gv.pow(2).mean(-1, keepdim=True) + eps)
        ghat = (gv * rstd).view(shape)
        out = weight * ghat.to(x.dtype) if cast_first else (weight.to(cdt) * ghat).to(x.dtype)
        ctx.save_for_backward(x, z, weight, rstd)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, dout):
        x, z, weight, rstd = ctx.saved_tensors
        cdt = rstd.dtype
        g = x.to(cdt)
        if z is not None:
            silu_z = F.silu(z.to(cdt))
            g = g * silu_z
        shape, k = g.shape, ctx.group_size
        gv = g.view(*shape[:-1], shape[-1] // k, k)
        ghat = gv * rstd
        doutf = dout.to(cdt)
        dw = (doutf * ghat.view(shape)).reshape(-1, shape[-1]).sum(0).to(weight.dtype)
        dghat = (doutf * weight.to(cdt)).view_as(gv)
        dg = (dghat - ghat * (dghat * ghat).mean(-1, keepdim=True)).mul_(rstd).view(shape)
        if z is None:
            return dg.to(x.dtype), None, dw, None, None, None
        dx = (dg * silu_z).to(x.dtype)
        dz = torch.ops.aten.silu_backward(dg * x.to(cdt), z.to(cdt)).to(z.dtype)
        return dx, dz, dw, None, None, None


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x²) + eps) * weight`` computed in fp32 (weight without the +1 offset)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, None, self.weight, x.shape[-1], self.eps, False)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: ``g = y * silu(z)``, RMS-normalised within each of ``size // group_size``
    groups (one per B/C group, so tensor parallelism over groups needs no communication), times weight.
    """

    def __init__(self, size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if size % group_size:
            raise ValueError(f"GatedRMSNorm: size {size} is not a multiple of group_size {group_size}")
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return _RMSNormFn.apply(y, z, self.weight, self.group_size, self.eps, True)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"
