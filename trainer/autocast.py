"""The forward-pass numerics context shared by the loop and stages that run their own forwards (GRPO's
old-logprob pass): bf16 autocast on CUDA for ``auto``/``bf16``, fp32 on CPU."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["LOW_PRECISION", "autocast_context"]

#: low-precision recipes (model.precision): their GEMMs quantize inside the model; the rest of the network
#: runs like ``auto`` — bf16 autocast on CUDA, fp32 on CPU
LOW_PRECISION = ("fp8_delayed", "fp8_current", "fp8_block", "mxfp8", "nvfp4")


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CUDA for ``auto``/``bf16``; fp32 on CPU unless bf16 is asked for explicitly."""
    if precision in LOW_PRECISION:
        precision = "auto"
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision in ("auto", "bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision.name must be auto, fp32, bf16 or one of {LOW_PRECISION}, got {precision!r}")
