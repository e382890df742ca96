"""Element formats, defined from their bit layouts: FP8 E4M3 / E5M2, FP4 E2M1, and the E8M0 scale.

Every quantizer in :mod:`tandem.kernels.quant` rounds through :func:`round_to_format`, which works on fp32 with
exact power-of-two arithmetic only, so the result is the format value itself (no double rounding):

1. ``e = max(floor(log2|x|), emin)`` — the binade of ``x`` (subnormals share the smallest one);
2. ``quantum = 2^(e - mbits)`` — the spacing of representable values in that binade;
3. ``q = round(|x| / quantum)`` — round-to-nearest-even (``torch.round``), or ``floor(|x|/quantum + u)``
   with ``u ~ U[0, 1)`` for stochastic rounding (unbiased: ``E[q] = |x| / quantum``);
4. ``|y| = min(q · quantum, max)`` — saturating, as Transformer Engine's ``satfinite`` casts; sign kept.

The OCP "8-bit floating point" spec and the OCP MX v1.0 spec define the layouts; E4M3 here is the
``fn`` variant (no infinities, one NaN pattern, max 448), matching ``torch.float8_e4m3fn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FloatFormat", "E4M3", "E5M2", "E2M1", "FORMATS", "round_to_format", "format_values",
    "e2m1_encode", "e2m1_decode", "pack_e2m1", "unpack_e2m1", "E2M1_VALUES",
    "exp2_int", "e8m0_from_exponent", "e8m0_to_float",
]


@dataclass(frozen=True)
class FloatFormat:
    """A sign / exponent / mantissa format. ``emin`` = 1 - bias (smallest normal exponent)."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float  # largest finite value
    torch_dtype: torch.dtype | None = None  # the torch dtype with the same value set, where one exists

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value (``floor(log2(max))``): 8 for E4M3, 15 for E5M2, 2 for E2M1."""
        return int(torch.tensor(self.max).log2().floor().item())

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)


E4M3 = FloatFormat("e4m3", 4, 3, 7, 448.0, torch.float8_e4m3fn)
E5M2 = FloatFormat("e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2)
E2M1 = FloatFormat("e2m1", 2, 1, 1, 6.0, None)
FORMATS = {f.name: f for f in (E4M3, E5M2, E2M1)}


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """``2.0 ** e`` for integer ``e`` in the fp32 normal range [-126, 127], built from the bits (exact)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def round_to_format(
    x: torch.Tensor, fmt: FloatFormat, *, stochastic: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round ``x`` (any float dtype) to the nearest value of ``fmt``; returns fp32 holding format values.

    Round-to-nearest-even by default; ``stochastic=True`` rounds up with probability equal to the
    distance from the lower neighbour (in units of the local spacing). Saturates to ``±fmt.max``
    (infinities too); NaN stays NaN.
    """
    x = x.float()
    ax = x.abs()
    _, e = torch.frexp(ax)  # ax = m · 2^e with m in [0.5, 1): floor(log2 ax) = e - 1
    e = (e - 1).clamp(min=fmt.emin, max=fmt.emax)
    quantum = exp2_int(e - fmt.mbits)
    q = ax / quantum  # exact: division by a power of two
    if stochastic:
        u = torch.rand(q.shape, generator=generator, device=q.device, dtype=torch.float32)
        q = torch.floor(q + u)
    else:
        q = torch.round(q)  # half to even
    y = torch.clamp(q * quantum, max=fmt.max)
    return torch.copysign(y, x)


def format_values(fmt: FloatFormat) -> torch.Tensor:
    """All finite values of ``fmt`` (both zeros), ascending, from the bit layout."""
    vals = []
    for sign in (1.0, -1.0):
        for ef in range(2**fmt.ebits):
            for m in range(2**fmt.mbits):
                if ef == 0:
                    v = m * 2.0 ** (fmt.emin - fmt.mbits)
                else:
                    v = (1 + m / 2**fmt.mbits) * 2.0 ** (ef - fmt.bias)
                if v <= fmt.max:
                    vals.append(sign * v)
    return torch.tensor(vals, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# E2M1: codes 0..15 = sign << 3 | exponent << 1 | mantissa
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """E2M1 values (fp32, already on the grid) → 4-bit codes in uint8. Raises if a value is off-grid."""
    mag = E2M1_VALUES[:8].to(v.device)
    idx = torch.searchsorted(mag, v.abs().contiguous()).clamp(max=7)
    if not torch.equal(mag[idx], v.abs()):
        raise ValueError("e2m1_encode: input holds values that are not E2M1 values; round_to_format(x, E2M1) first")
    return (idx | (torch.signbit(v).to(torch.int64) << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, 0..15) → fp32 values."""
    return E2M1_VALUES.to(codes.device)[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim: element ``2i`` in the low nibble, ``2i+1`` in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1: last dim must be even, got shape {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: uint8 ``[..., n]`` → codes ``[..., 2n]``."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# --------------------------------------------------------------------------------------------------
# E8M0: an unsigned power of two 2^(b - 127), b in 0..254; 255 is NaN.
def e8m0_from_exponent(e: torch.Tensor) -> torch.Tensor:
    """Unbiased exponent (int, clamped to [-127, 127]) → biased E8M0 byte (uint8)."""
    return (e.clamp(-127, 127) + 127).to(torch.uint8)


def e8m0_to_float(b: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 byte → fp32 scale ``2^(b-127)`` (2^-127 is an fp32 subnormal, still exact); 255 → NaN."""
    e = b.to(torch.int32) - 127
    normal = exp2_int(e.clamp(min=-126))
    out = torch.where(e < -126, torch.full_like(normal, 2.0**-127), normal)
    return torch.where(b == 255, torch.full_like(out, float("nan")), out)
