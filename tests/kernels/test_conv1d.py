"""Triton causal depthwise conv1d (``tandem.kernels.conv1d``) vs the torch reference: outputs, final conv states and
the gradients of x, weight, bias and initial_states, with and without packed-document resets.

Tolerances: fp32 1e-5 absolute / 1e-5 relative (the same K-term sums in another order); fp16 inputs
(fp32 accumulation in both, output rounded to fp16) 2e-3 / 2e-3. bf16 runs only on the GPU.
Where CUDA is present the same tests run the compiled kernels on the GPU (``DEVICE``).
"""

import pytest
import torch

from tandem.kernels.conv1d import (
    causal_conv1d, causal_conv1d_ref, causal_conv1d_triton, causal_conv1d_update, causal_conv1d_update_ref,
    causal_conv1d_update_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _run(fn, x, w, bias, seq, init, act):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, bias, init)]
    out, final = fn(leaves[0], leaves[1], leaves[2], seq, leaves[3], act, True)
    gen = torch.Generator().manual_seed(1)
    wo = torch.randn(out.shape, generator=gen).to(out.device)
    wf = torch.randn(final.shape, generator=gen).to(out.device)
    ((out.float() * wo).sum() + (final.float() * wf).sum()).backward()
    return out.detach(), final.detach(), [t.grad if t is not None else None for t in leaves]


def _check(x, w, bias, seq, init, act):
    x, w, bias, seq, init = (t.to(DEVICE) if t is not None else None for t in (x, w, bias, seq, init))
    got = _run(causal_conv1d_triton, x, w, bias, seq, init, act)
    want = _run(causal_conv1d_ref, x, w, bias, seq, init, act)
    tol = TOL[x.dtype]
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    for name, g1, g2 in zip(("x", "weight", "bias", "initial_states"), got[2], want[2]):
        if g2 is None:
            assert g1 is None
            continue
        assert g1 is not None and g1.dtype == g2.dtype, name
        torch.testing.assert_close(g1.float(), g2.float(), **tol, msg=lambda m, n=name: f"d{name}: {m}")


@pytest.mark.parametrize("use_seq", [False, True])
@pytest.mark.parametrize("act", [None, "silu"])
def test_triton_matches_reference(use_seq, act):
    b, l, d, K = 2, 19, 13, 4
    x, w, bias, init = torch.randn(b, l, d), torch.randn(d, K), torch.randn(d), torch.randn(b, d, K - 1)
    # Row 0: documents start at 1 (inside the initial-state window), 5 and 6 (a one-token document);
    # row 1: one document, so the initial state reaches tokens 0..K-2.
    seq = torch.tensor([[0] + [1] * 4 + [2] + [3] * 13, [0] * 19]) if use_seq else None
    _check(x, w, bias, seq, init, act)


def test_triton_without_bias_or_initial_state():
    _check(torch.randn(1, 40, 70), torch.randn(70, 3), None, torch.tensor([[0] * 33 + [1] * 7]), None, "silu")


def test_triton_sequence_shorter_than_kernel():
    """l < K − 1: the final conv state still holds part of the initial state."""
    _check(torch.randn(2, 2, 5), torch.randn(5, 4), torch.randn(5), None, torch.randn(2, 5, 3), "silu")


def test_triton_fp16():
    x, w, bias = torch.randn(1, 17, 9).half(), torch.randn(9, 4), torch.randn(9)
    _check(x, w, bias, torch.tensor([[0] * 6 + [1] * 11]), None, "silu")


def test_public_entry_and_errors():
    x, w, bias = torch.randn(1, 7, 4, device=DEVICE), torch.randn(4, 4, device=DEVICE), torch.randn(4, device=DEVICE)
    ref = causal_conv1d_ref(x, w, bias, activation="silu")
    torch.testing.assert_close(causal_conv1d(x, w, bias, activation="silu", impl="triton"), ref, **TOL[torch.float32])
    # "auto": Triton for CUDA tensors, otherwise the fast torch path (kernels/conv1d/fast.py), which sums the
    # K taps in another order than the reference: equal within fp32 rounding
    auto = causal_conv1d(x, w, bias, activation="silu", impl="auto")
    torch.testing.assert_close(auto, ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="unknown conv1d implementation"):
        causal_conv1d(x, w, impl="cuda")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_triton(x, w, activation="gelu")
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d_triton(x, w[:3])
    with pytest.raises(ValueError, match="bias must be"):
        causal_conv1d_triton(x, w, bias[:2])
    with pytest.raises(ValueError, match="initial_states must be"):
        causal_conv1d_triton(x, w, initial_states=torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="seq_idx must be"):
        causal_conv1d_triton(x, w, seq_idx=torch.zeros(1, 6, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_update_matches_reference_and_continues_the_sequence(dtype):
    b, l, d, K = 2, 9, 11, 4
    x = torch.randn(b, l, d, device=DEVICE).to(dtype)
    w, bias = torch.randn(d, K, device=DEVICE), torch.randn(d, device=DEVICE)
    full = causal_conv1d_ref(x, w, bias, activation="silu")
    _, state = causal_conv1d_ref(x[:, :5], w, bias, activation="silu", return_final_states=True)
    state_before = state.clone()
    for t in range(5, l):
        y, new_state = causal_conv1d_update_triton(x[:, t], state, w, bias, activation="silu")
        y_r, new_state_r = causal_conv1d_update_ref(x[:, t], state, w, bias, activation="silu")
        torch.testing.assert_close(y, y_r, **TOL[dtype])
        torch.testing.assert_close(new_state, new_state_r, atol=0, rtol=0)  # a copy of inputs: exact
        torch.testing.assert_close(y, full[:, t], **TOL[dtype])
        if t == 5:
            assert torch.equal(state, state_before)  # not modified in place
        state = new_state
    y_none, _ = causal_conv1d_update_triton(x[:, 0], state, w, None, activation=None)
    torch.testing.assert_close(y_none, causal_conv1d_update_ref(x[:, 0], state, w, None, None)[0], **TOL[dtype])


def test_decode_update_dispatch_and_errors():
    x, state, w = torch.randn(1, 4, device=DEVICE), torch.randn(1, 4, 3, device=DEVICE), torch.randn(4, 4, device=DEVICE)
    y_auto, _ = causal_conv1d_update(x, state, w, impl="auto")
    y_ref, _ = causal_conv1d_update_ref(x, state, w)
    if DEVICE == "cpu":
        assert torch.equal(y_auto, y_ref)  # auto = the reference on CPU
    torch.testing.assert_close(causal_conv1d_update(x, state, w, impl="triton")[0], y_ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="no backward"):
        causal_conv1d_update_triton(x, state, w.clone().requires_grad_())
    with pytest.raises(ValueError, match="conv_state must be"):
        causal_conv1d_update_triton(x, state[..., :2], w)
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d_update_triton(x[None], state, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_matches_reference(dtype):
    b, l, d, K = 2, 1000, 384, 4
    x = torch.randn(b, l, d, device="cuda").to(dtype)
    w, bias = torch.randn(d, K, device="cuda"), torch.randn(d, device="cuda")
    init = torch.randn(b, d, K - 1, device="cuda").to(dtype)
    seq = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    seq[0, 300:] += 1
    seq[0, 301:] += 1
    seq[1, 512:] += 1
    _check(x, w, bias, seq, init, "silu")
