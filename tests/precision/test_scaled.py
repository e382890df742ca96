"""Scaled quantizers against their definitions, torch's float8 casts, and torchao's MX / NVFP4 quantizers."""

import pytest
import torch

from tandem.kernels.quant.formats import E2M1, E4M3, E5M2, e8m0_to_float, pack_e2m1, round_to_format
from tandem.kernels.quant.scaled import (DelayedScaling, compute_scale, hadamard_matrix, quantize_blocks, quantize_current,
                                  quantize_mx, quantize_nvfp4, random_hadamard_transform)

mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor", reason="torchao is a dev dependency")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale  # noqa: E402


def _rand(shape, seed, spread=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if spread:  # columns spanning 10^-spread .. 10^spread
        x = x * torch.logspace(-spread, spread, shape[-1])
    return x


# ---------------------------------------------------------------------------------------------- FP8
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_current_scaling_equals_torch_cast(fmt):
    x = _rand((77, 300), 0, spread=2)
    values, scale_inv = quantize_current(x, fmt)
    scale = torch.tensor(fmt.max) / x.abs().amax()
    assert torch.equal(scale_inv, torch.reciprocal(scale))
    assert torch.equal(values, (x * scale).to(fmt.torch_dtype).float())
    assert values.abs().max() == fmt.max  # the amax maps onto the format max


def test_current_scaling_zero_tensor_and_pow2():
    values, scale_inv = quantize_current(torch.zeros(4, 4), E4M3)
    assert scale_inv == 1 and (values == 0).all()
    s = compute_scale(torch.tensor(3.0), E4M3, power_2=True)
    assert s == 128.0  # 448/3 = 149.3 → 2^7


def test_delayed_scaling_uses_history():
    ds = DelayedScaling(E4M3, history_len=3, algo="max")
    xs = [torch.full((4,), a) for a in (2.0, 8.0, 1.0, 0.5, 0.25)]
    scales = []
    for x in xs:
        scales.append(ds.scale.item())
        ds(x)
    # step 0 uses 1; afterwards 448 / max of the last ≤3 amaxes
    assert scales == [1.0, 448 / 2.0, 448 / 8.0, 448 / 8.0, 448 / 8.0]
    assert ds.scale.item() == pytest.approx(448 / 1.0)  # window now (0.25, 0.5, 1.0)
    recent = DelayedScaling(E4M3, history_len=5, algo="most_recent", margin=1)
    recent(torch.tensor([4.0]))
    assert recent.scale.item() == 448 / 4.0 / 2
    recent(torch.zeros(3))  # amax 0 keeps the previous scale
    assert recent.scale.item() == 448 / 4.0 / 2
    # quantization with the delayed scale saturates (TE satfinite) when the tensor outgrows the history
    v, s_inv = DelayedScaling(E4M3)(torch.tensor([1000.0]))
    assert v.item() == 448.0 and s_inv.item() == 1.0


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
@pytest.mark.parametrize("shape", [(200, 300), (128, 128), (3, 1000)])
def test_block_scaling_definition(block, shape):
    x = _rand(shape, 1, spread=1)
    values, scale_inv = quantize_blocks(x, E4M3, block)
    bm, bn = block
    assert scale_inv.shape == (-(-shape[0] // bm), -(-shape[1] // bn))
    for i in range(scale_inv.shape[0]):
        for j in range(0, scale_inv.shape[1], max(1, scale_inv.shape[1] // 3)):
            blk = x[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            raw = 448.0 / blk.abs().max()
            scale = 2.0 ** torch.floor(torch.log2(raw))  # power-of-two, rounded down
            assert scale_inv[i, j] == 1 / scale
            ref = (blk * scale).to(torch.float8_e4m3fn).float()
            assert torch.equal(values[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn], ref)


# ---------------------------------------------------------------------------------------------- MXFP8
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
@pytest.mark.parametrize("mode", ["floor", "rceil"])
def test_mxfp8_equals_torchao(fmt, mode):
    x = _rand((96, 512), 2, spread=3)
    x[0, :32] = 0  # an all-zero block
    ref_mode = ScaleCalculationMode.FLOOR if mode == "floor" else ScaleCalculationMode.RCEIL
    ref_scale, ref_data = mx.to_mx(x, fmt.torch_dtype, 32, ref_mode)
    values, scale = quantize_mx(x, fmt, 32, scale_mode=mode)
    assert torch.equal(scale, ref_scale.view(torch.uint8))
    assert torch.equal(values, ref_data.float())
    # and against the definition: dequantized = value · 2^(scale - 127), values saturate at the format max
    deq = values * e8m0_to_float(scale).repeat_interleave(32, 1)
    assert torch.equal(deq, mx.to_dtype(ref_data, ref_scale, fmt.torch_dtype, 32, torch.float32))


def test_mxfp8_rceil_is_the_exact_ceiling():
    """Deliberate difference: torchao's eager RCEIL takes ``ceil(log2(descale))`` in fp32, which rounds
    ``log2`` of a value just above a power of two down onto the integer, so its scale is one binade too
    small and the block saturates. Here the ceiling comes from the fp32 bits (what the hardware's
    ``cvt.rp.satfinite.ue8m0`` does): the smallest 2^e >= descale."""
    descale = torch.tensor(1024.0).nextafter(torch.tensor(2048.0))  # 2^10 · (1 + 2^-23)
    amax = descale * 448.0  # amax · (1/448) lands back within an ulp of descale
    x = torch.zeros(1, 32)
    x[0, 0] = amax
    values, scale = quantize_mx(x, E4M3, 32, scale_mode="rceil")
    d = amax * (1.0 / 448.0)
    e = scale.int().item() - 127
    assert 2.0 ** (e - 1) < d <= 2.0**e
    assert values[0, 0] <= 448


# ---------------------------------------------------------------------------------------------- NVFP4
@pytest.mark.parametrize("seed,shape,amax", [(3, (128, 256), None), (4, (64, 1024), 448 * 6 * 2**-3), (5, (32, 64), 5.0)])
def test_nvfp4_equals_torchao(seed, shape, amax):
    x = _rand(shape, seed)
    if amax:
        x = x / x.abs().max() * amax
    ref_scale, ref_packed = nvfp4_quantize(x, 16, per_tensor_amax_to_scale(x.abs().max()))
    q = quantize_nvfp4(x)
    assert torch.equal(q.block_scale.view(torch.uint8), ref_scale.view(torch.uint8))
    assert torch.equal(pack_e2m1(q.codes()), ref_packed.view(torch.uint8))
    # The per-tensor decode scale: TE takes 1 / (448·6/amax), torchao amax / (448·6); they may differ in
    # the last bit (the encode path above, which decides every stored bit, is the same).
    torch.testing.assert_close(q.global_decode, per_tensor_amax_to_scale(x.abs().max()), rtol=2**-23, atol=0)
    assert q.global_decode == 1 / (torch.tensor(2688.0) / x.abs().max())


def test_nvfp4_differs_from_torchao_only_in_subnormal_block_scales():
    """Deliberate difference: torchao clamps block scales to at least 2^-6 (the smallest *normal* E4M3);
    TE's kernel and this emulation keep E4M3 subnormal (and zero) block scales, so blocks whose amax
    is below ~2^-6/448 of the tensor amax keep their resolution instead of flushing towards 0."""
    x = _rand((64, 512), 6, spread=3)
    ref_scale, ref_packed = nvfp4_quantize(x, 16, per_tensor_amax_to_scale(x.abs().max()))
    q = quantize_nvfp4(x)
    ours = q.block_scale.float()
    differ = ours != ref_scale.float()
    assert differ.any()
    assert (ours[differ] < 2.0**-6).all() and (ref_scale.float()[differ] == 2.0**-6).all()
    same_rows = ~differ.repeat_interleave(8, 1)  # 16 elements = 8 packed bytes per block
    assert torch.equal(pack_e2m1(q.codes())[same_rows], ref_packed.view(torch.uint8)[same_rows])


def test_nvfp4_definition_and_2d_tiles():
    x = _rand((48, 80), 7)
    q = quantize_nvfp4(x)
    s_enc = torch.tensor(2688.0) / x.abs().max()
    blocks = x.reshape(48, 5, 16)
    expect = (blocks.abs().amax(-1) * (s_enc * (1 / torch.tensor(6.0)))).clamp(max=448).to(torch.float8_e4m3fn)
    assert torch.equal(q.block_scale.view(torch.uint8), expect.view(torch.uint8))
    enc = 1 / (expect.float() * (1 / s_enc))
    assert torch.equal(q.values, round_to_format((blocks * enc[..., None]).clamp(-6, 6), E2M1).reshape(48, 80))
    # 16×16 tiles: one scale per tile, and the quantized transpose is the transpose of the quantized
    t = quantize_nvfp4(x, (16, 16))
    tt = quantize_nvfp4(x.t().contiguous(), (16, 16))
    assert torch.equal(tt.dequantize(), t.dequantize().t())
    s = t.block_scale.float().reshape(3, 16, 5)
    assert (s == s[:, :1, :]).all()


def test_nvfp4_stochastic_rounding_unbiased():
    g = torch.Generator().manual_seed(8)
    x = torch.rand(1, 16, generator=g) * 6
    x[0, 0] = 6.0  # tensor amax = block amax = 6: the scales are exactly 1, so no value is clamped
    n = 3000
    torch.manual_seed(0)
    mean = sum(quantize_nvfp4(x, stochastic=True).dequantize() for _ in range(n)) / n
    rne = quantize_nvfp4(x).dequantize()
    assert (mean - x).abs().max() < 0.06  # spacing ≤ 2 → σ of the mean ≤ 1/√3000 ≈ 0.018
    assert (rne - x).abs().max() > 0.2  # while a single RNE draw is far off


# ---------------------------------------------------------------------------------------------- RHT
def test_hadamard_orthogonal_and_exactly_inverted():
    t = hadamard_matrix(16)
    assert torch.equal(t @ t.t(), torch.eye(16))
    assert torch.equal(t.abs(), torch.full((16, 16), 0.25))
    g = torch.Generator().manual_seed(9)
    ints = torch.randint(-1000, 1000, (32, 64), generator=g).float()  # exactly representable throughout
    assert torch.equal(random_hadamard_transform(random_hadamard_transform(ints, t), t, inverse=True), ints)
    x = torch.randn(32, 64, generator=g)
    y = random_hadamard_transform(x, t)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(random_hadamard_transform(y, t, inverse=True), x, rtol=0, atol=1e-6)
    # along the token dim of both wgrad operands the product is preserved: (T dy)ᵀ (T x) = dyᵀ x
    dy, xx = torch.randn(32, 8, generator=g), torch.randn(32, 12, generator=g)
    f = lambda a: random_hadamard_transform(a.t(), t).t()  # noqa: E731
    torch.testing.assert_close(f(dy).t() @ f(xx), dy.t() @ xx, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


def test_all_zero_tensors_quantize_to_zero():
    z = torch.zeros(32, 64)
    assert torch.equal(quantize_nvfp4(z).dequantize(), z)
    assert torch.equal(quantize_nvfp4(z, (16, 16)).dequantize(), z)
    values, scale = quantize_mx(z, E4M3)
    assert torch.equal(values, z) and (scale == 0).all()  # E8M0 2^-127, as torchao
    values, scale_inv = quantize_blocks(z, E4M3, (1, 128))
    assert torch.equal(values, z) and (scale_inv == 1).all()
