"""The pure-torch references agree with each other: chunked SSD == sequential scan, conv resets."""

import pytest
import torch

from tandem.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from tandem.kernels.ssd import ssd_chunk_scan_ref, ssd_sequential_ref


def _ssd_inputs(b=2, l=37, h=4, p=3, g=2, n=5, dtype=torch.float32):
    x = torch.randn(b, l, h, p, dtype=dtype)
    dt = torch.randn(b, l, h, dtype=dtype)
    A = -torch.rand(h) * 4 - 0.1
    B = torch.randn(b, l, g, n, dtype=dtype)
    C = torch.randn(b, l, g, n, dtype=dtype)
    D = torch.randn(h)
    dt_bias = torch.randn(h)
    return x, dt, A, B, C, D, dt_bias


SEQ_IDX = torch.tensor([[0] * 8 + [1] * 8 + [2] * 21, [0] * 3 + [1] * 30 + [2] * 4])  # boundaries on chunk edges (8, 16)


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("use_seq_idx", [False, True])
@pytest.mark.parametrize("use_init", [False, True])
def test_chunked_equals_sequential(chunk, use_seq_idx, use_init):
    x, dt, A, B, C, D, dt_bias = _ssd_inputs()
    init = torch.randn(2, 4, 3, 5) if use_init else None
    seq = SEQ_IDX if use_seq_idx else None
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq, initial_states=init, return_final_states=True)
    y1, s1 = ssd_chunk_scan_ref(x, dt, A, B, C, chunk, **kw)
    y2, s2 = ssd_sequential_ref(x, dt, A, B, C, **kw)
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s2, atol=2e-5, rtol=1e-5)


def test_chunked_gradients_equal_sequential():
    inputs = [t.double().requires_grad_() for t in _ssd_inputs(l=19)]
    x, dt, A, B, C, D, dt_bias = inputs
    init = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    seq = SEQ_IDX[:, :19]
    grads = []
    for fn in (lambda **k: ssd_chunk_scan_ref(x, dt, A, B, C, 8, **k), lambda **k: ssd_sequential_ref(x, dt, A, B, C, **k)):
        y, s = fn(D=D, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq, initial_states=init, return_final_states=True)
        w1, w2 = torch.linspace(-1, 1, y.numel()).view_as(y), torch.linspace(1, 2, s.numel()).view_as(s)
        grads.append(torch.autograd.grad((y * w1).sum() + (s * w2).sum(), [*inputs, init]))
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_seq_idx_resets_state_like_separate_sequences():
    x, dt, A, B, C, D, dt_bias = _ssd_inputs(b=1, l=30)
    seq = torch.tensor([[0] * 11 + [1] * 19])
    y = ssd_chunk_scan_ref(x, dt, A, B, C, 8, D=D, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq)
    for sl in (slice(0, 11), slice(11, 30)):
        part = ssd_chunk_scan_ref(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], 8, D=D, dt_bias=dt_bias, dt_softplus=True)
        torch.testing.assert_close(y[:, sl], part, atol=1e-5, rtol=1e-5)


def test_initial_state_continues_a_split_sequence():
    x, dt, A, B, C, D, dt_bias = _ssd_inputs(b=1, l=40)
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=True)
    y, final = ssd_chunk_scan_ref(x, dt, A, B, C, 16, return_final_states=True, **kw)
    y1, s1 = ssd_chunk_scan_ref(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], 16, return_final_states=True, **kw)
    y2, s2 = ssd_chunk_scan_ref(x[:, 23:], dt[:, 23:], A, B[:, 23:], C[:, 23:], 16, initial_states=s1, return_final_states=True, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, final, atol=1e-5, rtol=1e-5)


def test_dt_limit_clamps():
    x, dt, A, B, C, D, _ = _ssd_inputs(b=1, l=9)
    dt_bias = torch.full((4,), -12.0)  # softplus(dt + bias) ≈ 1e-5, below the limit
    y_free = ssd_chunk_scan_ref(x, dt, A, B, C, 8, dt_bias=dt_bias, dt_softplus=True)
    y_clamp = ssd_chunk_scan_ref(x, dt, A, B, C, 8, dt_bias=dt_bias, dt_softplus=True, dt_limit=(1e-3, float("inf")))
    y_seq = ssd_sequential_ref(x, dt, A, B, C, dt_bias=dt_bias, dt_softplus=True, dt_limit=(1e-3, float("inf")))
    assert (y_free - y_clamp).abs().max() > 1e-4
    torch.testing.assert_close(y_clamp, y_seq, atol=1e-6, rtol=1e-5)


def test_ssd_shape_errors():
    x, dt, A, B, C, D, dt_bias = _ssd_inputs()
    with pytest.raises(ValueError, match="nheads"):
        ssd_chunk_scan_ref(x, dt[..., :3], A, B, C, 8)
    with pytest.raises(ValueError, match="non-decreasing"):
        ssd_chunk_scan_ref(x, dt, A, B, C, 8, seq_idx=SEQ_IDX.flip(-1))
    with pytest.raises(ValueError, match="divisible by ngroups"):
        ssd_chunk_scan_ref(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1), 8)


def _conv_naive(x, w, bias, seq_idx):
    b, l, d = x.shape
    K = w.shape[1]
    out = torch.zeros(b, l, d)
    for bi in range(b):
        for t in range(l):
            acc = bias.clone()
            for i in range(K):
                s = t - (K - 1) + i
                if s >= 0 and (seq_idx is None or seq_idx[bi, s] == seq_idx[bi, t]):
                    acc += w[:, i] * x[bi, s]
            out[bi, t] = torch.nn.functional.silu(acc)
    return out


@pytest.mark.parametrize("use_seq_idx", [False, True])
def test_conv1d_matches_naive(use_seq_idx):
    x, w, bias = torch.randn(2, 13, 6), torch.randn(6, 4), torch.randn(6)
    seq = torch.tensor([[0] * 5 + [1] * 1 + [2] * 7, [0] * 13]) if use_seq_idx else None
    out = causal_conv1d_ref(x, w, bias, seq_idx=seq, activation="silu")
    torch.testing.assert_close(out, _conv_naive(x, w, bias, seq), atol=1e-5, rtol=1e-5)


def test_conv1d_state_carry_and_decode_step():
    x, w, bias = torch.randn(2, 10, 6), torch.randn(6, 4), torch.randn(6)
    full = causal_conv1d_ref(x, w, bias, activation="silu")
    first, state = causal_conv1d_ref(x[:, :6], w, bias, activation="silu", return_final_states=True)
    rest = causal_conv1d_ref(x[:, 6:], w, bias, initial_states=state, activation="silu")
    torch.testing.assert_close(torch.cat([first, rest], 1), full)
    # decode token by token from the prefix state
    for t in range(6, 10):
        y, state = causal_conv1d_update_ref(x[:, t], state, w, bias, activation="silu")
        torch.testing.assert_close(y, full[:, t], atol=1e-6, rtol=1e-5)
