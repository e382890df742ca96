"""The file level of checkpoints in the released NemotronH layout, shared by every weight codec.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000x-of-0000y.safetensors`` listed in ``model.safetensors.index.json``. This module names those
files, lists and opens them (safetensors only: pickles are refused, never unpickled), splits stacked expert
tensors into the released per-expert keys, and swaps a fully written directory into place. The codecs
above it — :mod:`tandem.model.checkpoint` (plain bf16/fp32 tensors) and
:mod:`tandem.model.checkpoint_nvfp4` (the NVFP4 release layout) — import from here, never from each other
in a circle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = [
    "CONFIG_NAME", "SINGLE_FILE", "INDEX_FILE", "STACKED_EXPERT", "CheckpointError", "checkpoint_files",
    "checkpoint_items", "open_safetensors", "read_json", "swap_in",
]

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: a stacked expert parameter of the model's state dict, split per expert in the released layout
STACKED_EXPERT = re.compile(r"^backbone\.layers\.\d+\.mixer\.experts\.(up_proj|down_proj)$")
#: the files that make up a checkpoint; anything else in its folder (a tokenizer, say) is kept on overwrite
CHECKPOINT_FILE_NAME = re.compile(r"^(config\.json|model\.safetensors|model\.safetensors\.index\.json|model-\d+-of-\d+\.safetensors)$")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as asked; the message names file and key."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte offset {e.start})") from None


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in order."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    index = path / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: lists shard {f.name!r}, which does not exist in {path}")
        return files
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if shards:
        raise CheckpointError(f"{path}: has sharded safetensors but no {INDEX_FILE}")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{path}: only pickled weights {pickles} found; tandem never unpickles checkpoints. Convert them to "
            f"safetensors in a trusted environment (e.g. transformers' save_pretrained(safe_serialization=True))."
        )
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def open_safetensors(file: Path):
    """``safe_open`` on CPU; a bad header or a short file is a :class:`CheckpointError` naming the file."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise CheckpointError(f"{file}: not a readable safetensors file, possibly truncated or corrupt ({e})") from None


def checkpoint_items(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) in the released layout: stacked experts are split per expert."""
    for name, t in state.items():
        if STACKED_EXPERT.match(name):
            base, proj = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                yield f"{base}.{e}.{proj}.weight", t[e]
        else:
            yield name, t


def swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by ``tmp``, carrying over files that are not part of a checkpoint."""
    if not path.exists():
        os.replace(tmp, path)
        return
    for item in path.iterdir():
        if not CHECKPOINT_FILE_NAME.match(item.name) and not (tmp / item.name).exists():
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
