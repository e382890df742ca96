"""Training recipes as registered quantizer sets: which format and scaling each GEMM operand gets.

A linear layer ``y = x Wᵀ`` runs three GEMMs; each operand is quantized along that GEMM's reduction dim:

===========  ===========================  ==========================  ==============================
GEMM         operand A                    operand B                   reduction dim
===========  ===========================  ==========================  ==============================
fprop        x (input), along K           W (weight), along K         K = in_features
dgrad        dy (grad), along N           W, along N (columnwise)     N = out_features
wgrad        dy, along M (columnwise)     x, along M (columnwise)     M = tokens
===========  ===========================  ==========================  ==============================

Per-tensor scaling gives the same values in both orientations (one quantization per tensor, reused);
block formats quantize rowwise and columnwise separately, as TE does. Square weight tiles (128×128,
16×16) are orientation-free. Recipes (``RECIPES``), each mirroring a Transformer Engine recipe:

- ``fp8_delayed``  — DelayedScaling: per-tensor, amax history; HYBRID = E4M3 fwd, E5M2 grads.
- ``fp8_current``  — Float8CurrentScaling: per-tensor scale from the tensor's own amax; HYBRID.
- ``fp8_block``    — Float8BlockScaling: 1×128 activations/grads, 128×128 weights, power-of-two
  scales, E4M3 for all by default (TE's default format for this recipe).
- ``mxfp8``        — MXFP8BlockScaling: 1×32 blocks, E8M0 scales, E4M3 by default.
- ``nvfp4``        — NVFP4BlockScaling: E2M1 with 1×16 E4M3 scales + FP32 tensor scale; 16×16 weight
  tiles; RHT on both wgrad inputs; stochastic rounding of gradients.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import Callable

import torch

from .formats import E4M3, E5M2, FloatFormat, e8m0_to_float
from .scaled import (DelayedScaling, expand_block_scales, hadamard_matrix, quantize_blocks, quantize_current,
                     quantize_mx, quantize_nvfp4, random_hadamard_transform)

__all__ = ["RecipeOptions", "TensorQuantizer", "LinearQuantizers", "RECIPES", "register_recipe", "build_quantizers"]


@dataclass
class RecipeOptions:
    """Recipe knobs (names follow TE's recipe arguments)."""

    fp8_format: str = "hybrid"  # hybrid (E4M3 fwd / E5M2 grads) | e4m3 — for fp8_delayed / fp8_current
    block_fp8_format: str = "e4m3"  # fp8_block and mxfp8 (TE default E4M3 for both)
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"  # max | most_recent
    block_power_2_scales: bool = True  # fp8_block
    mx_scale_mode: str = "rceil"  # rceil (NVIDIA hardware) | floor (OCP MX v1.0 rule)
    nvfp4_rht: bool = True
    nvfp4_stochastic_rounding: bool = True
    nvfp4_2d_weights: bool = True

    def formats(self, hybrid_key: str) -> tuple[FloatFormat, FloatFormat]:
        """(forward format, gradient format) for the value of ``fp8_format``/``block_fp8_format``."""
        value = getattr(self, hybrid_key)
        if value == "hybrid":
            return E4M3, E5M2
        if value == "e4m3":
            return E4M3, E4M3
        raise ValueError(f"precision.{hybrid_key} must be 'hybrid' or 'e4m3', got {value!r}")


class TensorQuantizer(abc.ABC):
    """Quantize–dequantize of a 2-D tensor with blocks along its last dim; returns fp32 dequantized
    values. ``per_tensor``: one scale for the whole tensor (orientation-free). ``square``: square tiles
    (orientation-free too)."""

    per_tensor = False
    square = False

    @abc.abstractmethod
    def __call__(self, t: torch.Tensor, *, stochastic: bool = False) -> torch.Tensor:
        """Quantize–dequantize ``t`` with blocks along its last dim (each format's subclass)."""

    def columnwise(self, t: torch.Tensor, *, stochastic: bool = False) -> torch.Tensor:
        """Quantize along dim 0 (blocks down the columns)."""
        if self.per_tensor or self.square:
            return self(t, stochastic=stochastic)
        return self(t.t(), stochastic=stochastic).t()


class CurrentScalingQuantizer(TensorQuantizer):
    per_tensor = True

    def __init__(self, fmt: FloatFormat, margin: int = 0):
        self.fmt, self.margin = fmt, margin

    def __call__(self, t, *, stochastic=False):
        values, scale_inv = quantize_current(t, self.fmt, margin=self.margin)
        return values * scale_inv


class DelayedScalingQuantizer(TensorQuantizer):
    per_tensor = True

    def __init__(self, fmt: FloatFormat, history_len: int, algo: str, margin: int):
        self.state = DelayedScaling(fmt, history_len, algo, margin)

    def __call__(self, t, *, stochastic=False):
        values, scale_inv = self.state(t)
        return values * scale_inv


class BlockQuantizer(TensorQuantizer):
    def __init__(self, fmt: FloatFormat, block: tuple[int, int], power_2: bool):
        self.fmt, self.block, self.power_2 = fmt, block, power_2
        self.square = block[0] == block[1]

    def __call__(self, t, *, stochastic=False):
        values, scale_inv = quantize_blocks(t, self.fmt, self.block, power_2=self.power_2)
        return values * expand_block_scales(scale_inv, self.block, tuple(t.shape))


class MXQuantizer(TensorQuantizer):
    def __init__(self, fmt: FloatFormat, scale_mode: str, block: int = 32):
        self.fmt, self.scale_mode, self.block = fmt, scale_mode, block

    def __call__(self, t, *, stochastic=False):
        values, scale = quantize_mx(t, self.fmt, self.block, scale_mode=self.scale_mode)
        return values * expand_block_scales(e8m0_to_float(scale), (1, self.block), tuple(t.shape))


class NVFP4Quantizer(TensorQuantizer):
    def __init__(self, tile: tuple[int, int] = (1, 16), stochastic: bool = False):
        self.tile, self.stochastic = tile, stochastic
        self.square = tile == (16, 16)

    def __call__(self, t, *, stochastic=False):
        return quantize_nvfp4(t, self.tile, stochastic=stochastic or self.stochastic).dequantize()


@dataclass
class LinearQuantizers:
    """The quantizers of one layer's GEMMs. ``rht``: 16×16 Hadamard matrix applied along the token dim
    to both wgrad operands (or None)."""

    input: TensorQuantizer
    weight: TensorQuantizer
    grad: TensorQuantizer
    rht: torch.Tensor | None = None
    name: str = ""
    extra: dict = field(default_factory=dict)


RECIPES: dict[str, Callable[[RecipeOptions], LinearQuantizers]] = {}


def register_recipe(name: str):
    def deco(fn):
        RECIPES[name] = fn
        return fn
    return deco


@register_recipe("fp8_delayed")
def _fp8_delayed(o: RecipeOptions) -> LinearQuantizers:
    fwd, bwd = o.formats("fp8_format")
    mk = lambda f: DelayedScalingQuantizer(f, o.amax_history_len, o.amax_compute_algo, o.margin)  # noqa: E731
    return LinearQuantizers(mk(fwd), mk(fwd), mk(bwd), name="fp8_delayed")


@register_recipe("fp8_current")
def _fp8_current(o: RecipeOptions) -> LinearQuantizers:
    fwd, bwd = o.formats("fp8_format")
    return LinearQuantizers(CurrentScalingQuantizer(fwd, o.margin), CurrentScalingQuantizer(fwd, o.margin),
                            CurrentScalingQuantizer(bwd, o.margin), name="fp8_current")


@register_recipe("fp8_block")
def _fp8_block(o: RecipeOptions) -> LinearQuantizers:
    fwd, bwd = o.formats("block_fp8_format")
    p2 = o.block_power_2_scales
    return LinearQuantizers(BlockQuantizer(fwd, (1, 128), p2), BlockQuantizer(fwd, (128, 128), p2),
                            BlockQuantizer(bwd, (1, 128), p2), name="fp8_block")


@register_recipe("mxfp8")
def _mxfp8(o: RecipeOptions) -> LinearQuantizers:
    fwd, bwd = o.formats("block_fp8_format")
    if o.mx_scale_mode not in ("rceil", "floor"):
        raise ValueError(f"precision.mx_scale_mode must be 'rceil' or 'floor', got {o.mx_scale_mode!r}")
    return LinearQuantizers(MXQuantizer(fwd, o.mx_scale_mode), MXQuantizer(fwd, o.mx_scale_mode),
                            MXQuantizer(bwd, o.mx_scale_mode), name="mxfp8")


@register_recipe("nvfp4")
def _nvfp4(o: RecipeOptions) -> LinearQuantizers:
    return LinearQuantizers(
        NVFP4Quantizer((1, 16)),
        NVFP4Quantizer((16, 16) if o.nvfp4_2d_weights else (1, 16)),
        NVFP4Quantizer((1, 16), stochastic=o.nvfp4_stochastic_rounding),
        rht=hadamard_matrix(16) if o.nvfp4_rht else None,
        name="nvfp4",
    )


def build_quantizers(recipe: str, options: RecipeOptions | None = None) -> LinearQuantizers:
    """Fresh quantizers (own delayed-scaling state) for one layer."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown low-precision recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[recipe](options or RecipeOptions())


def apply_rht(t: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """RHT along dim 0 (tokens) of a 2-D tensor whose dim 0 is a multiple of 16."""
    return random_hadamard_transform(t.t(), matrix).t()
