"""The Mamba-2 mixer of NemotronH (Dao & Gu, 2024), on the SSD scan from :mod:`tandem.kernels.ssd`.

``in_proj`` → z | xBC | dt; ``xBC = silu(causal depthwise conv(xBC))`` → x | B | C;
``y = SSD(x, dt = softplus(dt + dt_bias) clamped to time_step_limit, A = -exp(A_log), B, C) + D x``;
``out_proj(gated_group_rmsnorm(y, z))``. The SSM state is fp32.

Inference (:mod:`tandem.model.cache`): :meth:`Mamba2Mixer.prefill` runs the same chunked path from the cached
conv window / SSM state and writes each row's state at its own length (right-padded rows: ``dt = 0`` at
pads makes them the identity for the SSM); :meth:`Mamba2Mixer.decode` is one token through
``causal_conv1d_update`` and the recurrence ``S = exp(dt·A)·S + dt·x⊗B``, ``y = S·C + D·x`` in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.kernels.conv1d import causal_conv1d, causal_conv1d_update
from tandem.kernels.ssd import chunk_scan, process_dt

from .config import HybridConfig
from .norms import GatedRMSNorm


class CausalConv1d(nn.Conv1d):
    """Depthwise causal conv1d + SiLU on channels-last input, with packed-document resets.

    An ``nn.Conv1d`` for its parameters (``weight [C, 1, K]``, ``bias [C]``: the checkpoint layout) whose
    forward calls :func:`tandem.kernels.conv1d.causal_conv1d`. Running it as a module (rather than reading
    ``conv1d.weight`` from the mixer) keeps parameter-sharding wrappers (ZeRO-3, FSDP) correct: they
    gather a module's parameters around its own forward.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__(channels, channels, kernel_size=kernel_size, groups=channels, padding=kernel_size - 1, bias=bias)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        return causal_conv1d(x, self.weight.squeeze(1), self.bias, seq_idx=seq_idx, activation="silu")


class Mamba2Mixer(nn.Module):
    #: context parallelism: set by the trainer (``trainer/parallel/context.py``); None = single rank
    cp = None

    def __init__(self, config: HybridConfig, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.d_state = config.ssm_state_size
        self.d_inner = config.mamba_d_inner
        self.conv_dim = config.mamba_conv_dim
        self.chunk_size = config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.ssd_impl = config.ssd_impl

        self.in_proj = nn.Linear(self.hidden_size, config.mamba_in_proj_dim, bias=config.use_bias)
        self.conv1d = CausalConv1d(self.conv_dim, config.conv_kernel, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.use_bias)

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None, docs=None) -> torch.Tensor:
        """``hidden`` [B, T, H]; ``docs``: the backbone's :class:`~tandem.model.attention.PackedDocuments`
        (only read under context parallelism, where it carries the CP layout)."""
        if self.cp is not None:
            return self._forward_context_parallel(hidden, seq_idx, docs)
        b, t, _ = hidden.shape
        gn = self.n_groups * self.d_state
        zxbcdt = self.in_proj(hidden)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        xBC = self.conv1d(xBC, seq_idx)
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        y = chunk_scan(
            x.reshape(b, t, self.num_heads, self.head_dim),
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(b, t, self.n_groups, self.d_state),
            C.reshape(b, t, self.n_groups, self.d_state),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.time_step_limit,
            seq_idx=seq_idx,
            impl=self.ssd_impl,
        )
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        return self.out_proj(y.to(hidden.dtype))

    # ------------------------------------------------------------------------------------------------
    def _forward_context_parallel(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None, docs) -> torch.Tensor:
        """Exact Mamba-2 under context parallelism by **state passing** between the ranks' chunks.

        This rank holds global chunks ``(r, 2N−1−r)`` of every row (``[B, 2·Tc]``, see
        ``trainer/parallel/context.py``). Per layer:

        1. conv: each chunk is prefixed with the last K−1 ``in_proj`` inputs of the global chunk before it
           (all-gathered, ``[2N, B, K−1, conv_dim]``) and their document ids, so the window crosses rank
           boundaries exactly and restarts where a document starts;
        2. scan: both local chunks (stacked on the batch) run the ordinary chunked scan from a zero state,
           returning their final states ``F_c`` (of the chunk's last document);
        3. exchange: ``F_c`` and each chunk's total decay ``a_c = exp(Σ dt·A)`` (0 if a document starts
           inside it) are all-gathered — ``[2N, B, h, p·n + 1]``, one collective of a few states;
        4. every rank runs the short recurrence over the ``2N`` chunks: ``h_in(0) = 0``,
           ``h_in(c+1) = cont(c+1) · (a_c · h_in(c) + F_c)`` (``cont``: chunk ``c+1`` continues chunk
           ``c``'s last document), and adds the missing term of its own chunks' first documents:
           ``y_t += C_t · exp(Σ_{s≤t} dt_s·A) · h_in(c)``.

        Why state passing rather than an all-to-all to head sharding: it moves a few ``[h, p, n]`` states
        per chunk instead of the whole ``x/B/C`` activations twice per layer, needs no divisibility of heads
        or groups by ``N``, and leaves the conv and scan kernels (Triton on CUDA) unchanged. The
        correction is one [T/N, h, p] einsum, the size of ``y``. Everything is autograd: the gathers'
        backward reduce-scatters the gradients of the windows and states to the ranks that produced them.
        """
        cp = self.cp
        b, t, _ = hidden.shape
        if docs is None or docs.context is None:
            from .attention import PackedDocuments

            if seq_idx is None:
                seq_idx = torch.zeros(b, t, dtype=torch.long, device=hidden.device)
            docs = PackedDocuments(seq_idx, context=cp)
        seq_idx = docs.seq_idx
        tc, n_chunks, k1 = docs.chunk_len, 2 * cp.size, self.conv1d.kernel_size[0] - 1
        if tc < k1:
            raise ValueError(f"context-parallel chunk length {tc} is shorter than the conv window {k1}")
        gseq = docs.global_seq_idx  # [B, T_global]
        h, p, g, n = self.num_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)

        # 1. conv with the previous global chunk's last K-1 inputs (zeros, another document, before chunk 0)
        xc = xBC.view(b, 2, tc, self.conv_dim).transpose(0, 1)  # [2, B, Tc, C]
        seq_c = seq_idx.view(b, 2, tc).transpose(0, 1)  # [2, B, Tc]
        tails = cp.gather_chunks(xc[:, :, tc - k1:])  # [2N, B, K-1, C]
        prefix, prefix_seq = [], []
        for i, c in enumerate(cp.chunk_ids):
            if c == 0:
                prefix.append(xc.new_zeros(b, k1, self.conv_dim))
                prefix_seq.append((seq_c[i, :, :1] - 1).expand(b, k1))  # no document: contributes nothing
            else:
                prefix.append(tails[c - 1])
                prefix_seq.append(gseq[:, c * tc - k1:c * tc])
        x_in = torch.cat([torch.stack(prefix), xc], dim=2).reshape(2 * b, k1 + tc, self.conv_dim)
        s_in = torch.cat([torch.stack(prefix_seq), seq_c], dim=2).reshape(2 * b, k1 + tc)
        xBC = self.conv1d(x_in, s_in)[:, k1:]  # [2B, Tc, C]
        x, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)

        # 2. local scans from a zero state
        A = -torch.exp(self.A_log.float())
        dt = process_dt(dt, self.dt_bias, True, self.time_step_limit)  # [B, T, h] fp32
        dt = dt.view(b, 2, tc, h).transpose(0, 1).reshape(2 * b, tc, h)
        seq_l = seq_c.reshape(2 * b, tc)
        y, final = chunk_scan(x.reshape(2 * b, tc, h, p), dt, A, B.reshape(2 * b, tc, g, n),
                              C.reshape(2 * b, tc, g, n), self.chunk_size, D=self.D, seq_idx=seq_l,
                              return_final_states=True, impl=self.ssd_impl)

        # 3. exchange final states and chunk decays
        dA_cum = torch.cumsum(dt * A, dim=1)  # [2B, Tc, h]
        one_doc = (seq_l[:, :1] == seq_l[:, -1:]).to(dA_cum.dtype)  # [2B, 1]
        decay = torch.exp(dA_cum[:, -1]) * one_doc  # [2B, h]
        packed = torch.cat([final.reshape(2 * b, h, p * n), decay[:, :, None]], dim=-1).view(2, b, h, p * n + 1)
        everything = cp.gather_chunks(packed)  # [2N, B, h, p·n + 1]
        F_all, a_all = everything[..., :p * n].reshape(n_chunks, b, h, p, n), everything[..., p * n]

        # 4. incoming state of each chunk, then the correction of this rank's chunks
        starts = torch.arange(1, n_chunks, device=gseq.device) * tc
        cont = torch.zeros(n_chunks, b, dtype=F_all.dtype, device=F_all.device)
        cont[1:] = (gseq[:, starts] == gseq[:, starts - 1]).T.to(F_all.dtype)
        S = torch.zeros_like(F_all[0])
        h_in = []
        for c in range(max(cp.chunk_ids) + 1):
            S = S * cont[c][:, None, None, None]
            h_in.append(S)
            S = a_all[c][:, :, None, None] * S + F_all[c]
        H_in = torch.stack([h_in[c] for c in cp.chunk_ids]).reshape(2 * b, g, h // g, p, n)
        first_doc = (seq_l == seq_l[:, :1]).to(dA_cum.dtype)  # [2B, Tc]
        decay_in = torch.exp(dA_cum) * first_doc[:, :, None]  # [2B, Tc, h]
        corr = torch.einsum("btgn,bgkpn->btgkp", C.reshape(2 * b, tc, g, n).float(), H_in)
        corr = corr.reshape(2 * b, tc, h, p) * decay_in[..., None]
        y = (y.float() + corr).to(x.dtype)
        y = y.reshape(2, b, tc, self.d_inner).transpose(0, 1).reshape(b, t, self.d_inner)
        y = self.norm(y, z)
        return self.out_proj(y.to(hidden.dtype))

    # ------------------------------------------------------------------------------------------------
    # inference with a cache (tandem.model.cache.HybridCache); the training forward above is untouched
    def _gated_out(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.out_proj(self.norm(y, z).to(dtype))

    def prefill(self, hidden: torch.Tensor, cache, new_lengths: torch.Tensor | None) -> torch.Tensor:
        """``hidden`` [B, T, H] continuing each row from its cached state; ``new_lengths`` [B] real tokens
        per row (right padding after them), None = all T. Updates ``cache.conv/ssm[layer]`` in place."""
        b, t, _ = hidden.shape
        gn = self.n_groups * self.d_state
        conv_state, ssm_state = cache.conv[self.layer_idx], cache.ssm[self.layer_idx]
        z, xBC_in, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        xBC = causal_conv1d(xBC_in, self.conv1d.weight.squeeze(1), self.conv1d.bias, initial_states=conv_state,
                            activation="silu")
        # New conv window: the last K-1 inputs before each row's end (its old window if it adds nothing).
        k1 = conv_state.shape[-1]
        window = torch.cat([conv_state, xBC_in.transpose(1, 2).to(conv_state.dtype)], dim=-1)  # [B, C, K-1+T]
        if new_lengths is None:
            conv_state.copy_(window[:, :, t:])
        else:
            idx = new_lengths[:, None] + torch.arange(k1, device=hidden.device)  # [B, K-1]
            conv_state.copy_(window.gather(2, idx[:, None, :].expand(b, self.conv_dim, k1)))
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        dt = process_dt(dt, self.dt_bias, True, self.time_step_limit)  # [B, T, h] fp32
        if new_lengths is not None:  # pads: dt = 0 → no input, no decay: the final state is the row's own
            dt = dt * (torch.arange(t, device=hidden.device)[None, :] < new_lengths[:, None])[:, :, None]
        y, final = chunk_scan(
            x.reshape(b, t, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, t, self.n_groups, self.d_state), C.reshape(b, t, self.n_groups, self.d_state),
            self.chunk_size, D=self.D, initial_states=ssm_state, return_final_states=True, impl=self.ssd_impl,
        )
        ssm_state.copy_(final)
        return self._gated_out(y.reshape(b, t, self.d_inner), z, hidden.dtype)

    def decode(self, hidden: torch.Tensor, cache) -> torch.Tensor:
        """One token per row: ``hidden`` [B, 1, H] → [B, 1, H]; updates the cached conv window and SSM state."""
        b = hidden.shape[0]
        g, hg, p, n = self.n_groups, self.num_heads // self.n_groups, self.head_dim, self.d_state
        conv_state, S = cache.conv[self.layer_idx], cache.ssm[self.layer_idx]
        z, xBC, dt = self.in_proj(hidden[:, 0]).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        xBC, new_window = causal_conv1d_update(xBC, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        conv_state.copy_(new_window)
        x, B, C = xBC.float().split([self.d_inner, g * n, g * n], dim=-1)
        dt = process_dt(dt, self.dt_bias, True, self.time_step_limit)  # [B, h] fp32
        dA = torch.exp(dt * -torch.exp(self.A_log.float()))  # [B, h]
        # Heads grouped [B, g, h/g, ...] so B/C broadcast over the heads that share them (no repeat).
        x = x.view(b, g, hg, p)
        Sg = S.view(b, g, hg, p, n)
        if torch.compiler.is_compiling():
            # Compiled (the engine's static decode step): written as one expression so the compiler fuses
            # decay, input and read-out into one kernel (no matmul call, no separate passes per op); eager,
            # this form would build a [B, h, p, N] temporary, so the in-place form below wins there.
            S_new = Sg * dA.view(b, g, hg, 1, 1) + (dt.view(b, g, hg, 1) * x)[..., None] * B.view(b, g, 1, 1, n)
            Sg.copy_(S_new)
            y = (S_new * C.view(b, g, 1, 1, n)).sum(-1)
        else:
            # In place, no [B, h, p, N] temporary: the state is the largest tensor a decode step touches
            # (at batch 8 it outweighs the layer's weights), so each pass over it counts.
            Sg.mul_(dA.view(b, g, hg, 1, 1)).addcmul_((dt.view(b, g, hg, 1) * x)[..., None], B.view(b, g, 1, 1, n))
            # read-out as one [h/g·p, N] @ [N, 1] product per group (3× faster on CPU than per-head bmm)
            y = torch.matmul(S.view(b, g, hg * p, n), C.view(b, g, n, 1)).view(b, g, hg, p)
        y = y + self.D.float().view(1, g, hg, 1) * x
        return self._gated_out(y.reshape(b, 1, self.d_inner).to(hidden.dtype), z[:, None], hidden.dtype)
