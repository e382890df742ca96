"""Checkpoint interop with the released NemotronH layout (Hugging Face directory, safetensors).

Reading (:func:`load_pretrained`): ``config.json`` plus ``model.safetensors``, or sharded
``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``. Tensors are read one at a
time from memory-mapped files straight into a model allocated once (built on ``meta`` then
materialised), so peak memory is the model plus one tensor. Per-expert keys
``…mixer.experts.{e}.{up,down}_proj.weight`` fill slice ``e`` of the stacked expert parameters. Also
accepted: the legacy ``backbone.embedding.`` name, transformers' in-memory ``model.`` prefix, and
``mtp.*`` (multi-token-prediction) keys, which are skipped. Only safetensors are read — pickled
checkpoints are refused, never unpickled.

Writing (:func:`save_pretrained`): the same layout, sharded above ``max_shard_size`` with an index,
and a ``config.json`` that ``transformers.NemotronHForCausalLM.from_pretrained`` loads. The directory is
assembled beside the target and swapped in at the end, so a crash never leaves a half-written
checkpoint in place of a good one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_io import (CONFIG_NAME, INDEX_FILE, SINGLE_FILE, STACKED_EXPERT, CheckpointError, LocalPiece,
                            checkpoint_files, checkpoint_items, open_safetensors, read_json, staged_directory)
from .checkpoint_nvfp4 import nvfp4_reader
from .config import HybridConfig

__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "save_state_dict", "load_checkpoint_into", "checkpoint_items"]

_EXPERT_KEY = re.compile(r"^(?P<base>backbone\.layers\.\d+\.mixer\.experts)\.(?P<e>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")
_IGNORED_PREFIXES = ("mtp.",)
_FP32_KEYS = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")  # fp32 in the release


# ---------------------------------------------------------------------------------------------------
# reading
def _canonical_key(key: str) -> str:
    if key.startswith("model."):  # transformers' in-memory naming
        key = "backbone." + key[len("model."):]
    if key.startswith("backbone.embedding."):  # legacy name
        key = "backbone.embeddings." + key[len("backbone.embedding."):]
    return key


def _target(key: str) -> tuple[str, int | None]:
    """Checkpoint key (canonical) → (state-dict name, expert index or None)."""
    m = _EXPERT_KEY.match(key)
    if m:
        return f"{m['base']}.{m['proj']}", int(m["e"])
    return key, None


@torch.no_grad()
def load_checkpoint_into(model: torch.nn.Module, path: str | Path, strict: bool = True, *,
                         pieces: Mapping[str, LocalPiece] | None = None) -> dict[str, list[str]]:
    """Copy every tensor of the checkpoint at ``path`` into ``model``'s parameters and buffers.

    ``pieces``: for a model whose tensors are cut across processes (a sharded data-parallel model), the
    piece of each named tensor this process holds (:class:`~.checkpoint_io.LocalPiece`); only those rows are
    read from the files (a dim-0 piece of a plain tensor reads just its bytes) and written. Shapes are
    checked against the whole tensor.

    Raises :class:`CheckpointError` on a shape mismatch (key and both shapes), on missing keys (always:
    a missing tensor would leave uninitialised memory), and on unexpected keys when ``strict``.
    Returns ``{"unexpected": [...], "ignored": [...]}``.
    """
    path = Path(path)
    pieces = pieces or {}
    state = model.state_dict(keep_vars=True)
    experts_filled: dict[str, set[int]] = {n: set() for n in state if STACKED_EXPERT.match(n)}
    # Under expert parallelism a process holds experts [offset, offset + local count) of each layer.
    offsets = {f"{name}.{proj}": (m.expert_offset, m.num_experts, m.total_experts)
               for name, m in model.named_modules() if hasattr(m, "expert_offset") for proj in ("up_proj", "down_proj")}
    filled: set[str] = set()
    unexpected: list[str] = []
    ignored: list[str] = []
    files = checkpoint_files(path)
    nvfp4 = nvfp4_reader(files)  # the NVFP4 release layout: dequantized on the fly
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                if key.startswith(_IGNORED_PREFIXES):
                    ignored.append(key)
                    continue
                packed = nvfp4 is not None and nvfp4.is_packed(key)
                if nvfp4 is not None and nvfp4.is_aux(key):
                    continue
                name, expert = _target(_canonical_key(key))
                if name not in state:
                    unexpected.append(key)
                    continue
                dest = state[name]
                piece = pieces.get(name)
                expected = tuple(dest.shape)  # the whole tensor's shape, also for a piece
                if expert is not None:
                    offset, local, total = offsets.get(name, (0, dest.shape[0], dest.shape[0]))
                    if expert >= total:
                        raise CheckpointError(
                            f"{file}: key {key!r} is expert {expert}, but the config has {total} routed experts"
                        )
                    if not offset <= expert < offset + local:
                        continue  # another expert-parallel rank's expert
                    expert -= offset
                    expected = expected[1:]
                shape = f.shape(key)
                if packed:
                    shape = nvfp4.logical_shape(key, shape)
                if shape != expected:
                    raise CheckpointError(
                        f"{file}: shape mismatch for {key!r}: checkpoint has {shape}, model expects {expected}"
                    )
                if piece is None:
                    target, rows = (dest if expert is None else dest[expert]), None
                elif expert is None:
                    target, rows = piece.tensor, (piece.dim, piece.start, piece.length)
                elif piece.dim == 0:  # this process holds experts [start, start + length) of the local ones
                    if not piece.start <= expert < piece.start + piece.length:
                        experts_filled[name].add(expert)  # another data-parallel shard's expert: seen, not read
                        continue
                    target, rows = piece.tensor[expert - piece.start], None
                else:  # rows of every expert
                    target, rows = piece.tensor[expert], (piece.dim - 1, piece.start, piece.length)
                try:
                    if rows is not None and rows[0] == 0 and not packed:
                        tensor = f.get_rows(key, rows[1], rows[2])
                    else:
                        tensor = f.get_tensor(key)
                        if packed:
                            tensor = nvfp4.dequantize(key, tensor)
                        if rows is not None:
                            tensor = tensor.narrow(*rows)
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{file}: cannot read tensor {key!r}, file truncated or corrupt ({e})") from None
                target.copy_(tensor)
                if expert is None:
                    filled.add(name)
                else:
                    experts_filled[name].add(expert)
    missing = []
    for name, t in state.items():
        if name in experts_filled:
            absent = sorted(set(range(t.shape[0])) - experts_filled[name])
            if absent:
                base, proj = name.rsplit(".", 1)
                offset = offsets.get(name, (0,))[0]
                missing += [f"{base}.{e + offset}.{proj}.weight" for e in absent]
        elif name not in filled:
            missing.append(name)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} missing key(s): {_preview(missing)}")
    if unexpected and strict:
        raise CheckpointError(
            f"{path}: {len(unexpected)} unexpected key(s) (pass strict=False to skip them): {_preview(unexpected)}"
        )
    return {"unexpected": unexpected, "ignored": ignored}


def _preview(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", … (+{len(keys) - n} more)" if len(keys) > n else "")


def _resolve_dtype(dtype: torch.dtype | str | None, raw_config: dict) -> torch.dtype:
    if dtype is None:
        dtype = raw_config.get("dtype") or raw_config.get("torch_dtype") or "float32"
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise CheckpointError(f"unknown floating-point dtype {dtype!r}")
    return resolved


def read_config(path: str | Path) -> HybridConfig:
    """The :class:`HybridConfig` of a checkpoint directory (its ``config.json``), without loading weights."""
    return _read_config(Path(path))[0]


def _read_config(path: Path) -> tuple[HybridConfig, dict]:
    config_file = path / CONFIG_NAME
    if not config_file.exists():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}")
    raw = read_json(config_file)
    try:
        return HybridConfig.from_hf_dict(raw, source=str(config_file)), raw
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def load_pretrained(
    cls,
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    config_overrides: dict | None = None,
    strict: bool = True,
):
    """Build ``cls(config)`` from ``path/config.json`` and fill it from the safetensors files.

    ``dtype``: parameter dtype (default: the config's ``dtype``/``torch_dtype``, else float32); the router
    stays fp32. ``config_overrides``: HybridConfig fields to change (e.g. ``{"time_step_limit": …}``).
    """
    path = Path(path)
    config, raw = _read_config(path)
    try:
        if config_overrides:
            config = config.replace(**config_overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    dtype = _resolve_dtype(dtype, raw)
    model = cls(config, device="meta").to(dtype=dtype).to_empty(device=device)
    load_checkpoint_into(model, path, strict=strict)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r}; use bytes or e.g. '5GB', '500MiB'")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m[1]) * scale)


def _save_dtype(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or not t.is_floating_point() or key.endswith(_FP32_KEYS):
        return t.dtype
    return dtype


def save_pretrained(model, path: str | Path, *, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` to ``path`` in the released NemotronH layout. Returns the directory.

    Files other than a checkpoint's own (a tokenizer saved beside it, say) are kept when ``path`` already
    holds a checkpoint; the previous checkpoint files are replaced only once the new set is complete.
    """
    return save_state_dict(model.state_dict(), model.config, path, max_shard_size=max_shard_size, dtype=dtype)


def save_state_dict(state: dict[str, torch.Tensor], config: HybridConfig, path: str | Path, *,
                    max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
    """:func:`save_pretrained` for a full (unsharded) state dict, e.g. one gathered from expert-parallel ranks."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    limit = _parse_size(max_shard_size)
    with staged_directory(path) as tmp:
        # Plan shards from shapes alone, then materialise one shard at a time.
        plan: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = total = 0
        for key, t in checkpoint_items(state):
            nbytes = t.numel() * _save_dtype(key, t, dtype).itemsize
            if plan[-1] and size + nbytes > limit:
                plan.append([])
                size = 0
            plan[-1].append((key, t))
            size += nbytes
            total += nbytes
        weight_map = {}
        for i, shard in enumerate(plan):
            name = SINGLE_FILE if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            tensors = {k: t.detach().to(device="cpu", dtype=_save_dtype(k, t, dtype)).contiguous() for k, t in shard}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
        if len(plan) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        hf_config = config.to_hf_dict()
        stored = dtype or state["lm_head.weight"].dtype
        hf_config["dtype"] = hf_config["torch_dtype"] = str(stored).replace("torch.", "")
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return path
