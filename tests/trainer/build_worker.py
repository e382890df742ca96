"""Run by torchrun (gloo): build the model as ``tandem`` does (meta → this rank's experts → init), load a
checkpoint into it, and measure this process's peak resident memory while doing so.

argv: out.json, ep, checkpoint dir (or "-": no load), build mode ("sharded" = trainer's build_model,
"full" = allocate the whole model then cut, the pre-meta way, "fsdp" = build_model sharding on meta with
FSDP2 as ``tandem`` does under ``parallel.engine=fsdp``: every rank allocates, initialises and reads only its
shards), config name (build_config.CONFIGS; default "experts"). With a checkpoint, "sharded" also reads it
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
from tandem.trainer.parallel.fsdp import FSDPEngine, local_pieces, shard_model

from tests.trainer.build_config import CONFIGS


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _digest(state: dict) -> dict:
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in state.items()}


def _fsdp_full_state_dict(model, info, parallel) -> dict:
    engine = FSDPEngine(model, torch.optim.AdamW(model.parameters()), info, parallel)
    return engine.full_state_dict()


def main(out_path, ep, ckpt, mode, config="experts"):
    cfg = CONFIGS[config]
    parallel = ParallelConfig(backend="gloo", ep=int(ep), engine="fsdp" if mode == "fsdp" else "auto")
    info = init_distributed(parallel)
    torch.manual_seed(1000 + info.rank)  # ranks' global RNGs differ, as in a real run
    HybridLM(cfg, device="meta")  # one-time costs (the model's modules and kernels imported): not the build's
    dist.barrier()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if mode == "sharded":
        model = build_model(cfg, info, init_seed=5)
    elif mode == "fsdp":
        model = build_model(cfg, info, init_seed=5, shard=lambda m: shard_model(m, info, parallel))
    else:
        model = HybridLM(cfg, init_seed=5)
        if info.ep > 1:
            apply_expert_parallel(model, info.ep_group)
    build_peak = _status("VmHWM") - base
    held = sum(p.to_local().numel() * p.element_size() if mode == "fsdp" else p.numel() * p.element_size()
               for p in model.parameters())
    digest = None
    if mode != "fsdp":  # (fsdp: gathered at the end, so the gather's buffers are not in the load's figures)
        full = gather_full_state_dict(model, info.ep_group) if info.ep > 1 else model.state_dict()
        digest = _digest(full)
        del full
    load_peak = 0
    if ckpt != "-":
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        with torch.no_grad():
            load_checkpoint_into(model, ckpt, pieces=local_pieces(model))
        load_peak = _status("VmHWM") - before + (before - base)  # relative to the RSS before the build
    peak = max(build_peak, load_peak)
    figures = {"rank": info.rank, "build_peak": build_peak, "load_peak": load_peak, "peak": peak, "held_bytes": held}
    if mode == "fsdp":  # how FSDP2 cut the routed experts
        figures["expert_placements"] = sorted({str(p.placements) for n, p in model.named_parameters() if ".experts." in n})
    loaded_digest = None
    if mode == "fsdp":
        if ckpt != "-":  # what the pieces read: the whole state dict gathered back
            loaded_digest = _digest(_fsdp_full_state_dict(model, info, parallel))
        del model  # and the initialisation, from a build of its own
        model = build_model(cfg, info, init_seed=5, shard=lambda m: shard_model(m, info, parallel))
        digest = _digest(_fsdp_full_state_dict(model, info, parallel))
    if ckpt != "-" and mode == "sharded":  # the RLHF judge's path: a frozen model read from the same folder
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        frozen = load_frozen(ckpt, info, dtype=torch.float32)
        figures["frozen_peak"] = _status("VmHWM") - before
        figures["frozen_held_bytes"] = sum(p.numel() * p.element_size() for p in frozen.parameters())
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, figures)
    if info.rank == 0:
        Path(out_path).write_text(json.dumps({"ranks": gathered, "digest": digest, "loaded_digest": loaded_digest}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
