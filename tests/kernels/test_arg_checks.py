"""Every entry of a kernel refuses a bad argument with the same message: the torch reference, the fast torch
path and the Triton launcher (SSD: also the sequential reference) share one validator per kernel
(``check_scan_args``, ``check_conv1d_args``, ``check_conv1d_update_args``). Arguments are refused before any
work, so the Triton entries raise here with or without the interpreter."""

import pytest
import torch

from tandem.kernels.conv1d import (
    causal_conv1d_fast, causal_conv1d_ref, causal_conv1d_triton, causal_conv1d_update_ref, causal_conv1d_update_triton,
)
from tandem.kernels.ssd import ssd_chunk_scan_fast, ssd_chunk_scan_ref, ssd_chunk_scan_triton, ssd_sequential_ref

b, l, h, p, g, n = 1, 6, 4, 3, 2, 5


def _ssd():
    return dict(x=torch.randn(b, l, h, p), dt=torch.randn(b, l, h), A=-torch.rand(h), B=torch.randn(b, l, g, n),
                C=torch.randn(b, l, g, n), chunk_size=4)


SSD_BAD = {  # name: (changed arguments, the message expected)
    "x rank": (dict(x=torch.randn(b, l, h)), r"x must be \[batch, seqlen, nheads, headdim\]"),
    "dt shape": (dict(dt=torch.randn(b, l, h - 1)), r"dt must be \[batch, seqlen, nheads\] = \(1, 6, 4\), got \(1, 6, 3\)"),
    "A shape": (dict(A=torch.randn(h, 1)), r"A must be \[nheads\]"),
    "B vs C": (dict(C=torch.randn(b, l, g, n + 1)), "B and C must both be"),
    "groups": (dict(B=torch.randn(b, l, 3, n), C=torch.randn(b, l, 3, n)), r"nheads \(4\) must be divisible by ngroups \(3\)"),
    "chunk_size": (dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
    "chunk_size type": (dict(chunk_size=4.0), "chunk_size must be a positive int, got 4.0"),
    "D shape": (dict(D=torch.randn(h + 1)), r"D must be \[nheads\]"),
    "dt_bias shape": (dict(dt_bias=torch.randn(h, 1)), r"dt_bias must be \[nheads\]"),
    "seq_idx dtype": (dict(seq_idx=torch.zeros(b, l)), "seq_idx must be an integer tensor, got torch.float32"),
    "seq_idx shape": (dict(seq_idx=torch.zeros(b, l + 1, dtype=torch.long)), r"seq_idx must be \[batch, seqlen\]"),
    "seq_idx order": (dict(seq_idx=torch.tensor([[1, 1, 0, 0, 0, 0]])), "non-decreasing"),
    "initial_states": (dict(initial_states=torch.randn(b, h, p, n + 1)), r"initial_states must be \[batch, nheads"),
}


@pytest.mark.parametrize("case", list(SSD_BAD))
def test_ssd_entries_refuse_alike(case):
    changed, message = SSD_BAD[case]
    entries = [ssd_chunk_scan_ref, ssd_chunk_scan_fast, ssd_chunk_scan_triton]
    if "chunk_size" not in changed:
        entries.append(lambda chunk_size, **kw: ssd_sequential_ref(**kw))  # no chunks: every other check applies
    errors = []
    for fn in entries:
        with pytest.raises(ValueError, match=message) as e:
            fn(**{**_ssd(), **changed})
        errors.append(str(e.value))
    assert len(set(errors)) == 1, errors


def _conv():
    return dict(x=torch.randn(2, 7, 4), weight=torch.randn(4, 3), bias=torch.randn(4))


CONV_BAD = {
    "x rank": (dict(x=torch.randn(2, 7)), r"x must be \[batch, seqlen, channels\]"),
    "weight": (dict(weight=torch.randn(3, 3)), r"weight must be \[channels=4, kernel\], got \(3, 3\)"),
    "bias": (dict(bias=torch.randn(2)), r"bias must be \[channels\] = \(4,\), got \(2,\)"),
    "seq_idx dtype": (dict(seq_idx=torch.zeros(2, 7)), "seq_idx must be an integer tensor"),
    "seq_idx shape": (dict(seq_idx=torch.zeros(2, 6, dtype=torch.long)), r"seq_idx must be \[batch, seqlen\] = \(2, 7\)"),
    "initial_states": (dict(initial_states=torch.randn(2, 4, 3)), r"initial_states must be \[batch, channels, K-1\] = \(2, 4, 2\)"),
    "activation": (dict(activation="gelu"), "unknown conv1d activation 'gelu'"),
}


@pytest.mark.parametrize("case", list(CONV_BAD))
def test_conv1d_entries_refuse_alike(case):
    changed, message = CONV_BAD[case]
    errors = []
    for fn in (causal_conv1d_ref, causal_conv1d_fast, causal_conv1d_triton):
        with pytest.raises(ValueError, match=message) as e:
            fn(**{**_conv(), **changed})
        errors.append(str(e.value))
    assert len(set(errors)) == 1, errors


UPDATE_BAD = {
    "x rank": (dict(x=torch.randn(2, 1, 4)), r"x must be \[batch, channels\] \(one token\)"),
    "weight": (dict(weight=torch.randn(5, 3)), r"weight must be \[channels=4, kernel\]"),
    "bias": (dict(bias=torch.randn(3)), r"bias must be \[channels\]"),
    "conv_state": (dict(conv_state=torch.randn(2, 4, 3)), r"conv_state must be \[batch, channels, K-1\] = \(2, 4, 2\)"),
    "activation": (dict(activation="relu"), "unknown conv1d activation 'relu'"),
}


@pytest.mark.parametrize("case", list(UPDATE_BAD))
def test_conv1d_update_entries_refuse_alike(case):
    changed, message = UPDATE_BAD[case]
    args = dict(x=torch.randn(2, 4), conv_state=torch.randn(2, 4, 2), weight=torch.randn(4, 3), bias=torch.randn(4))
    errors = []
    for fn in (causal_conv1d_update_ref, causal_conv1d_update_triton):
        with pytest.raises(ValueError, match=message) as e:
            fn(**{**args, **changed})
        errors.append(str(e.value))
    assert len(set(errors)) == 1, errors
