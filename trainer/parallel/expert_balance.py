"""MoE training features applied by the trainer: aux-loss-free balancing and expert-load metrics.

After every optimizer step each MoE layer's expert bias moves toward balance,
``bias_e += rate · sign(mean_count − count_e)`` (Nemotron 3 / DeepSeek-V3), where ``count_e`` are the
tokens routed to expert ``e`` during the step summed over *all* data/expert-parallel ranks, so every
rank applies the same update and holds the same bias. The bias is a buffer: gradients never touch it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tandem.model.moe import MoE

__all__ = ["moe_layers", "ExpertBalancer"]


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


class ExpertBalancer:
    """A loop step hook: reads each MoE layer's token counts, logs load metrics, updates the bias."""

    def __init__(self, model: torch.nn.Module, rate: float, group=None, distributed: bool = False):
        self.layers = moe_layers(model)
        self.rate = rate
        self.group = group
        self.distributed = distributed

    def __call__(self, finite: bool) -> dict:
        if not self.layers:
            return {}
        counts = torch.stack([m.tokens_per_expert_acc for m in self.layers])  # [L, E] float64
        if self.distributed:
            counts = counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.group)
        metrics = {}
        mean = counts.mean(-1, keepdim=True).clamp(min=1e-9)
        rel = counts / mean
        for m, r in zip(self.layers, rel):
            metrics[f"moe/layer{m.layer_idx}/max_load"] = float(r.max())
            metrics[f"moe/layer{m.layer_idx}/min_load"] = float(r.min())
            b = m.gate.e_score_correction_bias
            metrics[f"moe/layer{m.layer_idx}/bias_range"] = float(b.max() - b.min())
        metrics["moe/max_load"] = float(rel.max())
        metrics["moe/min_load"] = float(rel.min())
        with torch.no_grad():
            if finite and self.rate > 0:
                for m, c in zip(self.layers, counts):
                    delta = torch.sign(c.mean() - c).to(m.gate.e_score_correction_bias.dtype)
                    m.gate.e_score_correction_bias.add_(self.rate * delta.to(m.gate.e_score_correction_bias.device))
            for m in self.layers:
                m.tokens_per_expert_acc.zero_()
        return metrics
