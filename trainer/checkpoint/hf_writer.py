"""Write the released (Hugging Face / NemotronH) layout from a sharded model: every rank writes its own bytes.

The layout (``config.json``, ``model.safetensors`` or ``model-0000x-of-0000y.safetensors`` + index, experts
split into per-expert keys) is the one :func:`tandem.model.checkpoint.save_state_dict` writes, but no rank
ever holds the whole model and nothing is gathered: a safetensors file is an 8-byte header length, a JSON
header naming each tensor's byte range, then the raw row-major data. Every tensor's shape and dtype is known
from the global shapes alone, so the header (and every tensor's place in the file) is fixed before any data
exists. Rank 0 writes the headers and sizes the files; then each rank writes the rows it holds with
positioned writes (``os.pwrite``) straight into place — a dense FSDP shard is a block of rows, an expert
shard a run of whole experts (or rows of each expert). Replicated pieces are written by one holder only.

Why not ``torch.distributed.checkpoint.HuggingFaceStorageWriter``: it writes per-rank shard files first and
then consolidates them on one rank (every byte written twice, the second pass by a single process), and it
keeps one key per state-dict tensor, where the released layout splits each stacked ``[E, ...]`` expert
tensor into ``E`` keys. Why not gathering each tensor to rank 0 (``DTensor.full_tensor()``): it sends the
whole model over the network to every rank and has one process write it all.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.model.checkpoint_io import CONFIG_NAME, INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE, STACKED_EXPERT

__all__ = ["TensorSpec", "hf_config_json", "local_box", "write_hf_layout", "write_released_layout"]

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DEFAULT_SHARD_BYTES = 5 * 10**9  # the same default as save_pretrained's "5GB"


@dataclass(frozen=True)
class TensorSpec:
    """One state-dict tensor: its name and global shape and dtype (what the files are planned from)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


#: ``pieces(name)`` → the boxes of tensor ``name`` this process writes: ``(global offset per dim, local data)``
Pieces = Callable[[str], Iterable[tuple[tuple[int, ...], torch.Tensor]]]


@dataclass(frozen=True)
class _Entry:
    key: str  # released-layout key
    source: str  # state-dict name
    expert: int | None  # index along dim 0 of a stacked expert tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str = ""
    begin: int = 0  # byte offset inside the file's data section


def _entries(specs: list[TensorSpec]) -> list[_Entry]:
    out = []
    for s in specs:
        if STACKED_EXPERT.match(s.name):
            base, proj = s.name.rsplit(".", 1)
            out += [_Entry(f"{base}.{e}.{proj}.weight", s.name, e, tuple(s.shape[1:]), s.dtype) for e in range(s.shape[0])]
        else:
            out.append(_Entry(s.name, s.name, None, tuple(s.shape), s.dtype))
    return out


def _nbytes(e: _Entry) -> int:
    return math.prod(e.shape) * e.dtype.itemsize


def _plan(specs: list[TensorSpec], max_shard_bytes: int) -> tuple[list[_Entry], dict[str, bytes], int]:
    """Entries with their file and offset, each file's header bytes, and the total data size."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in _entries(specs):
        if shards[-1] and size + _nbytes(e) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += _nbytes(e)
    placed, headers, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in shard:
            header[e.key] = {"dtype": _DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + _nbytes(e)]}
            placed.append(_Entry(e.key, e.source, e.expert, e.shape, e.dtype, name, offset))
            offset += _nbytes(e)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
        headers[name] = raw
        total += offset
    return placed, headers, total


def _data_start(header: bytes) -> int:
    return 8 + len(header)


def _file_sizes(placed: list[_Entry], headers: dict[str, bytes]) -> dict[str, int]:
    sizes = {name: _data_start(h) for name, h in headers.items()}
    for e in placed:
        sizes[e.file] = max(sizes[e.file], _data_start(headers[e.file]) + e.begin + _nbytes(e))
    return sizes


def _runs(shape: tuple[int, ...], offset: tuple[int, ...], local: torch.Tensor) -> Iterable[tuple[int, torch.Tensor]]:
    """(element offset in the row-major whole tensor, contiguous data) for a box ``local`` at ``offset``.

    The box is written as few contiguous runs as possible: the trailing dims it covers fully are one run
    per index of the dims before them (a block of rows is a single run).
    """
    box = tuple(local.shape)
    k = len(shape)
    while k > 0 and box[k - 1] == shape[k - 1]:
        k -= 1
    lead = max(k - 1, 0) if k > 0 else 0  # dims iterated one index at a time; dim ``lead`` is a partial run
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    for idx in itertools.product(*(range(box[i]) for i in range(lead))):
        start = sum((offset[i] + idx[i]) * strides[i] for i in range(lead))
        start += sum(offset[i] * strides[i] for i in range(lead, len(shape)))
        yield start, local[idx].contiguous() if idx else local.contiguous()


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while data:
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


def write_hf_layout(specs: list[TensorSpec], pieces: Pieces, path: Path, config_json: dict, *, rank: int,
                    barrier: Callable[[], None], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the released layout of ``specs`` into the (new or empty) directory ``path``; collective.

    Every process calls it with the same ``specs`` (global shapes; the plan is computed identically
    everywhere) and its own ``pieces``; rank 0 writes the headers, ``config.json`` and the index; each process
    writes and fsyncs its own pieces. Pieces may be in any floating dtype: they are cast to the spec's dtype.
    """
    path = Path(path)
    placed, headers, total = _plan(specs, max_shard_bytes)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        for name, size in _file_sizes(placed, headers).items():
            with open(path / name, "wb") as f:
                f.write(len(headers[name]).to_bytes(8, "little"))
                f.write(headers[name])
                f.truncate(size)
        if len(headers) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {e.key: e.file for e in placed}}
            (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (path / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    barrier()
    by_source: dict[str, list[_Entry]] = {}
    for e in placed:
        by_source.setdefault(e.source, []).append(e)
    fds: dict[str, int] = {}
    try:
        for spec in specs:
            for offset, local in pieces(spec.name):
                for e in by_source[spec.name]:
                    if e.expert is None:
                        sub, sub_offset = local, offset
                    elif offset[0] <= e.expert < offset[0] + local.shape[0]:
                        sub, sub_offset = local[e.expert - offset[0]], offset[1:]
                    else:
                        continue
                    if sub.numel() == 0:
                        continue
                    if e.file not in fds:
                        fds[e.file] = os.open(path / e.file, os.O_WRONLY)
                    base = _data_start(headers[e.file]) + e.begin
                    for start, run in _runs(e.shape, sub_offset, sub.detach().to(device="cpu", dtype=e.dtype)):
                        _pwrite_all(fds[e.file], memoryview(run.view(torch.uint8).numpy()).cast("B"),
                                    base + start * e.dtype.itemsize)
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    barrier()
    return path


def local_box(t: torch.Tensor, rank: int) -> tuple[tuple[int, ...], torch.Tensor] | None:
    """``(global offset, local data)`` of ``t`` if this process is the one that writes it, else None.

    A ``DTensor`` (``Shard``/``Replicate`` placements, ``torch.chunk`` sizes as FSDP and DCP use them) is
    written by the holder whose coordinate is 0 on every replicated mesh dim; a plain tensor (replicated on
    every rank) by rank 0.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return ((0,) * t.dim(), t) if rank == 0 else None
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        return None
    offset, size = [0] * t.dim(), list(t.shape)
    for mesh_dim, placement in enumerate(t.placements):
        n, c = t.device_mesh.size(mesh_dim), coord[mesh_dim]
        if isinstance(placement, Replicate):
            if c != 0:
                return None
        elif isinstance(placement, Shard):
            d = placement.dim
            chunk = -(-size[d] // n)
            start = min(c * chunk, size[d])
            offset[d] += start
            size[d] = max(0, min(chunk, size[d] - start))
        else:
            raise NotImplementedError(f"cannot place a {placement} piece in the released layout")
    local = t.to_local()
    assert list(local.shape) == size, (list(local.shape), size, t.placements)
    return tuple(offset), local


def hf_config_json(config, dtype: torch.dtype) -> dict:
    """``config.json`` of the released layout for ``config`` (a HybridConfig) with tensors stored as ``dtype``."""
    out = config.to_hf_dict()
    out["dtype"] = out["torch_dtype"] = str(dtype).replace("torch.", "")
    return out


def write_released_layout(state: dict[str, torch.Tensor], config, path: Path, *, rank: int,
                          barrier: Callable[[], None], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """The released layout of a model state dict whose tensors are global-shape ``DTensor`` pieces or replicated
    plain tensors (an engine's ``sharded_state_dict()["model"]``); collective, nothing gathered."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]

    def pieces(name: str):
        box = local_box(state[name], rank)
        return [] if box is None else [box]

    return write_hf_layout(specs, pieces, path, hf_config_json(config, state["lm_head.weight"].dtype), rank=rank,
                           barrier=barrier, max_shard_bytes=max_shard_bytes)
