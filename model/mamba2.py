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

    def forward(self, hidden: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
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
        # In place, no [B, h, p, N] temporary: the state is the largest tensor a decode step touches
        # (at batch 8 it outweighs the layer's weights), so each pass over it counts.
        Sg.mul_(dA.view(b, g, hg, 1, 1)).addcmul_((dt.view(b, g, hg, 1) * x)[..., None], B.view(b, g, 1, 1, n))
        # read-out as one [h/g·p, N] @ [N, 1] product per group (3× faster on CPU than per-head bmm)
        y = torch.matmul(S.view(b, g, hg * p, n), C.view(b, g, n, 1)).view(b, g, hg, p)
        y = y + self.D.float().view(1, g, hg, 1) * x
        return self._gated_out(y.reshape(b, 1, self.d_inner).to(hidden.dtype), z[:, None], hidden.dtype)
