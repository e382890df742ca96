"""Scaled quantizers: per-tensor FP8 (current and delayed scaling), FP8 block scaling (1×128, 128×128),
MXFP8 (32-element blocks, E8M0 scales) and NVFP4 (16-element blocks, E4M3 scales, FP32 tensor scale).

Each ``quantize_*`` returns the element values (fp32 tensor on the element grid) and the decode scale(s);
``dequantize = values · scale_inv`` (the multiplier a GEMM applies), which is what the emulated GEMMs
consume. All maths is fp32 in the order Transformer Engine's kernels / reference quantizers use, so the
quantized bits are those of the format definitions (see the per-function notes for where a choice of
arithmetic order matters).

Blocks run along the last dim of a 2-D tensor; a ragged last block is zero-padded (zeros never change an
amax) and the padding is cropped off the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .formats import E2M1, E4M3, FloatFormat, e2m1_encode, e8m0_from_exponent, e8m0_to_float, exp2_int, round_to_format

__all__ = [
    "compute_scale", "quantize_with_scale", "quantize_current", "DelayedScaling", "quantize_blocks", "expand_block_scales",
    "quantize_mx", "NVFP4Quantized", "quantize_nvfp4", "nvfp4_global_encode_scale", "hadamard_matrix",
    "random_hadamard_transform", "TE_RHT_SIGNS", "pad_to",
]

FP32_MAX = torch.finfo(torch.float32).max


def pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor so its dims are multiples of ``rows`` and ``cols``."""
    m, n = x.shape
    return F.pad(x, (0, (-n) % cols, 0, (-m) % rows))


def _tiles(x: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """2-D ``x`` (dims multiples of the tile) → ``[M/bm, bm, N/bn, bn]`` view."""
    m, n = x.shape
    return x.reshape(m // bm, bm, n // bn, bn)


def _tile_amax(x: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Per-tile amax, broadcast back to ``[M/bm, 1, N/bn, 1]`` for elementwise use."""
    return _tiles(x, bm, bn).abs().amax(dim=(1, 3), keepdim=True)


# --------------------------------------------------------------------------------------------------
# FP8 with one scale per tensor (TE DelayedScaling / Float8CurrentScaling)
def compute_scale(amax: torch.Tensor, fmt: FloatFormat, *, margin: int = 0, power_2: bool = False,
                  eps: float = 0.0, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Encode scale ``fmt.max / amax / 2^margin`` (fp32), as TE computes it.

    ``amax == 0`` (or non-finite) keeps ``previous`` (delayed scaling) or gives 1; an infinite quotient
    becomes the largest fp32; ``power_2`` rounds the scale down to a power of two (exponent bits kept).
    """
    amax = amax.float().clamp(min=eps)
    scale = (fmt.max / amax) / float(2**margin)
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)
    if power_2:
        _, e = torch.frexp(scale)
        scale = exp2_int((e - 1).clamp(-126, 127))
    fallback = previous if previous is not None else torch.ones_like(scale)
    return torch.where((amax > 0) & torch.isfinite(amax), scale, fallback)


def quantize_with_scale(x: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor, *, stochastic: bool = False):
    """``(values, scale_inv)`` with ``values = round(x · scale)`` saturated, ``scale_inv = 1 / scale``."""
    scale = scale.float()
    return round_to_format(x.float() * scale, fmt, stochastic=stochastic), torch.reciprocal(scale)


def quantize_current(x: torch.Tensor, fmt: FloatFormat, *, margin: int = 0, power_2: bool = False):
    """Current (just-in-time) per-tensor scaling: the scale comes from this tensor's own amax."""
    return quantize_with_scale(x, fmt, compute_scale(x.detach().abs().amax(), fmt, margin=margin, power_2=power_2))


class DelayedScaling:
    """Per-tensor scaling from an amax history (TE ``DelayedScaling``): the tensor is quantized with the
    scale computed from *previous* amaxes; its own amax is then pushed into the history and the scale
    updated (``amax_compute_algo`` ``max`` over the window or ``most_recent``). The first call uses 1.
    """

    def __init__(self, fmt: FloatFormat, history_len: int = 1024, algo: str = "max", margin: int = 0):
        if algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo must be 'max' or 'most_recent', got {algo!r}")
        if history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {history_len}")
        self.fmt, self.algo, self.margin = fmt, algo, margin
        self.history = torch.zeros(history_len)
        self.scale = torch.ones(())

    def __call__(self, x: torch.Tensor, *, stochastic: bool = False):
        values, scale_inv = quantize_with_scale(x, self.fmt, self.scale.to(x.device), stochastic=stochastic)
        self.update(x.detach().abs().amax().float().cpu())
        return values, scale_inv

    def update(self, amax: torch.Tensor) -> None:
        self.history = torch.roll(self.history, 1)
        self.history[0] = amax
        reduced = self.history.max() if self.algo == "max" else self.history[0]
        self.scale = compute_scale(reduced, self.fmt, margin=self.margin, previous=self.scale)


# --------------------------------------------------------------------------------------------------
# FP8 block scaling (TE Float8BlockScaling: 1×128 for activations/gradients, 128×128 for weights)
def quantize_blocks(x: torch.Tensor, fmt: FloatFormat, block: tuple[int, int] = (1, 128), *,
                    power_2: bool = True, eps: float = 0.0):
    """One FP32 scale per ``block`` tile of a 2-D tensor. Returns ``(values, scale_inv)`` with
    ``scale_inv`` of shape ``[ceil(M/bm), ceil(N/bn)]``."""
    m, n = x.shape
    bm, bn = block
    xp = pad_to(x.float(), bm, bn)
    scale = compute_scale(_tile_amax(xp, bm, bn), fmt, power_2=power_2, eps=eps)
    values = round_to_format(_tiles(xp, bm, bn) * scale, fmt).reshape(xp.shape)[:m, :n]
    return values, torch.reciprocal(scale).squeeze(3).squeeze(1)


def expand_block_scales(scale_inv: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """``[M/bm, N/bn]`` per-block scales → per-element ``[M, N]``."""
    bm, bn = block
    return scale_inv.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[: shape[0], : shape[1]]


# --------------------------------------------------------------------------------------------------
# MXFP8 (OCP MX v1.0): 32 consecutive elements share one E8M0 power-of-two scale
def quantize_mx(x: torch.Tensor, fmt: FloatFormat, block: int = 32, *, scale_mode: str = "rceil"):
    """MX quantization along the last dim. Returns ``(values, scale_e8m0 uint8 [M, ceil(N/block)])``.

    ``scale_mode``:
    - ``"floor"`` — the OCP MX v1.0 rule: ``X = 2^(floor(log2 amax) - emax_elem)`` (values above
      ``max`` in the block saturate);
    - ``"rceil"`` — NVIDIA's rule (cuBLAS / TE on Blackwell, ``cvt.rp.satfinite.ue8m0``):
      ``X = 2^ceil(log2(amax · (1/max)))``, rounding the decode scale *up* so nothing saturates. The
      ceiling is taken on the fp32 bits (exponent + 1 if any mantissa bit is set), which is exact.
    """
    m, n = x.shape
    xp = pad_to(x.float(), 1, block)
    amax = _tile_amax(xp, 1, block)
    if scale_mode == "floor":
        _, e = torch.frexp(amax)
        exp = (e - 1) - fmt.emax
        exp = torch.where(amax == 0, torch.full_like(exp, -127), exp)
    elif scale_mode == "rceil":
        descale = amax * (1.0 / fmt.max)  # TE multiplies by the fp32 reciprocal of the format max
        bits = descale.view(torch.int32)
        biased, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
        exp = biased - 127 + (mant != 0).to(torch.int32)
        exp = torch.where(biased == 0, torch.where(mant != 0, -126, -127), exp)  # fp32 subnormal / zero
    else:
        raise ValueError(f"scale_mode must be 'floor' or 'rceil', got {scale_mode!r}")
    scale_b = e8m0_from_exponent(exp)
    decode = e8m0_to_float(scale_b)
    # Multiplying by 2^-exp is exact; decode 2^-127 cannot be inverted in fp32, but it only occurs for
    # all-zero (or all-subnormal-tiny) blocks, whose elements then round to 0 either way.
    encode = torch.where(decode > 0, torch.reciprocal(decode.clamp(min=2.0**-126)), torch.ones_like(decode))
    values = round_to_format(_tiles(xp, 1, block) * encode, fmt).reshape(xp.shape)[:m, :n]
    return values, scale_b.squeeze(3).squeeze(1)


# --------------------------------------------------------------------------------------------------
# NVFP4: E2M1 elements, one E4M3 scale per 16 elements, an FP32 per-tensor scale
@dataclass
class NVFP4Quantized:
    values: torch.Tensor  # [M, N] fp32 E2M1 values
    block_scale: torch.Tensor  # [M, ceil(N/16)] torch.float8_e4m3fn (per 1×16 group; 2-D tiles repeat it)
    global_decode: torch.Tensor  # fp32 scalar: amax / (448 · 6) (= 1 / global encode scale)

    def dequantize(self) -> torch.Tensor:
        s = self.block_scale.float().repeat_interleave(16, dim=1)[:, : self.values.shape[1]]
        return (self.values * s) * self.global_decode  # E2M1·E4M3 is exact in fp32: one rounding, at the end

    def codes(self) -> torch.Tensor:
        """E2M1 4-bit codes (uint8) of :attr:`values`."""
        return e2m1_encode(self.values)


def nvfp4_global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """``S_enc = 448 · 6 / amax`` in fp32; capped at the fp32 max; 1 where it would be 0."""
    s = torch.div(torch.tensor(E4M3.max * E2M1.max, dtype=torch.float32), amax.float())
    s = torch.clamp(s, max=FP32_MAX)
    return torch.where(s == 0, torch.ones_like(s), s)


def quantize_nvfp4(x: torch.Tensor, tile: tuple[int, int] = (1, 16), *, global_amax: torch.Tensor | None = None,
                   stochastic: bool = False) -> NVFP4Quantized:
    """NVFP4 along the last dim (1×16 blocks) or with 16×16 tiles (one scale per tile, used for weights
    so the same quantized weight serves both the forward and the transposed backward GEMM).

    Order of operations (TE's kernel and its reference quantizer):
    ``S_enc = 448·6/amax``; ``s_b = e4m3(min(amax_b · (S_enc · fp32(1/6)), 448))``;
    ``enc_b = 1 / (fp32(s_b) · (1/S_enc))``; ``values = e2m1(clamp(x · enc_b, ±6))`` with
    round-to-nearest-even, or stochastic rounding for gradients. Dequantize: ``values · s_b · (1/S_enc)``.
    """
    if tile not in ((1, 16), (16, 16)):
        raise ValueError(f"NVFP4 tiles are (1, 16) or (16, 16), got {tile}")
    m, n = x.shape
    bm, bn = tile
    xf = x.float()
    if global_amax is None:
        global_amax = xf.abs().amax()
    s_enc = nvfp4_global_encode_scale(global_amax)
    s_dec = torch.div(1.0, s_enc)
    xp = pad_to(xf, bm, bn)
    vec_max = _tile_amax(xp, bm, bn)  # [M/bm, 1, N/bn, 1]
    block_scale = torch.clamp(vec_max * (s_enc * torch.reciprocal(torch.tensor(6.0))), max=E4M3.max)
    block_scale = block_scale.to(torch.float8_e4m3fn)
    enc_b = torch.clamp(torch.div(1.0, block_scale.float() * s_dec), max=FP32_MAX)
    scaled = torch.clamp(_tiles(xp, bm, bn) * enc_b, -E2M1.max, E2M1.max)
    values = round_to_format(scaled, E2M1, stochastic=stochastic).reshape(xp.shape)[:m, :n]
    # per-1×16-group scale layout [M, N/16] (rows of a 16×16 tile share the tile's scale)
    per_row = block_scale.expand(-1, bm, -1, 1).reshape(xp.shape[0], xp.shape[1] // bn)[:m]
    return NVFP4Quantized(values, per_row, s_dec.reshape(()))


# --------------------------------------------------------------------------------------------------
# 16×16 random Hadamard transform (applied to both inputs of the weight-gradient GEMM)
#: TE's fixed random sign vector for the wgrad RHT (``D`` in ``x @ (D H / 4)``)
TE_RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def hadamard_matrix(size: int = 16, signs=TE_RHT_SIGNS) -> torch.Tensor:
    """``diag(signs) · H_size / sqrt(size)``: Sylvester Hadamard with a random sign flip per row;
    orthogonal (entries ±1/4 for size 16, so ``T Tᵀ = I`` exactly in fp32)."""
    if size & (size - 1) or size < 1:
        raise ValueError(f"Hadamard size must be a power of two, got {size}")
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    d = torch.tensor(signs, dtype=torch.float32) if signs is not None else torch.ones(size)
    if d.numel() != size:
        raise ValueError(f"signs: expected {size} entries, got {d.numel()}")
    return (d[:, None] * h) / size**0.5


def random_hadamard_transform(x: torch.Tensor, matrix: torch.Tensor | None = None, *, inverse: bool = False) -> torch.Tensor:
    """Apply the block transform to consecutive groups of 16 along the last dim (length a multiple of 16)."""
    t = hadamard_matrix() if matrix is None else matrix
    size = t.shape[0]
    if x.shape[-1] % size:
        raise ValueError(f"random_hadamard_transform: last dim {x.shape[-1]} is not a multiple of {size}")
    t = t.to(device=x.device, dtype=torch.float32)
    if inverse:
        t = t.t()
    return (x.float().reshape(-1, size) @ t).reshape(x.shape)
