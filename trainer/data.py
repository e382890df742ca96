"""The trainer's side of the pretraining data: ``data.*`` keys → a ``data_pipelines.blends`` config.

The datasets, the blend interleave, the phase schedule and the loader all live in
:mod:`tandem.data_pipelines` (docs/DATA.md); this module only reads the run config, names the key in
every error, and picks the tokenizer:

- ``data.path=<prefix>`` or ``data.blend=[{path, weight}, ...]``: one blend for the whole run; the
  recipe's ``phase1``/``phase2``/``phase2_start`` are not used (own data in one override).
- otherwise ``data.phase1`` for the first ``data.phase2_start`` of the tokens, then ``data.phase2``.

Source specs (``path``): ``<prefix>`` / ``indexed:<prefix>`` (a ``tandem-preprocess`` output),
``synthetic:<kind>``, ``text:<file>`` (:mod:`tandem.data_pipelines.sources`). Indexed data is read with
``data.tokenizer`` (null = the shipped tokenizer, which ``tandem-preprocess`` uses by default); the
byte-level synthetic/text sources carry their own ids and cannot share a run with indexed data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

__all__ = ["DataError", "PretrainPlan", "build_once_per_node", "pretrain_plan"]


class DataError(ValueError):
    """Bad data configuration; the message names the key or file."""


@dataclass
class PretrainPlan:
    """What :func:`pretrain_plan` reads from ``data.*``: the blends config, its tokenizer, and for each
    phase the config key it came from (for messages and the resume schedule)."""

    config: Any  # tandem.data_pipelines.blends.PretrainDataConfig
    tokenizer: Any
    keys: list[str]  # per phase, e.g. "data.phase1" or "data.blend"


def _phases(data) -> list[tuple[str, str, list, float]]:
    """``(name, key, entries, fraction)`` per phase of the run."""
    if data.path and data.blend:
        raise DataError("data.path and data.blend both given; use one (data.path=<prefix> is a one-source blend)")
    if data.path:
        return [("phase1", "data.path", [{"path": data.path, "weight": 1.0}], 1.0)]
    if data.blend:
        return [("phase1", "data.blend", list(data.blend), 1.0)]
    if not data.phase1:
        raise DataError("data.phase1: the phase-1 blend is empty; give at least one {path, weight} "
                        "(or data.path=<prefix> for one source)")
    if not 0.0 <= data.phase2_start <= 1.0:
        raise DataError(f"data.phase2_start must be a token fraction in [0, 1], got {data.phase2_start}")
    if data.phase2_start < 1.0 and not data.phase2:
        raise DataError(f"data.phase2_start={data.phase2_start} but data.phase2 (the phase-2 blend) is empty")
    if not data.phase2 or data.phase2_start >= 1.0:
        return [("phase1", "data.phase1", list(data.phase1), 1.0)]
    if data.phase2_start <= 0.0:
        return [("phase2", "data.phase2", list(data.phase2), 1.0)]
    return [("phase1", "data.phase1", list(data.phase1), float(data.phase2_start)),
            ("phase2", "data.phase2", list(data.phase2), 1.0 - float(data.phase2_start))]


def pretrain_plan(data) -> PretrainPlan:
    """``DataConfig`` → :class:`PretrainPlan`, checked (DataError naming the key); reads no data files."""
    from tandem.data_pipelines.blends import Phase, PretrainDataConfig
    from tandem.data_pipelines.sources import BYTE_TOKENIZER, is_byte_level

    phases, kinds = [], {}
    for name, key, entries, fraction in _phases(data):
        blend: dict[str, float] = {}
        for i, e in enumerate(entries):
            path, weight = (e["path"], e["weight"]) if isinstance(e, dict) else (e.path, e.weight)
            path_key, weight_key = (key, key) if key == "data.path" else (f"{key}[{i}].path", f"{key}[{i}].weight")
            if weight < 0:
                raise DataError(f"{weight_key} must be >= 0, got {weight}")
            if path in blend:
                raise DataError(f"{path_key}: {path!r} is listed twice in {key}")
            try:
                kinds.setdefault(is_byte_level(path), f"{path_key} ({path!r})")
            except ValueError as e:
                raise DataError(f"{path_key}: {e}") from None
            blend[path] = float(weight)
        if sum(blend.values()) <= 0:
            raise DataError(f"{key}: all blend weights are zero")
        phases.append((Phase(name, blend, fraction), key))
    if len(kinds) == 2:
        raise DataError(f"{kinds[True]} is a byte-level source and {kinds[False]} tokenised data: they cannot share "
                        f"a run. For your own data alone give data.path=<prefix> or data.blend=[...] (they replace "
                        f"the recipe's phases), or set both data.phase1 and data.phase2")
    if True in kinds:
        if data.tokenizer:
            raise DataError(f"data.tokenizer={data.tokenizer!r} but every source is byte-level (synthetic:, text:), "
                            f"which carry their own ids; set data.tokenizer=null")
        tokenizer = BYTE_TOKENIZER
    else:
        from tandem.data_pipelines.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(data.tokenizer)
        except (OSError, ValueError) as e:
            raise DataError(f"data.tokenizer: {e}") from None
    vf = 100 * float(data.valid_fraction)
    cfg = PretrainDataConfig([p for p, _ in phases], seq_length=data.seq_len, seed=data.seed,
                             split=f"{100 - vf:g},{vf:g},0", cache_dir=data.cache_dir,
                             eod_mask_loss=data.eod_mask_loss)
    try:
        cfg.validate()
    except ValueError as e:
        raise DataError(f"data: {e}") from None
    return PretrainPlan(cfg, tokenizer, [k for _, k in phases])


def build_once_per_node(where: Path, build: Callable[[Path], None], marker: str) -> None:
    """``build(where)`` on local rank 0 of each node unless ``where/marker`` exists; every rank returns once
    every builder has finished. A builder's ``ValueError`` / ``OSError`` is raised on every rank (as
    ``ValueError`` with its message). Collective when a process group exists."""
    error = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not (where / marker).is_file():
        try:
            build(where)
        except (OSError, ValueError) as e:
            error = str(e)
    if dist.is_available() and dist.is_initialized():
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, error)  # also the barrier: every builder has finished writing
        error = next((v for v in verdicts if v is not None), None)
    if error is not None:
        raise ValueError(error)
