"""Run by torchrun: the ``tandem`` CLI under the fsdp engine, then what a CLI run does not report.

``python fsdp_worker.py VERDICT.json <tandem args...>``. After training, rank 0 writes for every rank the
bytes of its local parameter and optimizer-state shards, the whole model's parameter bytes, and the largest
difference across ranks of the routers' expert bias (a replicated buffer every rank must update alike).
"""

import json
import sys

import torch
import torch.distributed as dist

from tandem.trainer import loop
from tandem.trainer.cli import main


def _fit_then_report(verdict_path):
    fit = loop.Trainer.fit

    def wrapped(self):
        record = fit(self)
        local = self.engine.local_state_bytes()
        whole = sum(p.numel() * p.element_size() for p in self.model.parameters())  # DTensor numel is global
        whole += sum(m.experts.up_proj.numel() + m.experts.down_proj.numel()  # other EP ranks' experts
                     for m in self.model.modules() if hasattr(m, "experts")) * (self.info.ep - 1) * 4
        bias = torch.cat([b.reshape(-1) for n, b in self.model.named_buffers() if n.endswith("e_score_correction_bias")])
        parts = [torch.empty_like(bias) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, bias)
        mine = {**local, "whole_params": whole, "bias_rank_diff": max((p - parts[0]).abs().max().item() for p in parts),
                "bias_range": float(bias.max() - bias.min())}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if dist.get_rank() == 0:
            with open(verdict_path, "w") as f:
                json.dump(everyone, f)
        return record

    loop.Trainer.fit = wrapped


if __name__ == "__main__":
    _fit_then_report(sys.argv[1])
    sys.argv = ["tandem", *sys.argv[2:]]
    main()
