"""SFT data: chat conversations → validated → rendered token by token → packed into fixed-length rows.

    ds = SFTPackedDataset("sft.jsonl", load_tokenizer(), seq_len=1024, train_on="all", overlong="drop", seed=0)
    row = ds[0]        # input_ids, labels, loss_mask, seq_idx, position_ids, valid, num_docs
    ds.stats.as_dict() # samples, dropped, truncated, rows, fill rate, target tokens, ...
    loader = build_dataloader(ds, micro_batch_size=4, eod=tok.eod)   # tandem.data_pipelines.packing

Row schema (JSONL line / Parquet row / HF dataset row; docs/SFT.md has the full rules)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                   "reasoning_content": str,                                     # assistant, optional
                   "tool_calls": [{"name": str, "arguments": {...} | "<json>"}   # assistant, optional
                                  | {"type": "function", "function": {"name": ..., "arguments": ...}}]}],
     "tools": [{"type": "function", "function": {"name": ..., ...}} | {"name": ..., ...}],  # optional
     "enable_thinking": true | false}                                                     # optional

Every invalid row is a ``BadRecordError`` naming ``file:line`` and the problem (``bad_rows="skip"`` skips
and counts them instead). Conversations become samples with ``chat.render_sft_samples`` (one per
user-delimited segment when history reasoning is truncated). A sample longer than ``seq_len`` is dropped
or cut (``overlong``); samples are packed whole into rows by first-fit-decreasing.

Within a row, a sample of n tokens occupies n positions: ``input_ids`` are its tokens, ``labels[t]`` the
next token of the *same* sample (the last position of a sample has ``IGNORE_LABEL``, so no label crosses
into the next sample), ``loss_mask[t] = render_mask[t + 1]`` (1 where the label is an assistant token to
learn), ``labels`` is ``IGNORE_LABEL`` wherever ``loss_mask`` is 0. ``seq_idx`` numbers the samples of the
row (padding at the end gets its own index), ``position_ids`` restart at 0 for every sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .chat import ROLES, TRAIN_ON, render_sft_samples
from .packing import IGNORE_LABEL
from .readers import BadRecordError, ReadStats, check_text, iter_records

log = logging.getLogger(__name__)

OVERLONG = ("drop", "truncate")


# --- validation -----------------------------------------------------------------------------------------

@dataclass
class Conversation:
    """A validated row: messages with only the keys the template reads, tool calls normalised to
    ``{"name", "arguments": dict}``; ``where`` is its ``file:line``."""

    messages: list[dict]
    tools: list[dict] | None = None
    enable_thinking: bool | None = None
    where: str = ""


def _type(v: Any) -> str:
    return type(v).__name__


def _strip_none(value: Any) -> Any:
    """Columnar sources (Parquet, Arrow) fill absent struct fields with None; drop them again."""
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def _tool_name(tool: Any, j: int) -> str:
    if not isinstance(tool, dict):
        raise ValueError(f"tools[{j}] must be an object, got {_type(tool)}")
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tools[{j}] has no 'name' (expected {{\"name\": ...}} or "
                         f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}})")
    return name


def _tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be an object, got {_type(call)}")
    fn = call.get("function") if call.get("function") is not None else call
    if not isinstance(fn, dict):
        raise ValueError(f"{where}.function must be an object, got {_type(fn)}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} has no 'name'")
    args = fn.get("arguments")
    if args is None:
        args = {}
    elif isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.arguments is a string but not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.arguments must be a JSON object, got {_type(args)}")
    return {"name": name, "arguments": args}


def validate_conversation(row: dict, *, columnar: bool = False) -> Conversation:
    """Check one row against the SFT schema and normalise it; ``ValueError`` says what is wrong."""
    if columnar:
        row = _strip_none(row)
    msgs = row.get("messages")
    if msgs is None:
        raise ValueError(f"missing field 'messages' (row has keys {sorted(row)[:10]})")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"field 'messages' must be a non-empty list of messages, got "
                         f"{_type(msgs) if not isinstance(msgs, list) else 'an empty list'}")

    tools = row.get("tools")
    if isinstance(tools, str):  # tools stored as one JSON string (common in Parquet)
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"field 'tools' is a string but not valid JSON ({e.msg})") from None
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"field 'tools' must be a list of tool definitions, got {_type(tools)}")
    tool_names = [_tool_name(t, j) for j, t in enumerate(tools or [])]

    enable_thinking = row.get("enable_thinking")
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise ValueError(f"field 'enable_thinking' must be true or false, got {_type(enable_thinking)}")

    out: list[dict] = []
    open_calls = 0  # tool calls of the latest assistant turn not yet answered by a tool message
    for i, m in enumerate(msgs):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{at} must be an object with 'role' and 'content', got {_type(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{at}: unknown role {role!r} (expected one of {', '.join(ROLES)})"
                             if role is not None else f"{at}: missing 'role'")
        content = m.get("content")
        if role == "tool" and isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        content = "" if content is None else check_text(content, f"{at}.content")
        msg: dict = {"role": role, "content": content}
        for key in ("reasoning_content", "tool_calls"):
            if m.get(key) is not None and role != "assistant":
                raise ValueError(f"{at}: '{key}' is only allowed on assistant messages, not {role}")
        if role == "system" and i:
            raise ValueError(f"{at}: a system message is only allowed as the first message")
        if role == "user" and not content.strip():
            raise ValueError(f"{at}: user message has empty content")
        if role == "assistant":
            if m.get("reasoning_content") is not None:
                msg["reasoning_content"] = check_text(m["reasoning_content"], f"{at}.reasoning_content")
            calls = m.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise ValueError(f"{at}.tool_calls must be a list, got {_type(calls)}")
            calls = [_tool_call(c, f"{at}.tool_calls[{k}]") for k, c in enumerate(calls or [])]
            for c in calls:
                if c["name"] not in tool_names:
                    known = f"the row's tools are {tool_names}" if tool_names else "the row defines no tools"
                    raise ValueError(f"{at}: tool call {c['name']!r} names a tool that is not defined ({known})")
            if not content.strip() and not calls:
                raise ValueError(f"{at}: assistant message has neither content nor tool calls")
            if calls:
                msg["tool_calls"] = calls
            open_calls = len(calls)
        elif role == "tool":
            if open_calls == 0:
                raise ValueError(f"{at}: tool message without a preceding assistant tool call to answer")
            open_calls -= 1
        else:
            open_calls = 0
        out.append(msg)
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message to train on")
    return Conversation(out, tools if tools else None, enable_thinking)


def iter_conversations(paths: str | Path | Sequence[str | Path], *, split: str | None = None,
                       bad_rows: str = "raise", stats: ReadStats | None = None) -> Iterator[Conversation]:
    """Validated conversations from JSONL / Parquet / HF datasets (``readers.iter_records``); a bad row is
    a ``BadRecordError`` naming ``file:line`` (``bad_rows="skip"``: skipped, logged and counted in ``stats``)."""
    stats = stats if stats is not None else ReadStats()
    paths = list(paths) if isinstance(paths, (list, tuple)) else paths
    for rec in iter_records(paths, split=split, bad_rows=bad_rows, stats=stats):
        try:
            conv = validate_conversation(rec.data, columnar=rec.columnar)
        except ValueError as e:
            err = BadRecordError(rec.where, str(e))
            if bad_rows == "raise":
                raise err from None
            stats.record_bad(err)
            continue
        conv.where = rec.where
        yield conv


# --- packing ---------------------------------------------------------------------------------------------

def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) from first-fit-decreasing: items by decreasing length (ties: input
    order), each into the lowest-numbered bin with room. A max-tree over free space finds that bin in
    O(log n), so packing is O(n log n)."""
    n = len(lengths)
    if any(not 0 < x <= capacity for x in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]")
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [capacity] * (2 * size)  # leaf b = free space of bin b (unopened bins are empty); node = max
    bins: list[list[int]] = []
    for i in sorted(range(n), key=lambda k: -lengths[k]):
        need, node = lengths[i], 1
        while node < size:  # descend to the leftmost leaf with enough room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


@dataclass
class SFTStats:
    """What building an ``SFTPackedDataset`` did (``as_dict`` for logs)."""

    conversations: int = 0   # valid rows
    bad_rows: int = 0        # invalid rows skipped (bad_rows="skip")
    samples: int = 0         # rendered samples packed (multi-turn conversations may give several)
    dropped: int = 0         # samples longer than seq_len dropped (overlong="drop", or nothing left to train)
    truncated: int = 0       # samples cut to seq_len (overlong="truncate")
    rows: int = 0
    tokens: int = 0          # sample tokens in rows (non-padding positions)
    target_tokens: int = 0   # positions with loss_mask 1
    seq_len: int = 0
    bad: list = field(default_factory=list)  # (where, reason) of skipped rows

    @property
    def fill_rate(self) -> float:
        return self.tokens / max(self.rows * self.seq_len, 1)

    def as_dict(self) -> dict[str, float]:
        d = {k: v for k, v in asdict(self).items() if k != "bad"}
        d["fill_rate"] = self.fill_rate
        return d


PARTS = ("all", "train", "valid")


def _held_out(seed: int, ordinal: int, fraction: float) -> bool:
    """Whether conversation ``ordinal`` is in the held-out part (stable: a hash, not an RNG stream)."""
    if fraction <= 0.0:
        return False
    h = hashlib.blake2b(f"{seed}:{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


class SFTPackedDataset:
    """Map-style dataset of packed SFT rows (see the module docstring for the row layout).

    ``path_or_paths``: JSONL / Parquet files, ``save_to_disk`` folders, ``hf:<name>``, or folders of files.
    ``tokenizer``: a ``tandem.data_pipelines.tokenizer.Tokenizer`` (or a path for ``load_tokenizer``).
    ``train_on``: ``"all"`` assistant turns or ``"final"`` (those answering the last user message);
    ``truncate_history_thinking``: see ``chat.render_sft_samples``; ``enable_thinking``: the mode of rows
    without their own ``enable_thinking`` (``/think`` / ``/no_think`` in the text still override it);
    ``overlong``: ``"drop"`` or ``"truncate"`` samples longer than ``seq_len``; ``seed`` fixes which samples
    share a row (ties in FFD) and the row order. ``valid_fraction`` + ``part``: hold out that fraction of
    the conversations (chosen by a hash of ``seed`` and the conversation's position, so the choice does
    not depend on seq_len or packing) — ``part="train"`` keeps the rest, ``"valid"`` the held-out ones,
    ``"all"`` everything. Everything is built in ``__init__`` (tokens in memory, as int32), so ``len()``,
    ``stats`` and ``fingerprint`` (a digest of the packed rows: changes when the data or any option that
    shapes the rows changes) are known up front and items are deterministic.
    """

    def __init__(self, path_or_paths, tokenizer, seq_len: int, *, train_on: str = "all",
                 truncate_history_thinking: bool = True, overlong: str = "drop", seed: int = 0,
                 enable_thinking: bool = True, split: str | None = None, bad_rows: str = "raise",
                 pad_id: int = 0, merge_prefixes: bool = True, valid_fraction: float = 0.0,
                 part: str = "all"):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.seq_len, self.pad_id = int(seq_len), int(pad_id)
        self.stats = SFTStats(seq_len=self.seq_len)
        read = ReadStats()

        # 1. validate and render every conversation into samples (ids + render mask)
        ids_parts: list[np.ndarray] = []
        mask_parts: list[np.ndarray] = []
        for ordinal, conv in enumerate(iter_conversations(path_or_paths, split=split, bad_rows=bad_rows, stats=read)):
            if part != "all" and (_held_out(seed, ordinal, valid_fraction) != (part == "valid")):
                continue
            self.stats.conversations += 1
            mode = enable_thinking if conv.enable_thinking is None else conv.enable_thinking
            for s in render_sft_samples(conv.messages, tokenizer, tools=conv.tools, enable_thinking=mode,
                                        truncate_history_thinking=truncate_history_thinking,
                                        train_on=train_on, merge_prefixes=merge_prefixes):
                ids, mask = s["input_ids"], s["loss_mask"]
                if len(ids) > self.seq_len:
                    if overlong == "drop":
                        self.stats.dropped += 1
                        continue
                    ids, mask = ids[:self.seq_len], mask[:self.seq_len]
                    if not any(mask[1:]):  # the cut removed every target: nothing left to learn
                        self.stats.dropped += 1
                        continue
                    self.stats.truncated += 1
                ids_parts.append(np.asarray(ids, dtype=np.int32))
                mask_parts.append(np.asarray(mask, dtype=np.uint8))
        self.stats.bad_rows, self.stats.bad = read.skipped, list(read.bad)
        if not ids_parts:
            raise ValueError(f"{path_or_paths}: no SFT samples left (conversations={self.stats.conversations}, "
                             f"dropped as longer than seq_len={self.seq_len}: {self.stats.dropped}, "
                             f"bad rows skipped: {self.stats.bad_rows})")
        lengths = np.array([len(x) for x in ids_parts], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._ids = np.concatenate(ids_parts)
        self._mask = np.concatenate(mask_parts)

        # 2. pack: the seed shuffles the samples (which of equal length share a row), FFD packs them,
        #    and the rows are shuffled so training does not see the longest samples first
        rng = random.Random(seed)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        bins = first_fit_decreasing([int(lengths[k]) for k in order], self.seq_len)
        rows = [[order[k] for k in b] for b in bins]
        rng.shuffle(rows)
        # rows as two flat arrays (sample ids, row offsets): no per-row Python list kept, and the same
        # layout memory-maps from a saved copy (:meth:`save` / :meth:`load`)
        self._row_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        self._row_samples = np.fromiter((k for r in rows for k in r), dtype=np.int64, count=int(self._row_offsets[-1]))

        self.stats.samples = len(lengths)
        self.stats.rows = len(rows)
        self.stats.tokens = int(lengths.sum())
        starts = np.zeros(len(self._mask), dtype=bool)
        starts[self._offsets[:-1]] = True
        self.stats.target_tokens = int(self._mask[~starts].sum())  # a sample's first token is never a label
        digest = hashlib.sha256()
        for row in rows:
            for k in row:
                digest.update(self._ids[self._offsets[k]:self._offsets[k + 1]].tobytes())
                digest.update(self._mask[self._offsets[k]:self._offsets[k + 1]].tobytes())
            digest.update(b"|")
        self.fingerprint = digest.hexdigest()[:16]
        log.info("SFT data %s (%s): %s", path_or_paths, part, self.stats.as_dict())

    # -- a built dataset on disk: built once, memory-mapped by every process that reads it -------------
    _ARRAYS = ("ids", "mask", "offsets", "row_samples", "row_offsets")

    def save(self, directory) -> Path:
        """Write the built dataset to ``directory`` (``.npy`` arrays + ``meta.json``), atomically: it is
        written beside the target and renamed into place; if another process got there first, its (equal)
        copy is kept."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        for name in self._ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(self, f"_{name}"))
        meta = {"seq_len": self.seq_len, "pad_id": self.pad_id, "fingerprint": self.fingerprint,
                "stats": asdict(self.stats)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, directory)
        except OSError:  # already there (another node or rank wrote the same build)
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            if not (directory / "meta.json").is_file():
                raise
        return directory

    @classmethod
    def load(cls, directory) -> "SFTPackedDataset":
        """A dataset :meth:`save` wrote, its arrays memory-mapped (read-only, shared through the page cache
        by every process of a node that loads it) — nothing is tokenised again."""
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        self = cls.__new__(cls)
        self.seq_len, self.pad_id, self.fingerprint = int(meta["seq_len"]), int(meta["pad_id"]), meta["fingerprint"]
        stats = dict(meta["stats"])
        stats["bad"] = [tuple(b) for b in stats.get("bad", [])]
        self.stats = SFTStats(**stats)
        for name in cls._ARRAYS:
            setattr(self, f"_{name}", np.load(directory / f"{name}.npy", mmap_mode="r"))
        return self

    def __len__(self) -> int:
        return len(self._row_offsets) - 1

    def _row(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        i = i % len(self)
        return self._row_samples[self._row_offsets[i]:self._row_offsets[i + 1]]

    def sample(self, k: int) -> dict[str, list[int]]:
        """Rendered sample ``k`` (before packing): ``input_ids`` and the render ``loss_mask``."""
        a, b = self._offsets[k], self._offsets[k + 1]
        return {"input_ids": self._ids[a:b].tolist(), "loss_mask": self._mask[a:b].tolist()}

    def row_samples(self, i: int) -> list[int]:
        """Indices (for ``sample``) of the samples packed into row ``i``, in row order."""
        return [int(k) for k in self._row(i)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        T = self.seq_len
        inp = np.full(T, self.pad_id, dtype=np.int64)
        lab = np.full(T, IGNORE_LABEL, dtype=np.int64)
        lmask = np.zeros(T, dtype=np.float32)
        sidx = np.empty(T, dtype=np.int64)
        pos_ids = np.empty(T, dtype=np.int64)
        pos = 0
        row = self._row(i)
        for d, k in enumerate(row.tolist()):
            a, b = self._offsets[k], self._offsets[k + 1]
            n = b - a
            ids, m = self._ids[a:b], self._mask[a:b]
            inp[pos:pos + n] = ids
            # the target of position t is token t+1 of the same sample; the last position has none
            target = m[1:].astype(bool)
            lab[pos:pos + n - 1] = np.where(target, ids[1:], IGNORE_LABEL)
            lmask[pos:pos + n - 1] = target
            sidx[pos:pos + n] = d
            pos_ids[pos:pos + n] = np.arange(n)
            pos += n
        sidx[pos:] = len(row)  # padding is its own document: it never shares state with real ones
        pos_ids[pos:] = np.arange(T - pos)
        valid = np.zeros(T, dtype=bool)
        valid[:pos] = True
        return {"input_ids": torch.from_numpy(inp), "labels": torch.from_numpy(lab),
                "loss_mask": torch.from_numpy(lmask), "seq_idx": torch.from_numpy(sidx),
                "position_ids": torch.from_numpy(pos_ids), "valid": torch.from_numpy(valid),
                "num_docs": len(row)}


def sft_cache_key(path_or_paths, tokenizer, **options) -> str:
    """A digest naming one build of :class:`SFTPackedDataset`: the sources (resolved paths with each file's
    size and modification time; ``hf:`` names as given), the tokenizer (source and vocabulary size) and every
    option that shapes the rows. A changed file or option gives another key, so a stale build is never read."""
    paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
    digest = hashlib.sha256()
    for p in paths:
        text = str(p)
        if text.startswith("hf:"):
            digest.update(text.encode())
            continue
        root = Path(text).resolve()
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            st = f.stat() if f.exists() else None
            digest.update(f"{f}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}".encode())
    tok = f"{getattr(tokenizer, 'source', tokenizer)}|{getattr(tokenizer, 'vocab_size', '')}"
    digest.update(tok.encode())
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]
