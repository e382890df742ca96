"""Optimizer state in the parallelism-independent checkpoint layout: keyed by parameter name, experts whole.

Saved by the default engine (:mod:`tandem.trainer.parallel.data_parallel`); the ZeRO engine uses
:func:`expert_slices` to cut a whole expert tensor down to this rank's experts. Because the layout knows
nothing of ranks, a run resumes at another expert-parallel size or without expert parallelism.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from tandem.model.checkpoint_io import CheckpointError

__all__ = ["expert_slices", "optimizer_state_by_name", "load_optimizer_state_by_name"]


def expert_slices(model) -> dict[str, tuple[int, int]]:
    """Parameter name → (offset, local count) for expert parameters sharded by expert parallelism."""
    out = {}
    for name, m in model.named_modules():
        if getattr(m, "total_experts", None) not in (None, getattr(m, "num_experts", None)):
            for proj in ("up_proj", "down_proj"):
                out[f"{name}.{proj}"] = (m.expert_offset, m.num_experts)
    return out


def optimizer_state_by_name(model, optimizer, ep_group=None) -> dict:
    """Optimizer state keyed by parameter name with expert tensors gathered (collective under EP)."""
    names = {id(p): n for n, p in model.named_parameters()}
    sharded = expert_slices(model)
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            entry = {}
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and name in sharded:
                    parts = [torch.empty_like(v) for _ in range(dist.get_world_size(ep_group))]
                    dist.all_gather(parts, v.contiguous(), group=ep_group)
                    v = torch.cat(parts)
                entry[k] = v
            state[name] = entry
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "param_names": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state_by_name(model, optimizer, saved: dict, source: Path) -> None:
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    sharded = expert_slices(model)
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"{source}: optimizer has {len(saved['param_groups'])} parameter groups, expected {len(optimizer.param_groups)}")
    for group, sg in zip(optimizer.param_groups, saved["param_groups"]):
        if sorted(sg["param_names"]) != sorted(names[id(p)] for p in group["params"]):
            raise CheckpointError(f"{source}: optimizer parameter group {sg.get('name')!r} holds other parameters than this model's")
        group.update({k: v for k, v in sg.items() if k not in ("params", "param_names")})
    optimizer.state.clear()
    for name, entry in saved["state"].items():
        p = params[name]
        restored = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                if v.dim() > 0 and name in sharded:
                    lo, n = sharded[name]
                    v = v[lo: lo + n]
                v = v.clone().to(p.device)
            restored[k] = v
        optimizer.state[p] = restored
