"""The Mamba-2 mixer of NemotronH (Dao & Gu, 2024), on the SSD scan from :mod:`kernels.ssd`.

``in_proj`` → z | xBC | dt; ``xBC = silu(causal depthwise conv(xBC))`` → x | B | C;
``y = SSD(x, dt = softplus(dt + dt_bias) clamped to time_step_limit, A = -exp(A_log), B, C) + D x``;
``out_proj(gated_group_rmsnorm(y, z))``. The SSM state is fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.conv1d import causal_conv1d
from kernels.ssd import chunk_scan

from .config import HybridConfig
from .norms import GatedRMSNorm


class CausalConv1d(nn.Conv1d):
    """Depthwise causal conv1d + SiLU on channels-last input, with packed-document resets.

    An ``nn.Conv1d`` for its parameters (``weight [C, 1, K]``, ``bias [C]``: the checkpoint layout) whose
    forward calls :func:`kernels.conv1d.causal_conv1d`. Running it as a module (rather than reading
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
