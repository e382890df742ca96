"""Pure-torch reference for the causal depthwise conv1d of the Mamba-2 mixer.

``out[t, d] = act(bias[d] + Σ_{i<K} w[d, i] · x[t - (K-1) + i, d])`` where inputs before the sequence come
from ``initial_states`` (zeros if absent) and, with ``seq_idx``, inputs from another document count as 0 —
the conv window restarts at every packed document's first token.

Layout is channels-last (``x [b, l, d]``), the layout of the mixer's ``in_proj`` output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_ref", "causal_conv1d_update_ref"]

ACTIVATIONS = {None: lambda t: t, "silu": F.silu, "swish": F.silu}


def activation_fn(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown conv1d activation {name!r}; expected one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the torch paths compute in: the weight's, or at least fp32 for half inputs."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    return torch.promote_types(weight.dtype, torch.float32) if half else weight.dtype


def _check_weight_bias(weight, bias, d: int) -> int:
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be [channels={d}, kernel], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"bias must be [channels] = ({d},), got {tuple(bias.shape)}")
    return weight.shape[1]


def check_conv1d_args(x, weight, bias, seq_idx, initial_states, activation):
    """Validate the arguments of a causal conv1d over a sequence; returns ``(b, l, d, K)``.

    The one validator of every entry (this reference, the fast torch path, the Triton launcher), so each
    refuses a bad argument with the same message.
    """
    activation_fn(activation)
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, seqlen, channels], got shape {tuple(x.shape)}")
    b, l, d = x.shape
    K = _check_weight_bias(weight, bias, d)
    if seq_idx is not None:
        if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be an integer tensor, got {seq_idx.dtype}")
        if seq_idx.shape != (b, l):
            raise ValueError(f"seq_idx must be [batch, seqlen] = {(b, l)}, got {tuple(seq_idx.shape)}")
    if initial_states is not None and initial_states.shape != (b, d, K - 1):
        raise ValueError(f"initial_states must be [batch, channels, K-1] = {(b, d, K - 1)}, got {tuple(initial_states.shape)}")
    return b, l, d, K


def check_conv1d_update_args(x, conv_state, weight, bias, activation):
    """Validate the arguments of one decoding step (:func:`causal_conv1d_update_ref` and its Triton kernel);
    returns ``(b, d, K)``."""
    activation_fn(activation)
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, channels] (one token), got shape {tuple(x.shape)}")
    b, d = x.shape
    K = _check_weight_bias(weight, bias, d)
    if conv_state.shape != (b, d, K - 1):
        raise ValueError(f"conv_state must be [batch, channels, K-1] = {(b, d, K - 1)}, got {tuple(conv_state.shape)}")
    return b, d, K


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    activation: str | None = None,
    return_final_states: bool = False,
):
    """x [b, l, d], weight [d, K], bias [d], seq_idx [b, l], initial_states [b, d, K-1].

    Returns ``out`` [b, l, d] in ``x.dtype`` (computed in ``weight``'s dtype, or fp32 for half inputs), or
    ``(out, final_states)`` where ``final_states`` [b, d, K-1] are the last K-1 *inputs* — the conv
    window a decoder continues from.
    """
    b, l, d, K = check_conv1d_args(x, weight, bias, seq_idx, initial_states, activation)
    act = activation_fn(activation)
    cd = compute_dtype(x, weight)
    xt = x.transpose(1, 2).to(cd)  # [b, d, l]
    if initial_states is None:
        prefix = xt.new_zeros(b, d, K - 1)
    else:
        prefix = initial_states.to(cd)
    xp = torch.cat([prefix, xt], dim=-1)  # [b, d, l + K - 1]
    w = weight.to(cd)
    bias_c = bias.to(cd) if bias is not None else None
    if seq_idx is None:
        out = F.conv1d(xp, w.unsqueeze(1), bias_c, groups=d)
    else:
        # Tap i reads x[t - (K-1) + i]; it contributes only if that token is in t's document. The prefix
        # (initial state) belongs to the document of token 0.
        seq_p = torch.cat([seq_idx[:, :1].expand(b, K - 1), seq_idx], dim=1)
        out = xt.new_zeros(b, d, l) if bias_c is None else bias_c[None, :, None].expand(b, d, l).clone()
        for i in range(K):
            same = (seq_p[:, i : i + l] == seq_idx).to(cd)[:, None, :]
            out = out + w[None, :, i, None] * xp[:, :, i : i + l] * same
    out = act(out).transpose(1, 2).to(x.dtype)
    if return_final_states:
        return out, xp[:, :, xp.shape[-1] - (K - 1) :].to(x.dtype)
    return out


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
):
    """One decoding step. x [b, d] (the new token), conv_state [b, d, K-1] (the previous K-1 inputs).

    Returns ``(out [b, d], new_conv_state [b, d, K-1])``; the state is not modified in place.
    """
    check_conv1d_update_args(x, conv_state, weight, bias, activation)
    act = activation_fn(activation)
    window = torch.cat([conv_state.to(weight.dtype), x.to(weight.dtype)[:, :, None]], dim=-1)  # [b, d, K]
    out = (window * weight[None]).sum(-1)
    if bias is not None:
        out = out + bias
    return act(out).to(x.dtype), window[:, :, 1:].to(conv_state.dtype)
