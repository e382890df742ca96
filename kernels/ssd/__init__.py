"""Mamba-2 SSD chunked scan: the one entry the model calls.

``chunk_scan(x, dt, A, B, C, chunk_size, ...)`` dispatches on ``impl``:

- ``"torch"``: :func:`kernels.ssd.reference.ssd_chunk_scan_ref` (autograd through plain torch ops);
- ``"auto"``: the fastest implementation available for the tensors' device. In this build that is the
  torch reference everywhere; the Triton kernels (GPU, and CPU under ``TRITON_INTERPRET=1``) register
  here when they land.
"""

from __future__ import annotations

import math

import torch

from .reference import process_dt, ssd_chunk_scan_ref, ssd_sequential_ref

__all__ = ["IMPLS", "chunk_scan", "resolve_impl", "process_dt", "ssd_chunk_scan_ref", "ssd_sequential_ref"]

IMPLS = ("auto", "torch")


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Map a requested implementation (``auto | torch``) to the concrete one used on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown SSD implementation {impl!r}; expected one of {IMPLS}")
    return "torch"


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
    """SSD scan; see :mod:`kernels.ssd.reference` for the maths, shapes and ``seq_idx`` semantics."""
    resolve_impl(impl, x.device)
    return ssd_chunk_scan_ref(
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
        seq_idx=seq_idx, initial_states=initial_states, return_final_states=return_final_states,
    )
