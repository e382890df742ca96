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
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = [
    "CONFIG_NAME", "SINGLE_FILE", "INDEX_FILE", "SAFETENSORS_DTYPES", "STACKED_EXPERT", "CheckpointError",
    "LocalPiece", "SafetensorsFile", "checkpoint_files", "checkpoint_items", "open_safetensors", "read_json", "staged_directory",
    "swap_in",
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


class LocalPiece(NamedTuple):
    """The part of one tensor this process holds: ``tensor`` is rows ``[start, start + tensor.shape[dim])``
    along ``dim`` of the whole tensor (whole = what an unsharded process of the same expert-parallel layout
    holds). Initialisation and loading write only the piece (a sharded data-parallel model: the trainer says
    which piece each parameter is; the model code never sees how it was cut)."""

    tensor: torch.Tensor
    dim: int
    start: int

    @property
    def length(self) -> int:
        return self.tensor.shape[self.dim]

    def take(self, whole: torch.Tensor, dim_offset: int = 0) -> torch.Tensor:
        """This piece's rows of ``whole`` (``dim_offset``: ``whole`` lacks that many leading dims, e.g. one
        expert's matrix of a stacked expert tensor)."""
        return whole.narrow(self.dim - dim_offset, self.start, self.length)


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


#: safetensors dtype names (format spec) → torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # the format's own bound on the JSON header


class SafetensorsFile:
    """One safetensors file read with positioned reads, one tensor at a time (a context manager).

    Why not ``safetensors.safe_open``: it memory-maps the file, and every page a read touches stays mapped
    and resident — counted in the process's RSS — until the file is closed, so reading a rank's share of
    a checkpoint file in one pass grows the RSS by that share *on top of* the copies in the model (~2× the
    weights at peak; measured in tests/trainer/test_build_memory.py). Here each tensor is read with
    ``os.preadv`` straight into a fresh buffer and nothing stays mapped: the peak is the model plus one
    tensor. The layout is the safetensors spec: an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data;
    ``tests/model/test_checkpoint.py`` checks every read against the safetensors library.
    """

    def __init__(self, file: Path):
        self.path = Path(file)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{file}: cannot open ({e.strerror})") from None
        try:
            size = os.fstat(self._fd).st_size
            raw = os.pread(self._fd, 8, 0)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ValueError("bad header length")
            header = json.loads(os.pread(self._fd, n, 8))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            header.pop("__metadata__", None)
            data_start, data_size = 8 + n, size - 8 - n
            self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for key, entry in header.items():
                dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
                if dtype is None:
                    raise ValueError(f"tensor {key!r} has unsupported dtype {entry.get('dtype')!r}")
                numel = 1
                for s in shape:
                    numel *= s
                if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
                    raise ValueError(f"tensor {key!r} lies outside the file or has the wrong byte size")
                self._entries[key] = (dtype, shape, data_start + begin, end - begin)
        except (ValueError, KeyError, TypeError) as e:
            os.close(self._fd)
            raise CheckpointError(f"{file}: not a readable safetensors file, possibly truncated or corrupt ({e})") from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get_tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a new CPU tensor (its own memory; nothing of the file stays mapped)."""
        dtype, shape, offset, nbytes = self._entries[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:  # preadv may return less than asked (e.g. above 2 GiB per call)
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: cannot read tensor {key!r}, file truncated or corrupt")
            done += got
        return buf.view(dtype).reshape(shape)

    def get_rows(self, key: str, start: int, length: int) -> torch.Tensor:
        """Rows ``[start, start + length)`` of tensor ``key`` along dim 0, reading only their bytes (a
        sharded process's piece: nothing else of the tensor is read)."""
        dtype, shape, offset, nbytes = self._entries[key]
        if not shape or not 0 <= start <= start + length <= shape[0]:
            raise CheckpointError(f"{self.path}: rows [{start}, {start + length}) of tensor {key!r} with shape {shape}")
        row = nbytes // shape[0] if shape[0] else 0
        buf = torch.empty(length * row, dtype=torch.uint8)
        view, done, want = memoryview(buf.numpy()), 0, length * row
        while done < want:
            got = os.preadv(self._fd, [view[done:]], offset + start * row + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: cannot read tensor {key!r}, file truncated or corrupt")
            done += got
        return buf.view(dtype).reshape(length, *shape[1:])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_safetensors(file: Path) -> SafetensorsFile:
    """Open one safetensors file for reading (see :class:`SafetensorsFile`); a bad header or a short file is
    a :class:`CheckpointError` naming the file."""
    return SafetensorsFile(file)


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


@contextmanager
def staged_directory(path: Path) -> Iterator[Path]:
    """A fresh hidden directory beside ``path`` to write a checkpoint into: swapped in at ``path``
    (:func:`swap_in`) when the block completes, removed when it raises — a crash or a full disk never leaves
    a half-written checkpoint in place of a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
