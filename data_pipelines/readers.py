"""Record readers shared by pretraining preprocessing, SFT and RL: JSONL, Parquet, Hugging Face datasets.

    for rec in iter_records("train.jsonl", schema=require_fields(messages=list)):
        rec.data, rec.where          # the row as a dict, and "train.jsonl:17"

Every bad row (malformed JSON line, invalid UTF-8, a row that is not an object, a schema failure) is a
``BadRecordError`` naming the file and line (JSONL: 1-based line; Parquet / HF datasets: 1-based row).
``bad_rows="raise"`` (default) stops at the first one; ``bad_rows="skip"`` skips it, logs the first few
with their location and counts them all in a ``ReadStats`` — a bad row is never dropped silently.

Sources (``path``):
- ``*.jsonl`` / ``*.json`` (JSON Lines) and the same with ``.gz``;
- ``*.parquet``;
- a folder written by ``datasets.Dataset.save_to_disk`` (``split=`` picks from a DatasetDict);
- ``hf:<name or local folder>[:<config>]`` → ``datasets.load_dataset(..., streaming=True)`` (runs
  offline on local folders and on datasets already in the HF cache; it never downloads when
  ``HF_DATASETS_OFFLINE=1``);
- a folder of the files above (read in sorted name order).
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

# A schema hook takes the row (a dict) and raises ValueError (or returns a message) when it is invalid.
Schema = Callable[[dict], "str | None"]
MISSING = object()  # a column/field absent from a row
_LOG_FIRST_BAD = 10


class BadRecordError(ValueError):
    """A row that cannot be used; ``where`` is ``file:line`` (or ``file:row N`` for columnar sources)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass
class ReadStats:
    """Counts kept while reading; ``bad`` holds ``(where, reason)`` of every skipped row."""

    rows: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def record_bad(self, err: BadRecordError) -> None:
        if len(self.bad) < _LOG_FIRST_BAD:
            log.warning("skipping bad row %s", err)
        self.bad.append((err.where, err.reason))


@dataclass(frozen=True)
class Record:
    data: dict
    source: str
    line: int  # 1-based line (JSONL) or row (Parquet / HF)
    columnar: bool = False

    @property
    def where(self) -> str:
        return _where(self.source, self.line, self.columnar)


def _where(source: str, line: int, columnar: bool = False) -> str:
    return f"{source}:row {line}" if columnar else f"{source}:{line}"


# --- schema helpers -----------------------------------------------------------------------------------

def require_fields(**types: type | tuple[type, ...]) -> Schema:
    """A schema hook: each named key must be present with a value of the given type(s)."""

    def check(row: dict) -> str | None:
        for key, typ in types.items():
            if key not in row:
                return f"missing field {key!r} (row has keys {sorted(row)[:10]})"
            if not isinstance(row[key], typ):
                want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
                return f"field {key!r} must be {want}, got {type(row[key]).__name__}"
        return None

    return check


def check_text(value: Any, key: str) -> str:
    """The text of field ``key`` or a ValueError saying why it cannot be tokenised.

    Python strings from JSON can hold lone surrogates (``"\\ud800"``), which are not valid UTF-8 and
    would fail (or be silently replaced) later in the tokenizer; they are reported here instead.
    """
    if value is MISSING:
        raise ValueError(f"missing field {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"field {key!r} is not valid UTF-8 ({e.reason} at character {e.start})") from None
    return value


def parse_json_line(raw: bytes, source: str, line: int) -> dict:
    """One JSONL line → dict, or BadRecordError naming ``source:line``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(_where(source, line), f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ("; the file looks like one JSON array, but one object per line (JSON Lines) is expected"
                if line == 1 and text.lstrip().startswith("[") else "")
        raise BadRecordError(_where(source, line), f"malformed JSON ({e.msg} at column {e.colno}){hint}") from None
    if not isinstance(row, dict):
        raise BadRecordError(_where(source, line), f"expected a JSON object, got {type(row).__name__}")
    return row


# --- low-level sources: yield (source, line, payload) ---------------------------------------------------
# payload is raw bytes for JSONL (parsed by the consumer, so preprocessing workers parse in parallel) and a
# dict for columnar sources (already decoded by Arrow).

def source_kind(path: str | Path) -> str:
    s = str(path)
    if s.startswith("hf:"):
        return "hf_load"
    p = Path(s)
    if not p.exists():
        raise FileNotFoundError(f"input {s} does not exist")
    name = p.name.lower()
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf_disk"
        return "dir"
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"{s}: unknown input format (expected .jsonl/.json[.gz], .parquet, a datasets "
                     f"save_to_disk folder, a folder of those, or hf:<name>)")


def expand_inputs(paths: list[str | Path]) -> list[str]:
    """Folders of files → their files in sorted order; everything else unchanged. Empty → error."""
    out: list[str] = []
    for p in paths:
        kind = source_kind(p)
        if kind == "dir":
            files = sorted(str(f) for f in Path(p).iterdir()
                           if f.is_file() and not f.name.startswith(".") and _known_file(f))
            if not files:
                raise ValueError(f"input folder {p} holds no .jsonl/.json/.parquet files")
            out.extend(files)
        else:
            out.append(str(p))
    if not out:
        raise ValueError("no input files given")
    return out


def _known_file(f: Path) -> bool:
    try:
        return source_kind(f) in ("jsonl", "parquet")
    except ValueError:
        return False


def iter_raw(path: str, *, columns: list[str] | None = None, split: str | None = None,
             batch_size: int = 1024) -> Iterator[tuple[int, Any]]:
    """``(line, payload)`` for every row of one source, streaming (never the whole file in memory).

    ``columns`` restricts columnar reads to the fields the caller needs (Parquet reads only those).
    """
    kind = source_kind(path)
    if kind == "jsonl":
        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            for i, raw in enumerate(f, start=1):
                raw = raw.rstrip(b"\r\n")
                if i == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not content
                    raw = raw[3:]
                if raw.strip():  # blank lines carry no row; they are not errors in JSON Lines
                    yield i, raw
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        cols = None if columns is None else [c for c in columns if c in names]
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
            yield from _rows_of_batch(batch.to_pydict(), batch.num_rows, columns, row)
            row += batch.num_rows
    elif kind == "hf_disk":
        ds = _load_from_disk(path, split)
        num_rows = ds.num_rows  # before select_columns: a table with no columns reports 0 rows
        if columns is not None:  # read only what the caller needs (Arrow-backed: skips other columns)
            ds = ds.select_columns([c for c in columns if c in ds.column_names])
        # Row counts come from the dataset, not the batch: a batch with none of the wanted columns is
        # empty, and its rows must still be reported as missing the field rather than vanish.
        for start in range(0, num_rows, batch_size):
            n = min(batch_size, num_rows - start)
            yield from _rows_of_batch(ds[start:start + n] if ds.column_names else {}, n, columns, start)
    elif kind == "hf_load":
        import datasets

        spec = path[3:]
        name, _, config = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        for i, row in enumerate(ds, start=1):
            yield i, dict(row)
    else:
        raise ValueError(f"{path}: a folder must be expanded with expand_inputs() first")


def _rows_of_batch(batch: dict, n: int, columns: list[str] | None, start: int) -> Iterator[tuple[int, dict]]:
    keys = list(batch) if columns is None else columns
    for j in range(n):
        yield start + j + 1, {k: (batch[k][j] if k in batch else MISSING) for k in keys}


def _load_from_disk(path: str, split: str | None):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{path} is a DatasetDict with splits {sorted(ds)}; pick one with split=")
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"{path}: split {split!r} not found; available: {sorted(ds)}")
        ds = ds[split]
    return ds


def is_columnar(path: str) -> bool:
    return source_kind(path) != "jsonl"


def where(path: str, line: int) -> str:
    return _where(path, line, columnar=is_columnar(path))


# --- the public reader -----------------------------------------------------------------------------------

def iter_records(path: str | Path | list, *, schema: Schema | None = None, split: str | None = None,
                 bad_rows: str = "raise", stats: ReadStats | None = None) -> Iterator[Record]:
    """Rows of one or more sources as ``Record`` (dict + location), validated by ``schema``.

    ``bad_rows``: ``"raise"`` → the first bad row raises ``BadRecordError``; ``"skip"`` → bad rows are
    skipped, logged (the first few) and counted in ``stats`` (pass a ``ReadStats`` to read the count).
    """
    if bad_rows not in ("raise", "skip"):
        raise ValueError(f"bad_rows must be 'raise' or 'skip', got {bad_rows!r}")
    stats = stats if stats is not None else ReadStats()
    for src in expand_inputs(path if isinstance(path, list) else [path]):
        columnar = is_columnar(src)
        for line, payload in iter_raw(src, split=split):
            stats.rows += 1
            try:
                row = payload if columnar else parse_json_line(payload, src, line)
                if columnar:
                    row = {k: v for k, v in row.items() if v is not MISSING}
                if schema is not None:
                    try:
                        msg = schema(row)
                    except ValueError as e:
                        msg = str(e)
                    if msg:
                        raise BadRecordError(_where(src, line, columnar), msg)
            except BadRecordError as e:
                if bad_rows == "raise":
                    raise
                stats.record_bad(e)
                continue
            yield Record(row, src, line, columnar)
