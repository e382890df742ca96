"""The norms' fused autograd function equals the plain-op references: outputs and gradients (fp64, so
the closed-form backward is checked to rounding), and bf16 outputs bit-for-bit in the cast order."""

import pytest
import torch

from tandem.model.norms import GatedRMSNorm, RMSNorm, gated_rms_norm_ref, rms_norm_ref


def _grads(out, leaves):
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * w).sum(), leaves)


def test_rmsnorm_equals_reference():
    torch.manual_seed(0)
    norm = RMSNorm(16).double()
    norm.weight.data.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    out, ref = norm(x), rms_norm_ref(x, norm.weight, norm.eps)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(_grads(out, [x, norm.weight]), _grads(ref, [x, norm.weight])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("gated", [True, False])
def test_gated_norm_equals_reference(gated):
    torch.manual_seed(1)
    norm = GatedRMSNorm(24, 8).double()
    norm.weight.data.normal_()
    y = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True) if gated else None
    leaves = [t for t in (y, z, norm.weight) if t is not None]
    out, ref = norm(y, z), gated_rms_norm_ref(y, z, norm.weight, 8, norm.eps)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(_grads(out, leaves), _grads(ref, leaves)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_bf16_outputs_match_reference_cast_order():
    torch.manual_seed(2)
    x, z = torch.randn(4, 32).bfloat16(), torch.randn(4, 32).bfloat16()
    w = torch.randn(32).bfloat16()
    torch.testing.assert_close(RMSNorm(32).bfloat16().requires_grad_(False).forward(x), rms_norm_ref(x, torch.ones(32).bfloat16(), 1e-5), atol=0, rtol=0)
    g = GatedRMSNorm(32, 16).bfloat16()
    g.weight.data.copy_(w)
    torch.testing.assert_close(g(x, z), gated_rms_norm_ref(x, z, w, 16, 1e-5), atol=0, rtol=0)
