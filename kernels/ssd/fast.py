"""The fast pure-torch SSD scan: the CPU path of the model, equal to :func:`~tandem.kernels.ssd.reference.ssd_chunk_scan_ref`.

Same algorithm, arguments and results as the readable reference (which stays as the definition and the
test oracle, ``tests/kernels/test_ssd_fast.py`` compares outputs and gradients of the two); what differs
is the work done per token:

- **B/C stay per group.** ``C·Bᵀ`` is one ``[Q, Q]`` product per (chunk, group), not per head, and the chunk
  states and the off-diagonal read-out are one GEMM per group with the group's heads side by side in the
  N dimension (``[n, Q] @ [Q, heads_in_group · p]``), so B and C are never expanded to every head.
- **The decay matrix from cumulative-sum differences.** ``L[i, j] = exp(cs_i − cs_j)`` for ``j ≤ i`` (and
  the same document) is one subtraction, one masked fill and one exp over the ``[b, c, h, Q, Q]`` tensor,
  instead of the reference's expand / mask / cumsum / mask passes. In fp32 the difference of two prefix
  sums carries an absolute exponent error of about ``|cs| · 6e-8`` (``1e-5`` at a chunk decay of 200), far
  below what the loss can see; the Triton kernels (and mamba_ssm's) compute it the same way.
- **A custom autograd function for the intra-chunk block** (:class:`_DiagBlock`), the part that touches
  ``[Q, Q]`` tensors per head: it saves only ``L`` and recomputes ``L ∘ CB`` in the backward, and its
  backward is two GEMMs and four elementwise passes over ``[Q, Q]`` tiles (autograd through the plain
  ops saves and walks about twice as many). Everything of size ``[b, l, h, p]`` or smaller goes through
  ordinary autograd.
- **The state kept in ``[b, g, n, heads_in_group · p]`` layout** through the inter-chunk pass (the layout the
  GEMMs above produce and consume); ``initial_states`` / final states are converted at the boundary only.

All accumulation is fp32, also under ``torch.autocast`` (disabled inside): ``y`` is returned in ``x.dtype``
and final states in fp32, like the reference. A GPU runs the Triton kernels instead (``impl="auto"``).
"""

from __future__ import annotations

import math

import torch

from .reference import add_skip, check_scan_args, pad_to_chunks, process_dt

__all__ = ["ssd_chunk_scan_fast"]

#: decays below exp(−80) ≈ 2e-35 are set to exactly 0 (see :func:`_exp_flushed`)
_FLUSH_BELOW = -80.0


def _exp_flushed(t: torch.Tensor) -> torch.Tensor:
    """``exp(t)`` with results below ``exp(−80)`` flushed to 0.

    Strongly decaying heads (large ``dt·|A|``) drive the decay factors, and every product formed from them,
    into fp32's subnormal range (< 1.2e-38), where x86 arithmetic takes a slow path: the scan ran 2.2×
    slower on such inputs. Zeroing what is below 2e-35 — far under anything the output can resolve — keeps
    subnormals out at their source, on every thread and under ``torch.compile``, without depending on the
    process-wide ``torch.set_flush_denormal`` (which the benches also set).
    """
    return torch.exp(torch.where(t > _FLUSH_BELOW, t, -math.inf))


class _DiagBlock(torch.autograd.Function):
    """``Y = (L ∘ CB) @ X`` per (batch, chunk, head), ``L = exp(cs_i − cs_j)`` where ``keep``, else 0.

    ``CB`` [b, c, g, Q, Q] (shared by the ``h // g`` heads of a group), ``cs`` [b, c, h, Q] (the per-chunk
    cumulative ``dt·A``), ``X`` [b, c, h, Q, p] (``dt·x``), ``keep`` bool broadcastable to [b, c, 1, Q, Q].
    """

    @staticmethod
    def forward(ctx, CB, cs, X, keep):
        b, c, h, Q = cs.shape
        g = CB.shape[2]
        L = cs[..., :, None] - cs[..., None, :]  # [b, c, h, Q(i), Q(j)]
        L.masked_fill_(~keep | (L <= _FLUSH_BELOW), -math.inf).exp_()  # 0 above the diagonal, no subnormals
        M = (L.view(b, c, g, h // g, Q, Q) * CB[:, :, :, None]).view(b, c, h, Q, Q)
        ctx.save_for_backward(CB, L, X)
        return M @ X

    @staticmethod
    def backward(ctx, dY):
        CB, L, X = ctx.saved_tensors
        b, c, h, Q = L.shape[:4]
        g = CB.shape[2]
        dY = dY.contiguous()
        dX = None
        if ctx.needs_input_grad[2]:
            M = (L.view(b, c, g, h // g, Q, Q) * CB[:, :, :, None]).view(b, c, h, Q, Q)
            dX = M.transpose(-1, -2) @ dY
            del M
        G = (dY @ X.transpose(-1, -2)).mul_(L)  # dM ∘ L: [b, c, h, Q, Q]
        Gg = G.view(b, c, g, h // g, Q, Q)
        dCB = Gg.sum(3)
        dseg = Gg.mul_(CB[:, :, :, None]).view(b, c, h, Q, Q)  # d(cs_i − cs_j)
        dcs = dseg.sum(-1) - dseg.sum(-2)
        return dCB, dcs, dX, None


def ssd_chunk_scan_fast(
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
    """Chunked SSD scan; arguments, shapes and results exactly as :func:`ssd_chunk_scan_ref`."""
    b, l, h, p, g, n = check_scan_args(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, initial_states)
    with torch.autocast(x.device.type, enabled=False):
        y, final = _scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, seq_idx, initial_states,
                         (b, l, h, p, g, n))
    return (y, final) if return_final_states else y


def _scan(x, dt, A, B, C, Q, D, dt_bias, dt_softplus, dt_limit, seq_idx, initial_states, dims):
    b, l, h, p, g, n = dims
    hg = h // g
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # [b, l, h] fp32
    xf, Bf, Cf = x.float(), B.float(), C.float()
    dt, seq_idx, (xf, Bf, Cf) = pad_to_chunks(Q, dt, seq_idx, xf, Bf, Cf)  # padded steps: dt = 0
    c = dt.shape[1] // Q
    x_c = xf.view(b, c, Q, h, p)
    dt_c = dt.view(b, c, Q, h)
    dtT = dt_c.transpose(2, 3)  # [b, c, h, Q]
    cs = torch.cumsum(dtT * A.float()[:, None], dim=-1)  # [b, c, h, Q]
    B_g = Bf.view(b, c, Q, g, n).transpose(2, 3)  # [b, c, g, Q, n]
    C_g = Cf.view(b, c, Q, g, n).transpose(2, 3)
    seq_c = seq_idx.view(b, c, Q) if seq_idx is not None else None

    # intra-chunk: Y_diag = (L ∘ C Bᵀ) · (dt x), per head, through the custom backward
    keep = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril_()
    if seq_c is not None:
        keep = (keep & (seq_c[:, :, :, None] == seq_c[:, :, None, :]))[:, :, None]  # [b, c, 1, Q, Q]
    CB = C_g @ B_g.transpose(-1, -2)  # [b, c, g, Q, Q]
    X = (x_c * dt_c[..., None]).permute(0, 1, 3, 2, 4).contiguous()  # [b, c, h, Q, p]
    Y_diag = _DiagBlock.apply(CB, cs, X, keep)

    # each chunk's own final state, in [b, c, g, n, hg·p] layout: Bᵀ [n, Q] @ (w ∘ x) [Q, hg·p] per group
    w_end = _exp_flushed(cs[..., -1:] - cs) * dtT  # [b, c, h, Q]
    if seq_c is not None:
        w_end = w_end * (seq_c == seq_c[..., -1:])[:, :, None, :]
    Xw = x_c * w_end.transpose(2, 3)[..., None]  # [b, c, Q, h, p]
    states = B_g.transpose(-1, -2) @ Xw.view(b, c, Q, g, hg * p).transpose(2, 3)  # [b, c, g, n, hg·p]

    # inter-chunk state passing (sequential over chunks), reset where the document changes
    if initial_states is not None:
        S = initial_states.float().view(b, g, hg, p, n).permute(0, 1, 4, 2, 3).reshape(b, g, n, hg * p)
    else:
        S = torch.zeros(b, g, n, hg * p, dtype=torch.float32, device=x.device)
    chunk_decay = _exp_flushed(cs[..., -1])  # [b, c, h]
    doc_of_state = seq_c[:, 0, 0] if seq_c is not None else None
    states_in, docs_in = [], []
    # unbind, not states[:, ci]: the backward of c selects would write c zero-filled full-size gradients
    for ci, (own, keep_c) in enumerate(zip(states.unbind(1), chunk_decay.unbind(1))):  # keep_c: [b, h]
        states_in.append(S)
        if seq_c is not None:
            docs_in.append(doc_of_state)
            keep_c = keep_c * (seq_c[:, ci, -1] == doc_of_state)[:, None]
            doc_of_state = seq_c[:, ci, -1]
        S = (S.view(b, g, n, hg, p) * keep_c.view(b, g, 1, hg, 1)).view(b, g, n, hg * p) + own
    S_in = torch.stack(states_in, dim=1)  # [b, c, g, n, hg·p]

    # off-diagonal: C_i · S_in, decayed to position i (per head)
    decay_in = _exp_flushed(cs)  # [b, c, h, Q]
    if seq_c is not None:
        doc_in = torch.stack(docs_in, dim=1)  # [b, c]
        decay_in = decay_in * (seq_c == doc_in[:, :, None])[:, :, None, :]
    Y_off = (C_g @ S_in).view(b, c, g, Q, hg, p) * decay_in.view(b, c, g, hg, Q).transpose(3, 4)[..., None]

    y = Y_diag.view(b, c, g, hg, Q, p).permute(0, 1, 4, 2, 3, 5) + Y_off.permute(0, 1, 3, 2, 4, 5)  # [b, c, Q, g, hg, p]
    y = y.reshape(b, c * Q, h, p)[:, :l]
    y = add_skip(y, x, D).to(x.dtype)
    final = S.view(b, g, n, hg, p).permute(0, 1, 3, 4, 2).reshape(b, h, p, n)
    return y, final
