"""Dense MLP of NemotronH: ``down(act(up(x)))`` with act = relu² — no gate projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU (So et al., "Primer", 2021)."""
    return torch.square(F.relu(x))


ACTIVATIONS = {"relu2": relu2, "silu": F.silu, "gelu": F.gelu}


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, activation: str = "relu2"):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))
