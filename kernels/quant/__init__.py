"""Low-precision formats and recipes, emulated bit-exactly in plain torch (the reference face).

- :mod:`.formats`: E4M3 / E5M2 / E2M1 element rounding (RNE and stochastic), E2M1 codes and packing, E8M0.
- :mod:`.scaled`: per-tensor current / delayed FP8 scaling, FP8 1×128 / 128×128 blocks, MXFP8, NVFP4,
  the 16×16 random Hadamard transform.
- :mod:`.recipes`: the TE-style recipes as registered quantizer sets for the three GEMMs of a linear.
- :mod:`.linear`: :func:`quantized_linear`, the quantize–dequantize autograd Function around a matmul.

Pure torch throughout (no Triton kernel: the quantizers are elementwise/reduction ops that torch runs at
memory speed; the emulation's cost is dominated by the fp32 GEMMs).
"""

from .formats import E2M1, E4M3, E5M2, FORMATS, FloatFormat, round_to_format
from .linear import quantized_linear
from .recipes import RECIPES, LinearQuantizers, RecipeOptions, build_quantizers
from .scaled import (DelayedScaling, NVFP4Quantized, hadamard_matrix, quantize_blocks, quantize_current, quantize_mx,
                     quantize_nvfp4, random_hadamard_transform)

__all__ = [
    "FloatFormat", "E4M3", "E5M2", "E2M1", "FORMATS", "round_to_format", "quantized_linear", "RECIPES",
    "RecipeOptions", "LinearQuantizers", "build_quantizers", "DelayedScaling", "NVFP4Quantized", "quantize_current",
    "quantize_blocks", "quantize_mx", "quantize_nvfp4", "hadamard_matrix", "random_hadamard_transform",
]
