"""The fast channels-last conv1d (the model's CPU path) equals the reference: outputs, final windows and the
gradients of the input, weight, bias and initial states, with and without packed-document resets."""

import pytest
import torch

from tandem.kernels.conv1d import causal_conv1d, causal_conv1d_ref
from tandem.kernels.conv1d.fast import causal_conv1d_fast

SEQ_IDX = torch.tensor([[0] * 5 + [1] * 1 + [2] * 14, [0] * 2 + [1] * 18])


@pytest.mark.parametrize("use_seq_idx,use_init,use_bias,activation", [
    (False, False, True, "silu"), (True, True, True, "silu"), (True, False, False, None), (False, True, False, None),
])
def test_fast_equals_reference(use_seq_idx, use_init, use_bias, activation):
    torch.manual_seed(0)
    b, l, d, K = 2, 20, 6, 4
    # x as a strided slice of a wider tensor, as the mixer's in_proj split hands it over
    wide = torch.randn(b, l, d + 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, K, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d, dtype=torch.float64, requires_grad=True) if use_bias else None
    init = torch.randn(b, d, K - 1, dtype=torch.float64, requires_grad=True) if use_init else None
    leaves = [t for t in (wide, w, bias, init) if t is not None]
    results = []
    for fn in (causal_conv1d_ref, causal_conv1d_fast):
        out, final = fn(wide[..., 1: d + 1], w, bias, SEQ_IDX if use_seq_idx else None, init, activation, True)
        weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
        grads = torch.autograd.grad((out * weights).sum() + final.pow(2).sum(), leaves)
        results.append((out, final, grads))
    (o1, f1, g1), (o2, f2, g2) = results
    torch.testing.assert_close(o2, o1, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(f2, f1, atol=0, rtol=0)
    for a, r in zip(g2, g1):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


def test_bf16_input_computes_in_fp32_through_dispatch():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 8).bfloat16()
    w, bias = torch.randn(8, 4), torch.randn(8)
    ref = causal_conv1d_ref(x, w, bias, SEQ_IDX[:, :16], activation="silu")
    out = causal_conv1d(x, w, bias, SEQ_IDX[:, :16], activation="silu", impl="torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)  # fp32 sums in another order, rounded to bf16
