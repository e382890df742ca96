"""Triton SSD scan (``tandem.kernels.ssd``) vs the torch references: every step, the whole scan, every gradient.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``), so shapes are tiny.
Tolerances (absolute, relative), for outputs and gradients of magnitude ≲ 50:
- fp32 Triton vs the chunked reference (same algorithm, different summation order): 1e-4, 1e-4;
- fp32 Triton vs the sequential scan (a different algorithm): 5e-4, 5e-4;
- fp16 inputs (fp32 accumulation in both), vs the reference on the same fp16 inputs: outputs are rounded to
  fp16 (≈ 1e-3 relative), so 2e-2, 1e-2.
bf16 is never tested under the interpreter (its bf16 arithmetic is wrong); the GPU tests cover it.
Where CUDA is present the same tests run the compiled kernels on the GPU (``DEVICE``).
"""

import math

import pytest
import torch

from tandem.kernels.ssd import chunk_scan, resolve_impl, ssd_chunk_scan_ref, ssd_chunk_scan_triton, ssd_sequential_ref
from tandem.kernels.ssd.bmm_chunk import bmm_chunk_fwd, bmm_chunk_ref
from tandem.kernels.ssd.chunk_cumsum import chunk_cumsum_fwd, chunk_cumsum_ref
from tandem.kernels.ssd.chunk_output import chunk_scan_fwd, chunk_scan_ref
from tandem.kernels.ssd.chunk_state import (
    chunk_state_fwd, chunk_state_ref, off_state_grad, off_state_grad_ref, state_passing_fwd, state_passing_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)
TOL = {"ref": dict(atol=1e-4, rtol=1e-4), "seq": dict(atol=5e-4, rtol=5e-4), "fp16": dict(atol=2e-2, rtol=1e-2)}
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


def _inputs(b, l, h, p, g, n, dtype=torch.float32, D_shape="h", device=DEVICE):
    x = torch.randn(b, l, h, p)
    dt = torch.randn(b, l, h) - 1.0
    A = -torch.rand(h) * 2 - 0.2
    B = torch.randn(b, l, g, n)
    C = torch.randn(b, l, g, n)
    D = torch.randn(h) if D_shape == "h" else torch.randn(h, p)
    dt_bias = torch.randn(h) * 0.5
    init = torch.randn(b, h, p, n)
    # Activations in the input dtype, parameters (A, D, dt_bias) and the incoming state in fp32, as in the model.
    cast = lambda t, dt_: t.to(device=device, dtype=dt_)  # noqa: E731
    return dict(x=cast(x, dtype), dt=cast(dt, dtype), A=cast(A, torch.float32), B=cast(B, dtype), C=cast(C, dtype),
                D=cast(D, torch.float32), dt_bias=cast(dt_bias, torch.float32), initial_states=cast(init, torch.float32))


def _docs(b, l, boundaries, device=DEVICE):
    """seq_idx [b, l] with new documents starting at the given positions (one list per row)."""
    seq = torch.zeros(b, l, dtype=torch.int64)
    for r, starts in enumerate(boundaries):
        for s in starts:
            seq[r, s:] += 1
    return seq.to(device)


def _run(fn, inp, chunk, use, seq_idx, dt_softplus=True, dt_limit=(0.0, math.inf), chunked=True):
    """Forward + backward of ``fn`` with fixed output weights; returns (y, final, {name: grad})."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if k in use or k in ("x", "dt", "A", "B", "C")}
    kw = dict(D=leaves.get("D"), dt_bias=leaves.get("dt_bias"), dt_softplus=dt_softplus, dt_limit=dt_limit,
              seq_idx=seq_idx, initial_states=leaves.get("initial_states"), return_final_states=True)
    args = (leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"])
    y, final = fn(*args, chunk, **kw) if chunked else fn(*args, **kw)
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=gen).to(y.device)
    wf = torch.randn(final.shape, generator=gen).to(y.device)
    ((y.float() * wy).sum() + (final * wf).sum()).backward()
    return y.detach(), final.detach(), {k: v.grad for k, v in leaves.items()}


def _compare(got, want, tol, what):
    y1, f1, g1 = got
    y2, f2, g2 = want
    torch.testing.assert_close(y1.float(), y2.float(), **tol, msg=lambda m: f"y vs {what}: {m}")
    torch.testing.assert_close(f1, f2, **tol, msg=lambda m: f"final states vs {what}: {m}")
    assert g1.keys() == g2.keys()
    for k in g1:
        assert g1[k] is not None, f"no gradient for {k}"
        torch.testing.assert_close(g1[k].float(), g2[k].float(), **tol, msg=lambda m, k=k: f"d{k} vs {what}: {m}")


# ----------------------------------------------------------------------------------------------------- cases
# (b, l, h, p, g, n, chunk, boundaries, optional inputs, dt_limit)
CASES = {
    # several documents per row, one boundary exactly on a chunk boundary (8 and 16), l = 29 not a multiple of
    # 8, grouped B/C (h = 4, g = 2), an incoming state, D and dt_bias.
    "packed_init_grouped": (2, 29, 4, 6, 2, 5, 8, [[8, 13, 16], [3, 24]], GRAD_NAMES, (0.0, math.inf)),
    # nothing optional: no seq_idx, no initial state, no D / dt_bias; h = g; a chunk size that is not a power
    # of two (12) and a last chunk of a single token.
    "plain": (1, 37, 2, 5, 2, 3, 12, None, ("x", "dt", "A", "B", "C"), (0.0, math.inf)),
    # a single group shared by 3 heads, D per (head, channel), dt clamped from both sides, a document
    # starting at token 1 and one ending on the last token of a chunk.
    "clamped_single_group": (1, 19, 3, 4, 1, 6, 8, [[1, 16]], GRAD_NAMES, (0.3, 1.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_and_sequential(case):
    b, l, h, p, g, n, chunk, bounds, use, limit = CASES[case]
    inp = _inputs(b, l, h, p, g, n, D_shape="hp" if case == "clamped_single_group" else "h")
    seq = _docs(b, l, bounds) if bounds is not None else None
    got = _run(ssd_chunk_scan_triton, inp, chunk, use, seq, dt_limit=limit)
    _compare(got, _run(ssd_chunk_scan_ref, inp, chunk, use, seq, dt_limit=limit), TOL["ref"], "chunked reference")
    _compare(got, _run(ssd_sequential_ref, inp, chunk, use, seq, dt_limit=limit, chunked=False), TOL["seq"],
             "sequential scan")
    if limit[0] > 0:  # the clamp really is active on both sides in this case (else the test proves less)
        v = torch.nn.functional.softplus(inp["dt"] + inp["dt_bias"])
        assert (v < limit[0]).any() and (v > limit[1]).any()


def test_triton_fp16_inputs():
    inp = _inputs(1, 21, 4, 6, 2, 5, dtype=torch.float16)
    seq = _docs(1, 21, [[8]])
    got = _run(ssd_chunk_scan_triton, inp, 8, GRAD_NAMES, seq)
    assert got[0].dtype == torch.float16 and got[2]["x"].dtype == torch.float16 and got[2]["B"].dtype == torch.float16
    _compare(got, _run(ssd_chunk_scan_ref, inp, 8, GRAD_NAMES, seq), TOL["fp16"], "chunked reference (fp16)")


def test_state_carry_across_calls_matches_one_call():
    """Context-parallel use: the final state of one slice, passed as the next slice's initial state."""
    inp = _inputs(1, 24, 2, 4, 1, 3)
    x, dt, A, B, C = (inp[k] for k in ("x", "dt", "A", "B", "C"))
    kw = dict(dt_bias=inp["dt_bias"], dt_softplus=True, return_final_states=True)
    y, final = ssd_chunk_scan_triton(x, dt, A, B, C, 8, **kw)
    y1, s1 = ssd_chunk_scan_triton(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], 8, **kw)
    y2, s2 = ssd_chunk_scan_triton(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], 8, initial_states=s1, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, **TOL["ref"])
    torch.testing.assert_close(s2, final, **TOL["ref"])


# ------------------------------------------------------------------------------------------------ each step
@pytest.mark.parametrize("use_seq", [False, True])
def test_each_step_matches_its_reference(use_seq):
    b, l, h, p, g, n, Q = 2, 21, 4, 3, 2, 5, 8
    inp = _inputs(b, l, h, p, g, n)
    seq = _docs(b, l, [[8, 11], [5]]) if use_seq else None
    x, dt, A, B, C = (inp[k] for k in ("x", "dt", "A", "B", "C"))
    tol = TOL["ref"]
    # 1. dt processing and dA_cumsum (clamp on, so both its branches run).
    dtp, cs = chunk_cumsum_fwd(dt, A, Q, inp["dt_bias"], True, (0.1, 2.0))
    dtp_r, cs_r = chunk_cumsum_ref(dt, A, Q, inp["dt_bias"], True, (0.1, 2.0))
    torch.testing.assert_close(dtp, dtp_r, **tol)
    torch.testing.assert_close(cs, cs_r, **tol)
    # 2a. C·Bᵀ per chunk and group.
    CB = bmm_chunk_fwd(C, B, Q)
    torch.testing.assert_close(CB, bmm_chunk_ref(C, B, Q), **tol)
    # 3. chunk states, and the same kernel in its backward role.
    states = chunk_state_fwd(x, B, dtp, cs, Q, seq)
    torch.testing.assert_close(states, chunk_state_ref(x, B, dtp, cs, Q, seq), **tol)
    torch.testing.assert_close(off_state_grad(x, C, cs, Q, seq), off_state_grad_ref(x, C, cs, Q, seq), **tol)
    # 4. state passing with an incoming state.
    S_in, final = state_passing_fwd(states, cs, Q, l, seq, inp["initial_states"])
    S_in_r, final_r = state_passing_ref(states, cs, Q, l, seq, inp["initial_states"])
    torch.testing.assert_close(S_in, S_in_r, **tol)
    torch.testing.assert_close(final, final_r, **tol)
    # 5. chunk output.
    y_r = chunk_scan_ref(CB, x, dtp, cs, C, S_in, Q, inp["D"], seq)
    torch.testing.assert_close(chunk_scan_fwd(CB, x, dtp, cs, C, S_in, Q, inp["D"], seq), y_r, **tol)
    if use_seq and DEVICE == "cpu":  # rows in blocks of 4 (so the diagonal loop's bound differs per block);
        # interpreter only: compiled tl.dot needs blocks of at least 16.
        torch.testing.assert_close(chunk_scan_fwd(CB, x, dtp, cs, C, S_in, Q, inp["D"], seq, block_m=4), y_r, **tol)


@pytest.mark.parametrize("use_seq", [False, True])
def test_step_references_compose_to_the_reference(use_seq):
    """The per-step torch references (pure torch, fast) chain into exactly ``ssd_chunk_scan_ref``."""
    b, l, h, p, g, n, Q = 2, 27, 4, 3, 2, 5, 8
    inp = _inputs(b, l, h, p, g, n)
    seq = _docs(b, l, [[8, 16], [3, 26]]) if use_seq else None
    x, dt, A, B, C = (inp[k] for k in ("x", "dt", "A", "B", "C"))
    dtp, cs = chunk_cumsum_ref(dt, A, Q, inp["dt_bias"], True)
    states = chunk_state_ref(x, B, dtp, cs, Q, seq)
    S_in, final = state_passing_ref(states, cs, Q, l, seq, inp["initial_states"])
    y = chunk_scan_ref(bmm_chunk_ref(C, B, Q), x, dtp, cs, C, S_in, Q, inp["D"], seq)
    y_r, final_r = ssd_chunk_scan_ref(x, dt, A, B, C, Q, D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True,
                                      seq_idx=seq, initial_states=inp["initial_states"], return_final_states=True)
    torch.testing.assert_close(y, y_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_r, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ dispatch and errors
def test_impl_resolution():
    assert resolve_impl("auto", "cpu") == "torch"
    assert resolve_impl("auto", "cuda") == "triton"
    assert resolve_impl("triton", "cpu") == "triton"
    assert resolve_impl("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="unknown SSD implementation"):
        resolve_impl("cuda", "cpu")


def test_public_entry_dispatches_to_triton():
    inp = _inputs(1, 10, 2, 3, 1, 4)
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    y_t = chunk_scan(*args, 8, D=inp["D"], impl="triton")
    y_r = chunk_scan(*args, 8, D=inp["D"], impl="torch")
    torch.testing.assert_close(y_t, y_r, **TOL["ref"])
    # "auto" is the torch reference for CPU tensors (bit-identical) and Triton for CUDA tensors.
    y_auto = chunk_scan(*args, 8, D=inp["D"], impl="auto")
    assert torch.equal(y_auto, y_t if DEVICE == "cuda" else y_r)


def test_triton_argument_errors(monkeypatch):
    inp = _inputs(1, 10, 2, 3, 1, 4, device="cpu")
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    with pytest.raises(ValueError, match="D must be"):
        ssd_chunk_scan_triton(*args, 8, D=torch.ones(3))
    with pytest.raises(ValueError, match="dt_bias must be"):
        ssd_chunk_scan_triton(*args, 8, dt_bias=torch.ones(2, 1))
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunk_scan_triton(*args, 0)
    with pytest.raises(ValueError, match="integer"):
        ssd_chunk_scan_triton(*args, 8, seq_idx=torch.zeros(1, 10))
    with pytest.raises(ValueError, match="nheads"):
        ssd_chunk_scan_triton(inp["x"], inp["dt"][..., :1], *args[2:], 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ssd_chunk_scan_triton(*args, 8)


# --------------------------------------------------------------------------------------------- whole model
def test_whole_model_gradients_triton_equal_torch():
    from tandem.model import HybridConfig, HybridLM

    torch.manual_seed(0)
    ref = HybridLM(HybridConfig.preset("tiny", ssd_impl="torch")).to(DEVICE)
    tri = HybridLM(HybridConfig.preset("tiny", ssd_impl="triton")).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, ref.config.vocab_size, (2, 21), device=DEVICE)
    seq = _docs(2, 21, [[16], [5, 12]])  # one boundary on the chunk edge (chunk_size 16)
    losses = []
    for m in (ref, tri):
        logits = m(ids, seq_idx=seq)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    n_ssd = 0
    for (name, p_ref), (_, p_tri) in zip(ref.named_parameters(), tri.named_parameters()):
        assert p_ref.grad is not None and p_tri.grad is not None, name
        torch.testing.assert_close(p_tri.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        n_ssd += name.endswith(("A_log", "dt_bias", ".D"))
    assert n_ssd > 0  # the SSD's own parameters were compared


# ---------------------------------------------------------------------------------------------- GPU, compiled
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_matches_reference(dtype):
    b, l, h, p, g, n, Q = 2, 300, 8, 64, 2, 64, 64
    inp = _inputs(b, l, h, p, g, n, dtype=dtype, device="cuda")
    seq = _docs(b, l, [[64, 100, 200], [17]])
    got = _run(ssd_chunk_scan_triton, inp, Q, GRAD_NAMES, seq)
    want = _run(ssd_chunk_scan_ref, inp, Q, GRAD_NAMES, seq)
    # fp32 uses exact fp32 dots; bf16 inputs go through tf32 tensor-core dots and bf16 outputs. Gradients of
    # dt / A / dt_bias sum many terms, hence relative tolerances against their magnitude.
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got[0].float(), want[0].float(), **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    for k in got[2]:
        scale = want[2][k].float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(got[2][k].float() / scale, want[2][k].float() / scale, **tol, msg=lambda m, k=k: f"d{k}: {m}")


@pytest.mark.parametrize("use_seq, Q, l, block", [(False, 8, 21, None), (True, 8, 21, None), (True, 40, 50, 16)])
def test_each_backward_step_matches_autograd_of_its_reference(use_seq, Q, l, block):
    """The backward kernels one by one, each against autograd through the matching per-step reference.
    The last case (chunk 40 in blocks of 16, not a power of two) runs the kernels' multi-block loops."""
    from tandem.kernels.ssd.chunk_cumsum import chunk_cumsum_bwd
    from tandem.kernels.ssd.chunk_output import chunk_scan_bwd
    from tandem.kernels.ssd.chunk_state import state_passing_bwd

    b, h, p, g, n = 2, 4, 3, 2, 5
    inp = _inputs(b, l, h, p, g, n)
    seq = _docs(b, l, [[8, 11, 40], [5, 17]]) if use_seq else None
    nc = -(-l // Q)
    tol = TOL["ref"]
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731

    # Step 1 backward: d dt, dA, d dt_bias from (d dt', d dA_cumsum); clamp active.
    dt, A, bias = leaf(inp["dt"]), leaf(inp["A"]), leaf(inp["dt_bias"])
    dtp_r, cs_r = chunk_cumsum_ref(dt, A, Q, bias, True, (0.1, 2.0))
    g_dtp, g_cs = torch.randn_like(dtp_r), torch.randn_like(cs_r)
    torch.autograd.backward([dtp_r, cs_r], [g_dtp, g_cs])
    dtp, cs = chunk_cumsum_fwd(inp["dt"], inp["A"], Q, inp["dt_bias"], True, (0.1, 2.0))
    ddt, dA, dbias = chunk_cumsum_bwd(g_dtp, g_cs, inp["dt"], inp["A"], dtp, Q, inp["dt_bias"], True, (0.1, 2.0))
    torch.testing.assert_close(ddt, dt.grad, **tol)
    torch.testing.assert_close(dA, A.grad, **tol)
    torch.testing.assert_close(dbias, bias.grad, **tol)

    # Step 4 backward: reverse state passing.
    states, cs_l, init = leaf(torch.randn(b, nc, h, p, n, device=DEVICE)), leaf(cs.detach()), leaf(inp["initial_states"])
    S_in_r, final_r = state_passing_ref(states, cs_l, Q, l, seq, init)
    g_S_in, g_final = torch.randn_like(S_in_r), torch.randn_like(final_r)
    torch.autograd.backward([S_in_r, final_r], [g_S_in, g_final])
    dstates, dinit, dcs_end = state_passing_bwd(g_S_in, S_in_r.detach(), cs, Q, l, seq, g_final, True)
    torch.testing.assert_close(dstates, states.grad, **tol)
    torch.testing.assert_close(dinit, init.grad, **tol)
    torch.testing.assert_close(dcs_end, cs_l.grad[..., -1], **tol)
    assert torch.all(cs_l.grad[..., :-1] == 0)  # state passing reads only each chunk's total decay

    # Steps 2, 3 and 5 backward (the fused chunk kernel), given d states and the incoming states S_in.
    x, B, C, D = leaf(inp["x"]), leaf(inp["B"]), leaf(inp["C"]), leaf(inp["D"])
    dtp_l, cs_l, S_in = leaf(dtp), leaf(cs), S_in_r.detach()
    y = chunk_scan_ref(bmm_chunk_ref(C, B, Q), x, dtp_l, cs_l, C, S_in, Q, D, seq)
    st = chunk_state_ref(x, B, dtp_l, cs_l, Q, seq)
    dy, dst = torch.randn_like(y), torch.randn_like(st)
    torch.autograd.backward([y, st], [dy, dst])
    CB = bmm_chunk_fwd(inp["C"], inp["B"], Q)
    dx, ddtp, dcs, dD, dB_h, dC_h = chunk_scan_bwd(dy, inp["x"], dtp, cs, CB, inp["B"], inp["C"], S_in, dst, Q,
                                                   inp["D"], seq, block=block)
    torch.testing.assert_close(dx, x.grad, **tol)
    torch.testing.assert_close(ddtp, dtp_l.grad, **tol)
    torch.testing.assert_close(dcs, cs_l.grad, **tol)
    torch.testing.assert_close(dD, D.grad, **tol)
    torch.testing.assert_close(dB_h.view(b, l, g, h // g, n).sum(3), B.grad, **tol)
    torch.testing.assert_close(dC_h.view(b, l, g, h // g, n).sum(3), C.grad, **tol)


def test_gradient_through_one_output_only():
    """Backward with only y used, and with only the final state used (the other's gradient is absent)."""
    inp = _inputs(1, 13, 2, 3, 1, 4)
    seq = _docs(1, 13, [[8]])
    for use_y in (True, False):
        grads = []
        for fn in (ssd_chunk_scan_triton, ssd_chunk_scan_ref):
            leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "B", "initial_states")}
            y, final = fn(leaves["x"], inp["dt"], inp["A"], leaves["B"], inp["C"], 8, seq_idx=seq,
                          initial_states=leaves["initial_states"], return_final_states=True)
            (y.sum() if use_y else final.sum()).backward()
            grads.append([v.grad for v in leaves.values()])
        for g1, g2 in zip(*grads):
            torch.testing.assert_close(g1, g2, **TOL["ref"])
