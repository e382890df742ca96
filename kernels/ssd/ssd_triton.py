"""The SSD chunked scan on Triton kernels: launch sequence, ``torch.autograd.Function``, public function.

Forward (each step a Triton kernel, numbered as in :mod:`tandem.kernels.ssd.reference`):
  1. ``chunk_cumsum_fwd``   dt processing → dt', dA_cumsum                    (chunk_cumsum.py)
  2. ``bmm_chunk_fwd``      C·Bᵀ per chunk and group                             (bmm_chunk.py)
  3. ``chunk_state_fwd``    each chunk's own final state                         (chunk_state.py)
  4. ``state_passing_fwd``  states entering each chunk + final state             (chunk_state.py)
  5. ``chunk_scan_fwd``     y = Y_diag + Y_off + D x                              (chunk_output.py)

Backward (Triton kernels, with the exceptions listed):
  - ``bmm_chunk_fwd``       C·Bᵀ recomputed (not stored);
  - ``off_state_grad``      d S_in from Y_off (the step-3 kernel with another weight);
  - ``state_passing_bwd``   reverse scan → d states, d initial_states, d dA_cumsum at chunk ends;
  - ``chunk_scan_bwd``      the chunk-local backward, one kernel in two launches (column blocks: dx, d dt', dB,
                            dD partials, column terms of d dA_cumsum; row blocks: dC, row terms);
  - ``chunk_cumsum_bwd``    reverse cumsum, softplus/clamp backward → d dt, per-chunk dA / d dt_bias partials.
  In torch (small reductions and adds only): the sum of per-head dB/dC over the heads of each group; the sums
  of per-block partials of dA, dD, d dt_bias over batch and chunks; adding the row and column parts of
  d dA_cumsum and the chunk-end terms; dtype casts of the gradients.

Saved for backward: the inputs, dt' and dA_cumsum ([b, h, c, Q] fp32) and the chunk-entry states
``S_in`` ([b, c, h, p, n] fp32).
"""

from __future__ import annotations

import math

import torch

from tandem.kernels.triton_utils import check_launchable

from .bmm_chunk import bmm_chunk_fwd
from .chunk_cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from .chunk_output import chunk_scan_bwd, chunk_scan_fwd
from .chunk_state import chunk_state_fwd, off_state_grad, state_passing_bwd, state_passing_fwd
from .reference import check_scan_args

__all__ = ["ssd_chunk_scan_triton"]


def _ssd_fwd(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, seq_idx, initial_states):
    l = x.shape[1]
    dtp, cs = chunk_cumsum_fwd(dt, A, chunk_size, dt_bias, dt_softplus, dt_limit)  # 1
    CB = bmm_chunk_fwd(C, B, chunk_size)  # 2a
    states = chunk_state_fwd(x, B, dtp, cs, chunk_size, seq_idx)  # 3
    S_in, final = state_passing_fwd(states, cs, chunk_size, l, seq_idx, initial_states)  # 4
    y = chunk_scan_fwd(CB, x, dtp, cs, C, S_in, chunk_size, D, seq_idx)  # 2b + 5
    return y, final, dtp, cs, S_in


class _SSDChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_limit):
        y, final, dtp, cs, S_in = _ssd_fwd(
            x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, seq_idx, initial_states
        )
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, seq_idx, dtp, cs, S_in)
        # An unused final state then arrives as None (not a zero tensor) and its reverse scan input is skipped.
        ctx.set_materialize_grads(False)
        ctx.cfg = (chunk_size, dt_softplus, dt_limit, initial_states is not None,
                   initial_states.dtype if initial_states is not None else None)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, dt_bias, seq_idx, dtp, cs, S_in = ctx.saved_tensors
        chunk_size, dt_softplus, dt_limit, has_init, init_dtype = ctx.cfg
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        if dy is None:
            dy = torch.zeros_like(x)
        CB = bmm_chunk_fwd(C, B, chunk_size)
        dS_off = off_state_grad(dy, C, cs, chunk_size, seq_idx)
        dstates, dinit, dcs_end = state_passing_bwd(dS_off, S_in, cs, chunk_size, l, seq_idx, dfinal, has_init)
        dx, ddtp, dcs, dD, dB_h, dC_h = chunk_scan_bwd(dy, x, dtp, cs, CB, B, C, S_in, dstates, chunk_size, D, seq_idx)
        dcs[..., -1] += dcs_end  # the inter-chunk decay exp(dA_cumsum[Q-1]) of step 4
        ddt, dA, ddt_bias = chunk_cumsum_bwd(ddtp, dcs, dt, A, dtp, chunk_size, dt_bias, dt_softplus, dt_limit)
        dB = dB_h.view(b, l, g, h // g, n).sum(3)
        dC = dC_h.view(b, l, g, h // g, n).sum(3)
        return (
            dx, ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.to(D.dtype) if D is not None else None,
            ddt_bias.to(dt_bias.dtype) if dt_bias is not None else None,
            dinit.to(init_dtype) if has_init else None,
            None, None, None, None,
        )


def ssd_chunk_scan_triton(
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
):
    """Same arguments, results and gradients as :func:`tandem.kernels.ssd.reference.ssd_chunk_scan_ref`."""
    check_scan_args(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, initial_states)
    check_launchable("chunk_scan(impl='triton')", x, dt, A, B, C, D, dt_bias, seq_idx, initial_states)
    y, final = _SSDChunkScan.apply(
        x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, chunk_size, bool(dt_softplus),
        (float(dt_limit[0]), float(dt_limit[1])),
    )
    return (y, final) if return_final_states else y
