"""Causal depthwise conv1d (+ bias + SiLU) with packed-document resets: the entry the model calls.

``impl`` is ``auto | torch``; in this build both use :func:`kernels.conv1d.reference.causal_conv1d_ref`.
The Triton kernels register here when they land.
"""

from __future__ import annotations

import torch

from .reference import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = ["IMPLS", "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref"]

IMPLS = ("auto", "torch")


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
    return causal_conv1d_ref(x, weight, bias, seq_idx, initial_states, activation, return_final_states)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
