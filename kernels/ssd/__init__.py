"""Mamba-2 SSD chunked scan: the one entry the model calls.

``chunk_scan(x, dt, A, B, C, chunk_size, ...)`` dispatches on ``impl``:

- ``"torch"``: :func:`tandem.kernels.ssd.fast.ssd_chunk_scan_fast`, plain torch with a custom backward for the
  intra-chunk block; equal (tested) to the readable :func:`tandem.kernels.ssd.reference.ssd_chunk_scan_ref`,
  which stays the definition and the oracle of every other implementation;
- ``"triton"``: :func:`tandem.kernels.ssd.ssd_triton.ssd_chunk_scan_triton` (Triton kernels forward and backward;
  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` for tests);
- ``"auto"``: Triton for CUDA tensors, torch otherwise.

The concrete implementation chosen for each (request, device type) is logged once at INFO level.
"""

from __future__ import annotations

import logging
import math

import torch

from .fast import ssd_chunk_scan_fast
from .reference import process_dt, ssd_chunk_scan_ref, ssd_sequential_ref
from .ssd_triton import ssd_chunk_scan_triton

__all__ = [
    "IMPLS", "chunk_scan", "resolve_impl", "process_dt", "ssd_chunk_scan_fast", "ssd_chunk_scan_ref", "ssd_chunk_scan_triton",
    "ssd_sequential_ref",
]

IMPLS = ("auto", "torch", "triton")

logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Map a requested implementation (``auto | torch | triton``) to the concrete one used on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown SSD implementation {impl!r}; expected one of {IMPLS}")
    dev_type = torch.device(device).type
    concrete = ("triton" if dev_type == "cuda" else "torch") if impl == "auto" else impl
    if (impl, dev_type) not in _logged and not torch.compiler.is_compiling():  # logging breaks a compiled graph
        _logged.add((impl, dev_type))
        logger.info("SSD scan: impl=%r on %s -> %s", impl, dev_type, concrete)
    return concrete


def chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    impl: str = "auto",
):
    """SSD scan; see :mod:`tandem.kernels.ssd.reference` for the maths, shapes and ``seq_idx`` semantics."""
    fn = ssd_chunk_scan_triton if resolve_impl(impl, x.device) == "triton" else ssd_chunk_scan_fast
    return fn(
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        seq_idx=seq_idx, initial_states=initial_states, return_final_states=return_final_states,
    )
