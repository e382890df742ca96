"""Pure-torch references for the Mamba-2 SSD scan (Dao & Gu, "Transformers are SSMs", 2024).

Per head ``h`` (which reads B/C group ``h // (nheads // ngroups)``) the selective SSM is

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t ⊗ B_t        S_t: [headdim, dstate]
    y_t = S_t · C_t + D_h * x_t

Two implementations of exactly this recurrence live here:

- :func:`ssd_chunk_scan_ref`, the **chunked** SSD algorithm (the form the Triton kernels follow, step by step):
  1. dt processing (bias, softplus, limit) and the per-chunk cumulative decay ``dA_cumsum``;
  2. the intra-chunk (diagonal-block) output ``Y_diag = (C Bᵀ ∘ L) · (dt x)``;
  3. each chunk's own final state ``states``;
  4. inter-chunk state passing (a short sequential scan over chunks, starting from ``initial_states``);
  5. the off-diagonal output ``Y_off = C · decayed incoming state``; then ``y = Y_diag + Y_off + D x``.
  It is the CPU path of the model and the reference every GPU kernel is tested against.
- :func:`ssd_sequential_ref`, a token-by-token loop. Slow and obviously right; used only by tests.

Packed documents: ``seq_idx`` [b, l] gives the document of each token and must be non-decreasing along
the sequence. The state is reset where the document changes, so no information crosses a document
boundary. ``initial_states`` is the state *before* token 0 and belongs to the document of token 0
(context parallelism passes the previous rank's final state this way; a caller whose slice starts a new
document passes zeros).

All accumulation is in fp32; ``y`` is returned in ``x.dtype`` and final states in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["process_dt", "ssd_chunk_scan_ref", "ssd_sequential_ref"]


def process_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    """``dt [b, l, h]`` → fp32 step sizes: ``+ dt_bias``, optional softplus, clamp to ``dt_limit``.

    The default limit ``(0, inf)`` is no clamp at all (the original kernels' default); transformers'
    NemotronH clamps at ``time_step_min`` instead, which a config can ask for explicitly.
    """
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, as in the original kernels
    lo, hi = dt_limit
    if lo > 0.0 or hi < math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def check_scan_args(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, initial_states):
    """Validate the arguments of an SSD scan; returns ``(b, l, h, p, g, n)``.

    The one validator of every entry (this reference, the sequential one with ``chunk_size=None``, the fast
    torch path and the Triton launcher), so each refuses a bad argument with the same message.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, seqlen, nheads, headdim], got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be [batch, seqlen, nheads] = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [nheads] = ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be [batch, seqlen, ngroups, dstate] with batch/seqlen {(b, l)}, "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be divisible by ngroups ({g})")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be [nheads] = ({h},) or [nheads, headdim] = {(h, p)}, got {tuple(D.shape)}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"dt_bias must be [nheads] = ({h},), got {tuple(dt_bias.shape)}")
    if seq_idx is not None:
        if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be an integer tensor, got {seq_idx.dtype}")
        if seq_idx.shape != (b, l):
            raise ValueError(f"seq_idx must be [batch, seqlen] = {(b, l)}, got {tuple(seq_idx.shape)}")
        # a host sync (and a graph break under torch.compile, where the check is skipped)
        if l > 1 and not torch.compiler.is_compiling() and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            raise ValueError("seq_idx must be non-decreasing along the sequence (one id per packed document)")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(
            f"initial_states must be [batch, nheads, headdim, dstate] = {(b, h, p, n)}, "
            f"got {tuple(initial_states.shape)}"
        )
    return b, l, h, p, g, n


def pad_to_chunks(Q: int, dt: torch.Tensor, seq_idx: torch.Tensor | None, *tensors: torch.Tensor):
    """Pad the sequence (dim 1) of ``dt``, ``seq_idx`` and ``tensors`` (each ``[b, l, ...]``) to whole chunks of
    ``Q``; returns ``(dt, seq_idx, tensors)``. Padded steps have dt = 0: no input and decay exp(0) = 1, so
    the final state is unchanged; ``seq_idx`` repeats its last document there."""
    b, l = dt.shape[:2]
    pad = (-l) % Q
    if not pad:
        return dt, seq_idx, tensors
    tensors = tuple(F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in tensors)
    if seq_idx is not None:
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    return F.pad(dt, (0, 0, 0, pad)), seq_idx, tensors


def add_skip(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    if D is None:
        return y
    D = D.float()
    return y + x.float() * (D[:, None] if D.dim() == 1 else D)  # D: [h] or [h, p]


def _segsum(dA: torch.Tensor) -> torch.Tensor:
    """``dA [..., Q]`` → ``[..., Q, Q]`` with entry (i, j) = Σ_{j<k≤i} dA_k for i ≥ j, −inf above the diagonal.

    Built from a masked cumulative sum rather than a difference of two cumulative sums, which loses
    precision when the chunk's total decay is large.
    """
    Q = dA.shape[-1]
    x = dA[..., None].expand(*dA.shape, Q)  # [..., Q(k), Q(j)]
    strictly_lower = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=dA.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0.0)  # keep dA_k only for k > j
    seg = torch.cumsum(x, dim=-2)  # [..., i, j] = Σ_{j<k≤i} dA_k
    lower = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=dA.device))
    return seg.masked_fill(~lower, -math.inf)


def ssd_chunk_scan_ref(
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
    """Chunked SSD scan in plain torch (differentiable by autograd).

    Shapes: x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n], D [h] or [h, p], dt_bias [h],
    seq_idx [b, l] (int, non-decreasing), initial_states [b, h, p, n].
    Returns ``y`` [b, l, h, p] (dtype of ``x``), or ``(y, final_states)`` with final_states fp32 [b, h, p, n].
    """
    b, l, h, p, g, n = check_scan_args(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, initial_states)
    Q = chunk_size

    # 1. dt processing; expand B/C from groups to heads; pad the sequence to whole chunks.
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # [b, l, h] fp32
    xf = x.float()
    Bh = B.float().repeat_interleave(h // g, dim=2)  # [b, l, h, n]
    Ch = C.float().repeat_interleave(h // g, dim=2)
    dt, seq_idx, (xf, Bh, Ch) = pad_to_chunks(Q, dt, seq_idx, xf, Bh, Ch)
    c = dt.shape[1] // Q
    x_c = xf.view(b, c, Q, h, p)
    B_c = Bh.view(b, c, Q, h, n)
    C_c = Ch.view(b, c, Q, h, n)
    dt_c = dt.view(b, c, Q, h)
    dA = (dt_c * A.float()).permute(0, 1, 3, 2)  # [b, c, h, Q]
    dA_cumsum = torch.cumsum(dA, dim=-1)  # [b, c, h, Q]
    seq_c = seq_idx.view(b, c, Q) if seq_idx is not None else None

    # 2. Intra-chunk output: y_i = Σ_{j≤i, same doc} (C_i·B_j) exp(Σ_{j<k≤i} dA_k) dt_j x_j.
    L = torch.exp(_segsum(dA))  # [b, c, h, Q(i), Q(j)]
    if seq_c is not None:
        same_doc = seq_c[:, :, :, None] == seq_c[:, :, None, :]  # [b, c, Q(i), Q(j)]
        L = L * same_doc[:, :, None]
    CB = torch.einsum("bcihn,bcjhn->bchij", C_c, B_c)
    Y_diag = torch.einsum("bchij,bcjh,bcjhp->bcihp", CB * L, dt_c, x_c)

    # 3. Each chunk's own contribution to the state at its last token (same document as that token).
    decay_to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)  # [b, c, h, Q]
    if seq_c is not None:
        decay_to_end = decay_to_end * (seq_c == seq_c[..., -1:])[:, :, None, :]
    states = torch.einsum("bchj,bcjh,bcjhn,bcjhp->bchpn", decay_to_end, dt_c, B_c, x_c)

    # 4. Inter-chunk state passing: S_in(c+1) = exp(Σ_chunk dA) · S_in(c) + states(c), reset on doc change.
    if initial_states is not None:
        S = initial_states.float()
    else:
        S = torch.zeros(b, h, p, n, dtype=torch.float32, device=x.device)
    chunk_decay = torch.exp(dA_cumsum[..., -1])  # [b, c, h]
    doc_of_state = seq_c[:, 0, 0] if seq_c is not None else None  # the incoming state's document
    states_in, docs_in = [], []
    for ci in range(c):
        states_in.append(S)
        keep = chunk_decay[:, ci]  # [b, h]
        if seq_c is not None:
            docs_in.append(doc_of_state)
            keep = keep * (seq_c[:, ci, -1] == doc_of_state)[:, None]
            doc_of_state = seq_c[:, ci, -1]
        S = keep[:, :, None, None] * S + states[:, ci]
    final_states = S
    S_in = torch.stack(states_in, dim=1)  # [b, c, h, p, n]

    # 5. Off-diagonal output: the incoming state, decayed to position i, read out by C_i.
    decay_in = torch.exp(dA_cumsum)  # [b, c, h, Q]
    if seq_c is not None:
        doc_in = torch.stack(docs_in, dim=1)  # [b, c]
        decay_in = decay_in * (seq_c == doc_in[:, :, None])[:, :, None, :]
    Y_off = torch.einsum("bcihn,bchpn,bchi->bcihp", C_c, S_in, decay_in)

    y = (Y_diag + Y_off).reshape(b, c * Q, h, p)[:, :l]
    y = add_skip(y, x, D).to(x.dtype)
    return (y, final_states) if return_final_states else y


def ssd_sequential_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """The recurrence one token at a time (tests only). Same arguments and results as the chunked form."""
    b, l, h, p, g, n = check_scan_args(x, dt, A, B, C, None, D, dt_bias, seq_idx, initial_states)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    Bh = B.float().repeat_interleave(h // g, dim=2)
    Ch = C.float().repeat_interleave(h // g, dim=2)
    xf = x.float()
    S = initial_states.float() if initial_states is not None else x.new_zeros(b, h, p, n, dtype=torch.float32)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(S.dtype)
            S = S * same[:, None, None, None]
        decay = torch.exp(dt[:, t] * A.float())  # [b, h]
        S = decay[:, :, None, None] * S + (dt[:, t, :, None, None] * xf[:, t, :, :, None]) * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    y = add_skip(y, x, D).to(x.dtype)
    return (y, S) if return_final_states else y
