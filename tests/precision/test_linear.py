"""The quantize–dequantize linear: each GEMM sees exactly the recipe's quantized operands."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels.quant import RECIPES, RecipeOptions, build_quantizers, quantized_linear
from tandem.kernels.quant.formats import E4M3, E5M2
from tandem.kernels.quant.scaled import hadamard_matrix, quantize_current, quantize_mx, quantize_nvfp4, random_hadamard_transform
from tandem.kernels.quant.formats import e8m0_to_float


def _data(m=40, k=64, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1, torch.randn(m, n, generator=g)


def _run(recipe, x, w, dy, options=None, bias=None):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = quantized_linear(x, w, bias, build_quantizers(recipe, options))
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _qdq_current(t, fmt):
    v, s = quantize_current(t, fmt)
    return v * s


def test_fp8_current_hybrid_gemms_exact():
    x, w, dy = _data()
    y, dx, dw = _run("fp8_current", x, w, dy)
    xq, wq = _qdq_current(x, E4M3), _qdq_current(w, E4M3)
    dyq = _qdq_current(dy, E5M2)  # HYBRID: gradients in E5M2
    assert torch.equal(y, xq @ wq.t())
    assert torch.equal(dx, dyq @ wq)
    assert torch.equal(dw, dyq.t() @ xq)


def test_fp8_e4m3_option_changes_grad_format():
    x, w, dy = _data()
    _, dx, _ = _run("fp8_current", x, w, dy, RecipeOptions(fp8_format="e4m3"))
    assert torch.equal(dx, _qdq_current(dy, E4M3) @ _qdq_current(w, E4M3))


def test_mxfp8_rowwise_and_columnwise_operands():
    x, w, dy = _data()

    def qdq(t):  # blocks of 32 along the last dim
        v, s = quantize_mx(t, E4M3, 32)
        return v * e8m0_to_float(s).repeat_interleave(32, 1)[:, : t.shape[1]]

    y, dx, dw = _run("mxfp8", x, w, dy)
    assert torch.equal(y, qdq(x) @ qdq(w).t())
    assert torch.equal(dx, qdq(dy) @ qdq(w.t()).t())  # W quantized along N for dgrad
    assert torch.equal(dw, qdq(dy.t()) @ qdq(x.t()).t())  # both along the tokens for wgrad


def test_nvfp4_gemms_with_rht_and_2d_weights():
    x, w, dy = _data(m=37)  # tokens not a multiple of 16: zero-padded for the wgrad RHT
    y, dx, dw = _run("nvfp4", x, w, dy, RecipeOptions(nvfp4_stochastic_rounding=False))
    q1 = lambda t: quantize_nvfp4(t).dequantize()  # noqa: E731
    wq = quantize_nvfp4(w, (16, 16)).dequantize()
    assert torch.equal(y, q1(x) @ wq.t())
    assert torch.equal(dx, q1(dy) @ wq)
    h = hadamard_matrix(16)
    pad = lambda t: F.pad(t, (0, 0, 0, (-t.shape[0]) % 16))  # noqa: E731
    rht_cols = lambda t: random_hadamard_transform(pad(t).t(), h)  # [cols, tokens]: blocks along tokens  # noqa: E731
    assert torch.equal(dw, q1(rht_cols(dy)) @ q1(rht_cols(x)).t())


def test_nvfp4_stochastic_gradients_vary_and_forward_does_not():
    x, w, dy = _data()
    torch.manual_seed(0)
    y1, dx1, _ = _run("nvfp4", x, w, dy)
    y2, dx2, _ = _run("nvfp4", x, w, dy)
    assert torch.equal(y1, y2) and not torch.equal(dx1, dx2)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_close_to_fp32(recipe):
    x, w, dy = _data(m=64, k=128, n=64)
    b = torch.randn(64) * 0.1
    y, dx, dw = _run(recipe, x, w, dy, bias=b)
    yr = F.linear(x, w, b)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xr, wr, b).backward(dy)
    tol = 0.25 if recipe == "nvfp4" else 0.08  # relative Frobenius error: 4-bit vs 8-bit elements
    for got, ref in ((y, yr), (dx, xr.grad), (dw, wr.grad)):
        assert (got - ref).norm() / ref.norm() < tol


def test_autocast_output_dtype_and_bias_grad():
    x, w, _ = _data()
    b = torch.zeros(48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quantized_linear(x, w, b, build_quantizers("fp8_block"))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.equal(b.grad, torch.full((48,), 40.0))


def test_unknown_recipe_and_bad_option():
    with pytest.raises(ValueError, match="unknown low-precision recipe 'fp6'"):
        build_quantizers("fp6")
    with pytest.raises(ValueError, match="fp8_format must be 'hybrid' or 'e4m3'"):
        build_quantizers("fp8_current", RecipeOptions(fp8_format="e5m2"))
