"""Launch helpers shared by the Triton ops (SSD scan, conv1d).

Two guards live here so that every launcher behaves the same on a GPU and under the CPU interpreter:

- :func:`device_guard` enters ``torch.cuda.device(...)`` only for CUDA tensors — calling it with a CPU
  tensor (the ``TRITON_INTERPRET=1`` test path) would raise.
- :func:`check_launchable` fails early, with a message that says what to do, when a Triton op is asked to
  run on CPU tensors without the interpreter (Triton cannot compile for the CPU).

Block sizes are chosen by small heuristics instead of ``triton.autotune``: autotuning over several configs
under the interpreter would run every config, and the interpreter is already slow.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

__all__ = ["check_launchable", "device_guard", "interpreting", "pow2_block"]


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for CUDA tensors, a no-op otherwise."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            f"{op}: the Triton implementation needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run on CPU (slow; for tests). Use impl='torch' on CPU."
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: unsupported device {device}")


def pow2_block(n: int, lo: int = 16, hi: int = 64) -> int:
    """Next power of two ≥ ``n``, clamped to ``[lo, hi]`` (``tl.dot`` needs every dimension ≥ 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))
