"""The fast torch SSD scan (the model's CPU path) equals the readable reference: outputs, final states and
gradients of every input, with grouped B/C, packed documents, initial states and a ragged last chunk."""

import pytest
import torch

from tandem.kernels.ssd import chunk_scan, ssd_chunk_scan_ref
from tandem.kernels.ssd.fast import ssd_chunk_scan_fast

# boundaries inside chunks and on a chunk edge (chunk 8); row 1 has a one-token document
SEQ_IDX = torch.tensor([[0] * 5 + [1] * 11 + [2] * 21, [0] * 3 + [1] * 1 + [2] * 29 + [3] * 4])


def _inputs(b=2, l=37, h=6, p=3, g=2, n=5, dtype=torch.float32):
    torch.manual_seed(0)
    return dict(
        x=torch.randn(b, l, h, p, dtype=dtype), dt=torch.randn(b, l, h, dtype=dtype),
        A=-torch.rand(h, dtype=dtype) * 4 - 0.1, B=torch.randn(b, l, g, n, dtype=dtype),
        C=torch.randn(b, l, g, n, dtype=dtype), D=torch.randn(h, dtype=dtype), dt_bias=torch.randn(h, dtype=dtype),
        initial_states=torch.randn(b, h, p, n, dtype=dtype),
    )


@pytest.mark.parametrize("use_seq_idx,use_init,groups", [(False, False, 1), (True, True, 2), (True, False, 3), (False, True, 6)])
def test_fast_equals_reference_outputs_and_grads(use_seq_idx, use_init, groups):
    t = _inputs(g=groups)
    if not use_init:
        t.pop("initial_states")
    leaves = {k: v.requires_grad_() for k, v in t.items()}
    results = []
    for fn in (ssd_chunk_scan_ref, ssd_chunk_scan_fast):
        y, s = fn(chunk_size=8, dt_softplus=True, seq_idx=SEQ_IDX if use_seq_idx else None, return_final_states=True,
                  **leaves)
        w1, w2 = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y), torch.linspace(1, 2, s.numel(), dtype=s.dtype).view_as(s)
        grads = torch.autograd.grad((y * w1).sum() + (s * w2).sum(), list(leaves.values()))
        results.append((y, s, grads))
    (y1, s1, g1), (y2, s2, g2) = results
    # both compute in fp32 (as the model does): agreement to fp32 rounding, relative to each tensor's scale
    for name, a, b in [("y", y2, y1), ("final state", s2, s1), *((f"grad of {k}", a, b) for k, a, b in zip(leaves, g2, g1))]:
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 2e-6, f"{name}: max error {err:.2e} of the largest magnitude"


def test_fast_fp32_dt_limit_and_dispatch():
    """fp32 inputs with a dt clamp through ``chunk_scan(impl="torch")``, which is the fast path."""
    t = _inputs(l=40, g=2)
    kw = dict(chunk_size=16, dt_softplus=True, dt_limit=(1e-3, 0.5), return_final_states=True)
    y1, s1 = ssd_chunk_scan_ref(**t, **kw)
    y2, s2 = chunk_scan(**t, **kw, impl="torch")
    torch.testing.assert_close(y2, y1, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s1, atol=2e-5, rtol=1e-5)
    assert y2.dtype == torch.float32 and s2.dtype == torch.float32


def test_strong_decay_flushes_subnormals_without_changing_results():
    """dt·|A| up to ~60 per step: decays underflow within a few tokens; the flushed path equals the reference."""
    t = _inputs(l=48, g=2)
    t["A"] = -torch.full_like(t["A"], 12.0)
    t["dt"] = t["dt"].abs() * 3
    y1, s1 = ssd_chunk_scan_ref(**t, chunk_size=16, dt_softplus=True, return_final_states=True)
    y2, s2 = ssd_chunk_scan_fast(**t, chunk_size=16, dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s1, atol=1e-5, rtol=1e-5)
