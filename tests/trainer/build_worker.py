"""Run by torchrun (gloo): build the model as ``tandem`` does (meta → this rank's experts → init), load a
checkpoint into it, and measure this process's peak resident memory while doing so.

argv: out.json, ep, checkpoint dir (or "-": no load), build mode ("sharded" = trainer's build_model,
"full" = allocate the whole model then cut, the pre-meta way). With a checkpoint, "sharded" also reads it
into a frozen model through ``load_frozen`` (the RLHF judge's path) and measures that peak on its own. Rank 0 writes every rank's figures (bytes) and
the sha256 per tensor of the full state dict as initialised (gathered over the EP group, before the load).
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tandem.model import HybridLM
from tandem.model.checkpoint import load_checkpoint_into
from tandem.trainer.config import ParallelConfig
from tandem.trainer.parallel import apply_expert_parallel, build_model, gather_full_state_dict, init_distributed, load_frozen

from tests.trainer.build_config import BUILD_CFG


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(out_path, ep, ckpt, mode):
    info = init_distributed(ParallelConfig(backend="gloo", ep=int(ep)))
    torch.manual_seed(1000 + info.rank)  # ranks' global RNGs differ, as in a real run
    dist.barrier()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if mode == "sharded":
        model = build_model(BUILD_CFG, info, init_seed=5)
    else:
        model = HybridLM(BUILD_CFG, init_seed=5)
        if info.ep > 1:
            apply_expert_parallel(model, info.ep_group)
    build_peak = _status("VmHWM") - base
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    full = gather_full_state_dict(model, info.ep_group) if info.ep > 1 else model.state_dict()
    digest = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in full.items()}
    del full
    load_peak = 0
    if ckpt != "-":
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        load_checkpoint_into(model, ckpt)
        load_peak = _status("VmHWM") - before + (before - base)  # relative to the RSS before the build
    peak = max(build_peak, load_peak)
    figures = {"rank": info.rank, "build_peak": build_peak, "load_peak": load_peak, "peak": peak, "held_bytes": held}
    if ckpt != "-" and mode == "sharded":  # the RLHF judge's path: a frozen model read from the same folder
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        frozen = load_frozen(ckpt, info, dtype=torch.float32)
        figures["frozen_peak"] = _status("VmHWM") - before
        figures["frozen_held_bytes"] = sum(p.numel() * p.element_size() for p in frozen.parameters())
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, figures)
    if info.rank == 0:
        Path(out_path).write_text(json.dumps({"ranks": gathered, "digest": digest}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
