"""Batches with document boundaries: ``input_ids``, ``labels``, ``loss_mask``, ``seq_idx``.

``seq_idx[b, t]`` is the index of the document token t belongs to within row b (non-decreasing, from 0);
the model resets the Mamba state and masks attention where it changes. For pretraining rows cut from
megatron's ``GPTDataset`` (documents concatenated, each ending in EOD) it is recovered from the tokens:
the EOD belongs to the document it ends, the token after it starts the next one, so
``seq_idx = cumsum(tokens == eod) - (tokens == eod)``. Samples that carry their own ``seq_idx`` (packed
rows below, the long/short mixture) keep it.

    loader = build_dataloader(data.train, micro_batch_size=4, eod=tok.eod,
                              consumed_samples=ckpt.consumed, dp_rank=rank, dp_size=world)
    stats = PackingStats()
    for batch in loader:
        stats.update(batch)      # fill rate, documents per row, ... → stats.as_dict() in the logs

Resume is exact because datasets are map-style: the sampler starts at the consumed-sample count and
every rank reads its slice of each global micro-step, like megatron's pretraining sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

IGNORE_LABEL = -100  # label at padding positions (their loss_mask is 0 as well)


def seq_idx_from_tokens(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Document index per token for rows of concatenated EOD-terminated documents ([..., T] → same)."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)


class Collator:
    """``collate_fn`` for a DataLoader: list of sample dicts → batch dict of stacked tensors.

    Accepts megatron samples (``tokens``/``labels``/``loss_mask``) and packed rows (``input_ids``...).
    Output: ``input_ids`` [B,T] long, ``labels`` [B,T] long, ``loss_mask`` [B,T] float, ``seq_idx`` [B,T]
    long, and when the samples have them ``position_ids``, ``valid`` [B,T] bool (False = padding),
    ``loss_weight`` [B,T] float (a per-token weight of the loss, on top of ``loss_mask``),
    ``source``/``phase``/``is_long`` [B] long (blend / long-short bookkeeping for per-kind loss logging).
    """

    def __init__(self, eod: int, keys: Sequence[str] | None = None):
        self.eod = int(eod)
        self.keys = None if keys is None else tuple(keys)  # keep only these (fewer tensors between processes)

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        ids = [s["input_ids"] if "input_ids" in s else s["tokens"] for s in samples]
        lengths = {len(x) for x in ids}
        if len(lengths) != 1:
            raise ValueError(f"samples of different lengths {sorted(lengths)} cannot share a batch")
        input_ids = torch.stack([_as_tensor(x, torch.long) for x in ids])
        labels = torch.stack([_as_tensor(s["labels"], torch.long) for s in samples])
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        loss_mask = torch.stack([_as_tensor(s["loss_mask"], torch.float32) if "loss_mask" in s
                                 else torch.ones(input_ids.shape[-1]) for s in samples])
        if all("seq_idx" in s for s in samples):
            seq_idx = torch.stack([_as_tensor(s["seq_idx"], torch.long) for s in samples])
        else:
            seq_idx = seq_idx_from_tokens(input_ids, self.eod)
        batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "seq_idx": seq_idx}
        for key, dtype in (("position_ids", torch.long), ("valid", torch.bool), ("loss_weight", torch.float32)):
            if all(key in s for s in samples):
                batch[key] = torch.stack([_as_tensor(s[key], dtype) for s in samples])
        for key in ("source", "phase", "is_long"):
            if all(key in s for s in samples):
                batch[key] = torch.tensor([int(s[key]) for s in samples], dtype=torch.long)
        return batch if self.keys is None else {k: batch[k] for k in self.keys if k in batch}


def collate(samples: Sequence[dict], eod: int) -> dict[str, torch.Tensor]:
    return Collator(eod)(samples)


# --- packing variable-length documents into fixed rows (SFT, synthetic long-context tasks) ---------------

def pack_documents(docs: Iterable[Sequence[int] | dict], seq_length: int, *, pad_id: int = 0,
                   open_rows: int = 8, overflow: str = "error") -> Iterator[dict]:
    """Pack whole documents into rows of ``seq_length`` positions without splitting any document.

    A document is a token list (ending in EOD if it should learn to stop) or a dict with ``input_ids``
    and optional ``loss_mask`` (per token, e.g. 0 on SFT prompts). A document of n tokens gives n-1
    positions (inputs x[:-1], labels x[1:]) — labels never cross a document boundary, so nothing needs
    masking at boundaries. Rows are filled first-fit over up to ``open_rows`` partly filled rows
    (deterministic; the oldest row is emitted when the window is full) and padded at the end with
    ``pad_id`` inputs, ``IGNORE_LABEL`` labels, loss_mask 0 and a fresh ``seq_idx``.
    ``overflow``: a document longer than ``seq_length`` + 1 tokens → ``"error"`` or ``"truncate"``.
    Row dicts: ``input_ids``, ``labels``, ``loss_mask``, ``seq_idx``, ``valid``, ``num_docs``, ``truncated``.
    """
    if overflow not in ("error", "truncate"):
        raise ValueError(f"overflow must be 'error' or 'truncate', got {overflow!r}")
    if seq_length < 1 or open_rows < 1:
        raise ValueError(f"seq_length and open_rows must be >= 1, got {seq_length}, {open_rows}")
    rows: list[dict] = []  # open rows: {"items": [(ids, mask)], "used": int, "truncated": int}
    for n, doc in enumerate(docs):
        ids = list(doc["input_ids"]) if isinstance(doc, dict) else list(doc)
        mask = list(doc.get("loss_mask", [1] * len(ids))) if isinstance(doc, dict) else [1] * len(ids)
        if len(mask) != len(ids):
            raise ValueError(f"document {n}: loss_mask has {len(mask)} entries for {len(ids)} tokens")
        if len(ids) < 2:
            raise ValueError(f"document {n}: needs at least 2 tokens (one input, one label), got {len(ids)}")
        cut = 0
        if len(ids) - 1 > seq_length:
            if overflow == "error":
                raise ValueError(f"document {n}: {len(ids)} tokens do not fit a row of {seq_length} positions; "
                                 f"use overflow='truncate' or a longer seq_length")
            cut = len(ids) - 1 - seq_length
            ids, mask = ids[:seq_length + 1], mask[:seq_length + 1]
        need = len(ids) - 1
        row = next((r for r in rows if r["used"] + need <= seq_length), None)
        if row is None:
            if len(rows) >= open_rows:
                yield _finish_row(rows.pop(0), seq_length, pad_id)
            row = {"items": [], "used": 0, "truncated": 0}
            rows.append(row)
        row["items"].append((ids, mask))
        row["used"] += need
        row["truncated"] += cut
        if row["used"] == seq_length:  # full: nothing else can go in
            rows.remove(row)
            yield _finish_row(row, seq_length, pad_id)
    for row in rows:
        yield _finish_row(row, seq_length, pad_id)


def _finish_row(row: dict, seq_length: int, pad_id: int) -> dict:
    inp = torch.full((seq_length,), pad_id, dtype=torch.long)
    lab = torch.full((seq_length,), IGNORE_LABEL, dtype=torch.long)
    lmask = torch.zeros(seq_length)
    sidx = torch.empty(seq_length, dtype=torch.long)
    pos = 0
    for d, (ids, mask) in enumerate(row["items"]):
        n = len(ids) - 1
        inp[pos:pos + n] = torch.tensor(ids[:-1])
        lab[pos:pos + n] = torch.tensor(ids[1:])
        # the mask of a position is the mask of the token it predicts (the label)
        lmask[pos:pos + n] = torch.tensor(mask[1:], dtype=torch.float32)
        sidx[pos:pos + n] = d
        pos += n
    sidx[pos:] = len(row["items"])  # padding is its own "document": it never shares state with real ones
    valid = torch.zeros(seq_length, dtype=torch.bool)
    valid[:pos] = True
    return {"input_ids": inp, "labels": lab, "loss_mask": lmask, "seq_idx": sidx, "valid": valid,
            "num_docs": len(row["items"]), "truncated": row["truncated"]}


# --- statistics ----------------------------------------------------------------------------------------

@dataclass
class PackingStats:
    """Running packing statistics over batches (no positions involved: counts only).

    ``fill_rate``: non-padding positions / all positions (1.0 for megatron rows, which are never padded).
    ``docs_per_row``: mean number of documents (or document pieces) per row.
    ``mean_doc_tokens``: mean length of a document piece within a row.
    ``loss_fraction``: positions that carry loss / all positions.
    """

    rows: int = 0
    positions: int = 0
    valid_positions: int = 0
    loss_positions: float = 0.0
    doc_pieces: int = 0

    def update(self, batch: dict[str, torch.Tensor]) -> "PackingStats":
        ids = batch["input_ids"]
        valid = batch.get("valid")
        valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
        self.rows += ids.shape[0]
        self.positions += ids.numel()
        self.valid_positions += int(valid.sum())
        self.loss_positions += float(batch["loss_mask"].sum())
        seq_idx = batch["seq_idx"]
        # pieces per row = number of distinct seq_idx values among real positions (seq_idx is sorted)
        starts = torch.ones_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        self.doc_pieces += int((starts & valid).sum())
        return self

    @property
    def fill_rate(self) -> float:
        return self.valid_positions / max(self.positions, 1)

    def as_dict(self, prefix: str = "data/") -> dict[str, float]:
        return {
            f"{prefix}fill_rate": self.fill_rate,
            f"{prefix}docs_per_row": self.doc_pieces / max(self.rows, 1),
            f"{prefix}mean_doc_tokens": self.valid_positions / max(self.doc_pieces, 1),
            f"{prefix}loss_fraction": self.loss_positions / max(self.positions, 1),
        }


# --- sampling: exact resume and data-parallel sharding ----------------------------------------------------

class ResumableBatchSampler:
    """Micro-batches of sample indices for one data-parallel rank, starting at ``consumed_samples``.

    Global order is the dataset order 0, 1, 2, ...: each global micro-step takes the next
    ``micro_batch_size * dp_size`` indices and rank r gets the r-th contiguous slice. ``consumed_samples``
    counts samples over all ranks (what the trainer stores in its checkpoint); it must be a multiple of
    ``micro_batch_size * dp_size``. A trailing partial global step is dropped so ranks stay in lockstep.
    """

    def __init__(self, total_samples: int, micro_batch_size: int, *, consumed_samples: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError(f"micro_batch_size and dp_size must be >= 1, got {micro_batch_size}, {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        step = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % step:
            raise ValueError(f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                             f"micro_batch_size*dp_size={step}")
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} exceeds the dataset's {total_samples} samples")
        self.total, self.mbs, self.consumed, self.rank, self.dp = total_samples, micro_batch_size, consumed_samples, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.dp)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.dp
        for start in range(self.consumed, self.consumed + len(self) * step, step):
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))


def build_dataloader(dataset, micro_batch_size: int, *, eod: int, consumed_samples: int = 0, dp_rank: int = 0,
                     dp_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                     prefetch_factor: int | None = None, keys: Sequence[str] | None = None):
    """A ``torch.utils.data.DataLoader`` over a map-style dataset with exact resume and DP sharding.

    With ``num_workers`` > 0, worker processes read and collate ahead of the training loop
    (``prefetch_factor`` batches each; the batches still arrive in sampler order, so the order — and
    resume — do not depend on the worker count). Each batch crosses from a worker as one shared-memory
    tensor per key, a fixed cost per tensor: ``keys`` keeps only the ones needed, and a trainer loading
    a step's rows as one batch (then splitting it into micro-batches) pays it once per step."""
    from torch.utils.data import DataLoader

    sampler = ResumableBatchSampler(len(dataset), micro_batch_size, consumed_samples=consumed_samples,
                                    dp_rank=dp_rank, dp_size=dp_size)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(eod, keys), num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None)
