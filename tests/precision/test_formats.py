"""Element formats: every value round-trips, rounding equals torch's float8 casts bit for bit, E2M1 codes
equal torchao's, stochastic rounding is unbiased."""

import pytest
import torch

from tandem.kernels.quant.formats import (E2M1, E2M1_VALUES, E4M3, E5M2, e2m1_decode, e2m1_encode, e8m0_from_exponent,
                                   e8m0_to_float, format_values, pack_e2m1, round_to_format, unpack_e2m1)

FP8 = [E4M3, E5M2]


def _all_fp8_values(fmt):
    """Every finite value of a torch float8 dtype, from all 256 bit patterns."""
    v = torch.arange(256, dtype=torch.uint8).view(fmt.torch_dtype).float()
    return v[torch.isfinite(v)]


@pytest.mark.parametrize("fmt", FP8, ids=lambda f: f.name)
def test_every_fp8_value_round_trips(fmt):
    v = _all_fp8_values(fmt)
    assert torch.equal(round_to_format(v, fmt), v)
    # our value set, built from the bit layout, is exactly torch's (both zeros included)
    ours = format_values(fmt)
    assert torch.equal(ours.sort().values, v.sort().values)
    assert torch.equal(torch.signbit(ours).sum(), torch.signbit(v).sum())


def test_every_e2m1_value_and_code_round_trips():
    v = format_values(E2M1)
    assert v.numel() == 16 and torch.equal(v.abs().unique(), torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6.0]))
    assert torch.equal(round_to_format(E2M1_VALUES, E2M1), E2M1_VALUES)
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(e2m1_encode(e2m1_decode(codes)), codes)  # -0.0 keeps its own code (8)
    packed = pack_e2m1(codes.view(2, 8))
    assert packed.shape == (2, 4) and packed[0, 0].item() == 0x10  # element 0 low nibble, element 1 high
    assert torch.equal(unpack_e2m1(packed), codes.view(2, 8))


def _midpoints(values):
    v = values.unique().sort().values
    return (v[1:] + v[:-1]) / 2  # exact in fp32: ties that must round to even


@pytest.mark.parametrize("fmt", FP8, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_rounding_equals_torch_cast(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(20000, generator=g) * s for s in (1e-3, 0.05, 1.0, 30.0, fmt.max / 8)]
    parts.append(_midpoints(_all_fp8_values(fmt)))
    parts.append(torch.rand(4000, generator=g) * fmt.min_subnormal * 4)  # subnormal range
    x = torch.cat(parts).to(dtype)
    x = x[x.float().abs() <= fmt.max]
    ours = round_to_format(x, fmt)
    ref = x.to(fmt.torch_dtype).float()
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))  # bits, so -0.0 vs 0.0 counts


def test_saturation():
    x = torch.tensor([449.0, 463.9, 464.0, 1e9, float("inf"), -float("inf")])
    assert torch.equal(round_to_format(x, E4M3), x.to(torch.float8_e4m3fn).float())  # torch saturates E4M3 too
    assert torch.isnan(round_to_format(torch.tensor([float("nan")]), E4M3)).all()
    # Deliberate difference: E5M2 saturates to ±57344 here (TE's satfinite casts), torch's E5M2 cast
    # overflows to inf beyond 61440.
    y = torch.tensor([61440.0, 1e6, -1e6])
    assert torch.equal(round_to_format(y, E5M2), torch.tensor([57344.0, 57344.0, -57344.0]))
    assert torch.isinf(y.to(torch.float8_e5m2).float()).all()
    assert torch.equal(round_to_format(torch.tensor([5.1, 7.0, -100.0]), E2M1), torch.tensor([6.0, 6.0, -6.0]))


def test_e2m1_rounding_equals_torchao():
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels", reason="torchao is a dev dependency")
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(50000, generator=g) * 3, _midpoints(E2M1_VALUES), -_midpoints(E2M1_VALUES)])
    x = x.clamp(-6, 6)
    ours = e2m1_encode(round_to_format(x, E2M1))
    theirs = kernels.f32_to_f4_unpacked(x)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1], ids=lambda f: f.name)
def test_stochastic_rounding_is_unbiased(fmt):
    g = torch.Generator().manual_seed(3)
    vals = format_values(fmt).unique().sort().values
    vals = vals[vals.abs() <= min(fmt.max, 8.0)]
    lo, hi = vals[:-1], vals[1:]
    frac = torch.tensor([0.1, 0.37, 0.5, 0.83])
    x = (lo[:, None] + (hi - lo)[:, None] * frac).reshape(-1)  # points strictly between neighbours
    n = 4000
    draws = round_to_format(x.expand(n, -1), fmt, stochastic=True, generator=g)
    lo_x = lo[:, None].expand(-1, 4).reshape(-1)
    hi_x = hi[:, None].expand(-1, 4).reshape(-1)
    assert ((draws == lo_x) | (draws == hi_x)).all()  # only the two neighbours
    p = frac.repeat(lo.numel())
    sigma = ((hi_x - lo_x) * (p * (1 - p)).sqrt()) / n**0.5
    assert ((draws.mean(0) - x).abs() <= 5 * sigma + 1e-12).all()
    # values on the grid are never moved
    assert torch.equal(round_to_format(vals.expand(50, -1), fmt, stochastic=True, generator=g), vals.expand(50, -1))


def test_e8m0():
    e = torch.tensor([-127, -126, -1, 0, 1, 127, 300])
    b = e8m0_from_exponent(e)
    assert b.tolist() == [0, 1, 126, 127, 128, 254, 254]
    assert torch.equal(e8m0_to_float(b), torch.tensor([2.0**-127, 2.0**-126, 0.5, 1, 2, 2.0**127, 2.0**127]))
    assert torch.equal(b.view(torch.float8_e8m0fnu).float()[1:], e8m0_to_float(b)[1:])
    assert torch.isnan(e8m0_to_float(torch.tensor([255], dtype=torch.uint8))).all()
