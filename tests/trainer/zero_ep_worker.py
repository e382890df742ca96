"""Run by torchrun: the ``tandem`` CLI, then a check that every rank ends with the same replicated state.

``python zero_ep_worker.py VERDICT.json <tandem args...>``. After training, rank 0 writes the largest
difference across ranks of each replicated tensor kind: the routers' expert bias (aux-loss-free balancing,
a buffer no engine reduces: it must agree because every rank applies the same globally-counted update)
and the dense parameters (ZeRO-1/2 all-gather them after each step; ZeRO-3 keeps only partitions, skipped).
"""

import json
import sys

import torch
import torch.distributed as dist

from tandem.trainer import loop
from tandem.trainer.cli import main
from tandem.trainer.parallel.expert import is_expert_param


def _max_rank_diff(tensors: dict[str, torch.Tensor]) -> float:
    worst = 0.0 if tensors else None
    for t in tensors.values():
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.detach().contiguous())
        worst = max(worst, max((p - parts[0]).abs().max().item() for p in parts))
    return worst


def _fit_then_compare(verdict_path):
    fit = loop.Trainer.fit

    def wrapped(self):
        record = fit(self)
        biases = {n: b for n, b in self.model.named_buffers() if n.endswith("e_score_correction_bias")}
        dense = {n: p for n, p in self.model.named_parameters() if not is_expert_param(p) and not hasattr(p, "ds_id")}
        verdict = {"bias_layers": len(biases), "bias_range": max(float(b.max() - b.min()) for b in biases.values()),
                   "bias_rank_diff": _max_rank_diff(biases), "dense_rank_diff": _max_rank_diff(dense)}
        if dist.get_rank() == 0:
            with open(verdict_path, "w") as f:
                json.dump(verdict, f)
        return record

    loop.Trainer.fit = wrapped


if __name__ == "__main__":
    _fit_then_compare(sys.argv[1])
    sys.argv = ["tandem", *sys.argv[2:]]
    main()
