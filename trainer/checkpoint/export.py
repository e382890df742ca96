"""``tandem export RUN --to DIR``: a run checkpoint as a released-layout (Hugging Face NemotronH) directory.

One process, one tensor in memory at a time: each tensor is read on its own — from ``dcp/`` (the fp32
master weights of a sharded checkpoint, through ``torch.distributed.checkpoint`` one key per read) or from
``model/`` (positioned reads of one safetensors tensor) — cast if asked, and written straight into its place
in the output files (:func:`~.hf_writer.write_hf_layout`, whose file plan needs only the shapes). The
directory is assembled beside ``DIR`` and swapped in when complete, with the checkpoint's tokenizer files
(:mod:`.tokenizer_files`); files of another kind already in ``DIR`` are kept, and a tokenizer file there that
differs from the checkpoint's stops the export (nothing is written).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from tandem.model.checkpoint import read_config
from tandem.model.checkpoint_io import CheckpointError, checkpoint_files, open_safetensors, staged_directory

from .hf_writer import TensorSpec, hf_config_json, write_hf_layout
from .manager import resolve_checkpoint, weights_dir
from .sharded import DCP_DIR
from .tokenizer_files import copy_tokenizer_files

__all__ = ["RELEASE_FP32_SUFFIXES", "export_checkpoint"]

#: tensors the release keeps in fp32 whatever the export dtype (the router; as tandem.model.checkpoint writes them)
RELEASE_FP32_SUFFIXES = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")


def _dcp_source(step_dir: Path):
    """(specs, read) for the model tensors of a sharded checkpoint; ``read(name)`` loads one whole tensor."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(step_dir / DCP_DIR)
    metadata = reader.read_metadata()
    keys = {}
    for key, md in metadata.state_dict_metadata.items():
        path = metadata.planner_data.get(key, ())
        if isinstance(md, TensorStorageMetadata) and len(path) == 2 and path[0] == "model":
            keys[path[1]] = (key, md)
    specs = [TensorSpec(name, tuple(md.size), md.properties.dtype) for name, (_, md) in keys.items()]

    def read(name: str) -> torch.Tensor:
        key, md = keys[name]
        out = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=dcp.FileSystemReader(step_dir / DCP_DIR), no_dist=True)
        return out[key]

    return specs, read


def _safetensors_source(folder: Path):
    """(specs, read) over the state-dict names of a released-layout folder (per-expert keys restacked)."""
    import re

    expert = re.compile(r"^(?P<base>.+\.experts)\.(?P<e>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")
    where: dict[str, list] = {}
    shapes: dict[str, tuple] = {}
    for file in checkpoint_files(folder):
        with open_safetensors(file) as f:
            for key in f.keys():
                m = expert.match(key)
                name = f"{m['base']}.{m['proj']}" if m else key
                where.setdefault(name, []).append((file, key, int(m["e"]) if m else None))
                shapes[name] = (f.shape(key), f.dtype(key))
    specs = []
    for name, parts in where.items():
        shape, dtype = shapes[name]
        specs.append(TensorSpec(name, (len(parts), *shape) if parts[0][2] is not None else tuple(shape), dtype))

    def read(name: str) -> torch.Tensor:
        parts = sorted(where[name], key=lambda p: -1 if p[2] is None else p[2])
        tensors = []
        for file, key, _ in parts:
            with open_safetensors(file) as f:
                tensors.append(f.get_tensor(key))
        return torch.stack(tensors) if parts[0][2] is not None else tensors[0]

    return specs, read


def export_checkpoint(source: str | Path, dest: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write checkpoint ``source`` (a run dir, its ``checkpoints/`` dir, a step dir, or a released-layout folder)
    to ``dest`` in the released layout, in ``dtype`` (default: as stored; the router stays fp32)."""
    source, dest = Path(source), Path(dest)
    folder = weights_dir(source)  # the released-layout folder (a run's: its latest step's model/)
    config = read_config(folder)
    step_dir = None if (source / "config.json").exists() else resolve_checkpoint(source)
    if step_dir is not None and (step_dir / DCP_DIR).exists():
        specs, read = _dcp_source(step_dir)  # a sharded checkpoint: the fp32 master weights
    else:
        specs, read = _safetensors_source(folder)
    if not any(s.name == "lm_head.weight" for s in specs):
        raise CheckpointError(f"{source}: no model tensors found (no lm_head.weight)")

    def out_dtype(spec: TensorSpec) -> torch.dtype:
        keep = dtype is None or not spec.dtype.is_floating_point or spec.name.endswith(RELEASE_FP32_SUFFIXES)
        return spec.dtype if keep else dtype

    out_specs = [TensorSpec(s.name, s.shape, out_dtype(s)) for s in specs]
    stored = out_dtype(next(s for s in specs if s.name == "lm_head.weight"))
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest}: exists and is not a directory")
    dims = {s.name: len(s.shape) for s in specs}
    with staged_directory(dest) as tmp:  # each tensor is one whole piece at offset 0, read when it is written
        write_hf_layout(out_specs, lambda name: [((0,) * dims[name], read(name))], tmp, hf_config_json(config, stored),
                        rank=0, barrier=lambda: None)
        for name in copy_tokenizer_files(folder, tmp):  # the checkpoint's tokenizer and chat template travel with it
            mine = dest / name
            if mine.is_file() and mine.read_bytes() != (tmp / name).read_bytes():  # never replace the user's file
                raise CheckpointError(f"{mine}: differs from the tokenizer file saved with {source}; export to "
                                      f"another directory, or remove it to take the checkpoint's")
    return dest
