"""Causal depthwise conv1d (+ bias + SiLU) with packed-document resets: the entry the model calls.

``impl``: ``"torch"`` is :func:`tandem.kernels.conv1d.fast.causal_conv1d_fast` (channels-last, hand-written
backward; tested equal to the readable :func:`tandem.kernels.conv1d.reference.causal_conv1d_ref`); ``"triton"`` is
:func:`tandem.kernels.conv1d.conv1d_triton.causal_conv1d_triton` (Triton forward and backward; CUDA tensors, or CPU
under ``TRITON_INTERPRET=1``); ``"auto"`` is Triton for CUDA tensors and torch otherwise.
The single-step decode update (:func:`causal_conv1d_update`) takes the same ``impl`` choice; its Triton
kernel is forward-only (decoding), one launch instead of torch's cat / multiply / sum / SiLU.
"""

from __future__ import annotations

import torch

from .conv1d_triton import causal_conv1d_triton, causal_conv1d_update_triton
from .fast import causal_conv1d_fast
from .reference import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = [
    "IMPLS", "causal_conv1d", "causal_conv1d_fast", "causal_conv1d_ref", "causal_conv1d_triton", "causal_conv1d_update",
    "causal_conv1d_update_ref", "causal_conv1d_update_triton",
]

IMPLS = ("auto", "torch", "triton")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    activation: str | None = None,
    return_final_states: bool = False,
    impl: str = "auto",
):
    if impl not in IMPLS:
        raise ValueError(f"unknown conv1d implementation {impl!r}; expected one of {IMPLS}")
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda)
    fn = causal_conv1d_triton if use_triton else causal_conv1d_fast
    return fn(x, weight, bias, seq_idx, initial_states, activation, return_final_states)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, impl: str = "auto"):
    if impl not in IMPLS:
        raise ValueError(f"unknown conv1d implementation {impl!r}; expected one of {IMPLS}")
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda)
    fn = causal_conv1d_update_triton if use_triton else causal_conv1d_update_ref
    return fn(x, conv_state, weight, bias, activation)
