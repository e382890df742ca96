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
        mean = counts.mean(-1, keepdim=True).clamp(min=1e-9)
        rel = counts / mean
        biases = torch.stack([m.gate.e_score_correction_bias.to(counts.device, torch.float64) for m in self.layers])
        # every figure of the step in one tensor: one host sync, not three per layer
        per_layer = torch.stack([rel.amax(-1), rel.amin(-1), biases.amax(-1) - biases.amin(-1)], dim=1)  # [L, 3]
        values = per_layer.tolist()
        metrics = {}
        for m, (hi, lo, spread) in zip(self.layers, values):
            metrics[f"moe/layer{m.layer_idx}/max_load"] = hi
            metrics[f"moe/layer{m.layer_idx}/min_load"] = lo
            metrics[f"moe/layer{m.layer_idx}/bias_range"] = spread
        metrics["moe/max_load"] = max(v[0] for v in values)
        metrics["moe/min_load"] = min(v[1] for v in values)
        with torch.no_grad():
            if finite and self.rate > 0:
                deltas = torch.sign(counts.mean(-1, keepdim=True) - counts)  # [L, E]
                for m, delta in zip(self.layers, deltas):
                    bias = m.gate.e_score_correction_bias
                    bias.add_(self.rate * delta.to(device=bias.device, dtype=bias.dtype))
            for m in self.layers:
                m.tokens_per_expert_acc.zero_()
        return metrics
