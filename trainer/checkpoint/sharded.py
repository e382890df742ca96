"""Sharded run checkpoints with ``torch.distributed.checkpoint`` (DCP): each rank writes and reads its own pieces.

An engine with ``sharded_checkpoints`` (FSDP2) hands the manager a state dict of this rank's pieces under
global, layout-independent names and shapes (``{"model": {name: tensor}, "optim": {"state": {name: {...}},
"param_groups": [...]}}``, see :meth:`tandem.trainer.parallel.fsdp.FSDPEngine.sharded_state_dict`). Here:

- :func:`save`: the tensors go to ``dcp/`` (one file per rank plus DCP's ``.metadata``), written by every
  rank in parallel, optionally in a background thread (:func:`async_save`); the optimizer's parameter groups
  (hyper-parameters and parameter names, no tensors) go to ``optimizer_groups.json``;
- :func:`load`: DCP reads into the same structure built at the *current* layout, so each rank reads exactly
  the pieces it now holds, whatever world size and expert-parallel size wrote them (resharding);
- :func:`read_whole_optimizer`: for the gathered engines (ddp, zero) resuming a sharded checkpoint, the
  optimizer state as whole tensors by parameter name — the layout of ``optimizer.pt``.

Trust: DCP's ``.metadata`` file is a Python pickle, so — like any torch checkpoint — only load run
checkpoints you wrote or trust. (The released-layout weights in ``model/`` are safetensors and never unpickled.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tandem.model.checkpoint_io import CheckpointError, read_json

__all__ = ["DCP_DIR", "GROUPS_FILE", "async_save", "load", "read_whole_optimizer", "save"]

DCP_DIR = "dcp"
GROUPS_FILE = "optimizer_groups.json"


def _split_groups(state: dict) -> tuple[dict, list[dict]]:
    """(the tensor part for DCP, the optimizer's parameter groups as JSON-able dicts)."""
    optim = state["optim"]
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim["param_groups"]]
    return {"model": state["model"], "optim": optim["state"]}, groups


def _write_groups(groups: list[dict], step_dir: Path) -> None:
    (step_dir / GROUPS_FILE).write_text(json.dumps(groups, indent=2, sort_keys=True) + "\n")


def save(state: dict, step_dir: Path, *, rank: int) -> None:
    """Write ``state`` into ``step_dir`` (collective; returns when every rank's files are written)."""
    import torch.distributed.checkpoint as dcp

    tensors, groups = _split_groups(state)
    if rank == 0:
        _write_groups(groups, step_dir)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(step_dir / DCP_DIR, sync_files=True))


def async_save(state: dict, step_dir: Path, *, rank: int, process_group):
    """:func:`save` in a background thread after staging a copy in host memory; returns a future whose result
    means every rank's files are written. ``process_group`` must be a gloo group of its own (the thread's
    collectives must not interleave with training's)."""
    import torch.distributed.checkpoint as dcp

    tensors, groups = _split_groups(state)
    if rank == 0:
        _write_groups(groups, step_dir)
    return dcp.async_save(tensors, storage_writer=dcp.FileSystemWriter(step_dir / DCP_DIR, sync_files=True),
                          process_group=process_group)


def _reader(step_dir: Path):
    """DCP's reader of ``step_dir/dcp`` and its metadata; a missing or unreadable ``.metadata`` is a
    :class:`CheckpointError`."""
    import torch.distributed.checkpoint as dcp

    folder = step_dir / DCP_DIR
    if not (folder / ".metadata").exists():
        raise CheckpointError(f"{folder}: not a complete sharded checkpoint (no .metadata)")
    reader = dcp.FileSystemReader(folder)
    try:
        metadata = reader.read_metadata()
    except Exception as e:  # a truncated pickle raises EOFError / UnpicklingError / ...
        raise CheckpointError(f"{folder / '.metadata'}: unreadable, possibly truncated or corrupt ({type(e).__name__})") from None
    return reader, metadata


def _dcp_load(state: dict, reader, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=reader)
    except (Exception, dcp.CheckpointException) as e:  # DCP wraps a damaged shard file in a CheckpointException,
        # which derives from BaseException
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: cannot be read, a shard file is possibly truncated or corrupt ({first[:200]})") from None


def _groups(step_dir: Path) -> list[dict]:
    groups = read_json(step_dir / GROUPS_FILE) if (step_dir / GROUPS_FILE).exists() else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{step_dir / GROUPS_FILE}: expected a JSON list of parameter groups with 'params'")
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return groups


def load(state: dict, step_dir: Path) -> dict:
    """Fill ``state`` (the engine's :meth:`sharded_state_dict` at the current layout) from ``step_dir`` in
    place (collective); returns it with the saved parameter groups. Missing keys or wrong global shapes are a
    :class:`CheckpointError` naming the checkpoint."""
    import torch.distributed.checkpoint as dcp

    tensors, _ = _split_groups(state)
    reader, metadata = _reader(step_dir)
    saved = metadata.state_dict_metadata
    mine = dict(_flat(tensors))
    missing = sorted(set(mine) - set(saved))
    if missing:
        raise CheckpointError(f"{step_dir / DCP_DIR}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    for key, t in mine.items():
        if tuple(saved[key].size) != tuple(t.shape):
            raise CheckpointError(f"{step_dir / DCP_DIR}: {key} has shape {tuple(saved[key].size)}, "
                                  f"this model expects {tuple(t.shape)}")
    _dcp_load(tensors, reader, step_dir / DCP_DIR)
    return {"model": tensors["model"], "optim": {"state": tensors["optim"], "param_groups": _groups(step_dir)}}


def _flat(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif torch.is_tensor(v):
            yield f"{prefix}{k}", v


def read_whole_optimizer(step_dir: Path) -> dict:
    """The optimizer state of a sharded checkpoint as whole tensors by parameter name (every rank reads all of
    it; collective): ``{"state": {name: {"exp_avg": ..., ...}}, "param_groups": [{..., "param_names": [...]}]}``,
    the layout the gathered engines load (:meth:`load_optimizer_state`)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader, metadata = _reader(step_dir)
    flat, where = {}, {}
    for key, md in metadata.state_dict_metadata.items():
        path = metadata.planner_data.get(key, ())
        if isinstance(md, TensorStorageMetadata) and len(path) == 3 and path[0] == "optim":
            flat[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            where[key] = path[1:]
    _dcp_load(flat, reader, step_dir / DCP_DIR)
    state: dict[str, dict] = {}
    for key, (name, field) in where.items():
        state.setdefault(name, {})[field] = flat[key]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "param_names": list(g["params"])} for g in _groups(step_dir)]
    return {"state": state, "param_groups": groups}
