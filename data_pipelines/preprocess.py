"""Tokenise text into a megatron-core indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

    tandem-preprocess --input corpus.jsonl more.parquet --output-prefix data/web \\
        [--tokenizer DIR] [--text-field text] [--workers 4] [--skip-bad-rows] [--overwrite]
    python -m tandem.data_pipelines.preprocess ...                        # same thing

Inputs: JSON Lines (optionally .gz), Parquet, a ``datasets`` save_to_disk folder, ``hf:<name>`` (via
``load_dataset``, streaming), or folders of such files; all inputs go into one output, in the order given.
Every document is one megatron document with the tokenizer's EOD token appended (boundary recovery in
``packing`` depends on it). Reading streams: memory holds a bounded number of chunks, never a file.

Parallelism: the main process reads raw rows and writes the output; ``--workers`` processes parse JSON,
validate and tokenise chunks. Results are consumed in input order, so the output is identical for any
worker count; at most ``4 x workers`` chunks are in flight, so memory stays bounded.

Crash safety / idempotence: the .bin/.idx are written under temporary names and renamed at the end, then a
manifest ``<prefix>.json`` (settings, counts, file sizes) is written last. A rerun finds a complete output
(manifest + matching files) and skips it; ``--overwrite`` rebuilds. Outputs never replace an input (refused even
with ``--overwrite``), nor files no tandem manifest accounts for (unless ``--overwrite``). A bad row (missing field, non-string,
invalid UTF-8, malformed JSON) fails the run with ``file:line`` unless ``--skip-bad-rows``, which skips and
counts every bad row (the count and the first locations are printed and stored in the manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tandem.data_pipelines.readers import (
    MISSING,
    BadRecordError,
    check_text,
    expand_inputs,
    is_columnar,
    iter_raw,
    parse_json_line,
    where,
)

MANIFEST_VERSION = 1
_MAX_BAD_IN_MANIFEST = 100


@dataclass
class PreprocessResult:
    prefix: str
    documents: int
    tokens: int  # including one EOD per document
    skipped_rows: int
    bad_rows: list[tuple[str, str]] = field(default_factory=list)  # (file:line, reason), first ones
    reused: bool = False  # True when a complete output already existed and was kept
    seconds: float = 0.0


# --- worker side ---------------------------------------------------------------------------------------

_TOKENIZER = None


def _init_worker(tokenizer_path: str | None, eod_token: str | None) -> None:
    global _TOKENIZER
    # Parallelism comes from the worker processes; the tokenizers library's own thread pool in every
    # worker would oversubscribe the cores (N workers x all cores threads).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tandem.data_pipelines.tokenizer import load_tokenizer

    _TOKENIZER = load_tokenizer(tokenizer_path, eod_token=eod_token)


def _process_chunk(job: tuple[str, str, list[tuple[int, Any]]]):
    """Validate and tokenise one chunk → (tokens int32 incl. EOD, doc lengths, bad rows)."""
    source, text_field, items = job
    columnar = is_columnar(source)
    texts: list[str] = []
    bad: list[tuple[str, str]] = []
    for line, payload in items:
        try:
            row = payload if columnar else parse_json_line(payload, source, line)
            texts.append(check_text(row.get(text_field, MISSING), text_field))
        except BadRecordError as e:
            bad.append((e.where, e.reason))
        except ValueError as e:
            bad.append((where(source, line), str(e)))
    ids = _TOKENIZER.encode_batch(texts) if texts else []
    eod = _TOKENIZER.eod
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for x in ids:
        flat[pos:pos + len(x)] = x
        flat[pos + len(x)] = eod
        pos += len(x) + 1
    return flat, lengths, bad


# --- main side -----------------------------------------------------------------------------------------

def _jobs(inputs: list[str], text_field: str, split: str | None, chunk_rows: int) -> Iterator[tuple]:
    for src in inputs:
        chunk: list[tuple[int, Any]] = []
        for item in iter_raw(src, columns=[text_field], split=split):
            chunk.append(item)
            if len(chunk) >= chunk_rows:
                yield src, text_field, chunk
                chunk = []
        if chunk:
            yield src, text_field, chunk


def _size(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _bounded_imap(pool, jobs: Iterator[tuple], window: int):
    """Results of ``_process_chunk`` over ``jobs`` in input order, with at most ``window`` chunks in flight.

    ``Pool.imap`` would do the ordering, but its feeder thread drains the whole input iterator as fast as
    it can read, i.e. a large file would be pulled into memory; this keeps reading in step with writing.
    """
    from collections import deque

    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(_process_chunk, (job,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _paths(prefix: str) -> dict[str, Path]:
    return {"bin": Path(prefix + ".bin"), "idx": Path(prefix + ".idx"), "manifest": Path(prefix + ".json")}


def read_manifest(prefix: str) -> dict | None:
    """The manifest of a complete output, or None (absent, unreadable, or files not matching it)."""
    p = _paths(prefix)
    try:
        m = json.loads(p["manifest"].read_text())
    except (OSError, json.JSONDecodeError):
        return None
    try:
        if p["bin"].stat().st_size != m["bin_bytes"] or p["idx"].stat().st_size != m["idx_bytes"]:
            return None
    except (OSError, KeyError):
        return None
    return m


def preprocess(inputs: list[str | Path] | str | Path, output_prefix: str | Path, *,
               tokenizer: str | Path | None = None, eod_token: str | None = None, text_field: str = "text",
               split: str | None = None, workers: int = 1, chunk_rows: int = 512,
               skip_bad_rows: bool = False, overwrite: bool = False, progress: bool = True,
               log=print) -> PreprocessResult:
    """Tokenise ``inputs`` into ``output_prefix``.bin/.idx (+ .json manifest). See the module docstring.

    ``tokenizer``: a local tokenizer folder/file (default: the shipped one). Raises ``BadRecordError``
    (with ``file:line``) on the first bad row unless ``skip_bad_rows``; ``ValueError`` on empty input.
    """
    from tandem.data_pipelines.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    prefix = str(output_prefix)
    files = expand_inputs(list(inputs) if isinstance(inputs, (list, tuple)) else [inputs])
    tok = load_tokenizer(tokenizer, eod_token=eod_token)
    settings = {
        "inputs": [os.path.abspath(f) if not f.startswith("hf:") else f for f in files],
        # sizes catch an input rewritten since the output was built (a rerun must not keep stale data)
        "input_bytes": [None if f.startswith("hf:") else _size(f) for f in files],
        "split": split, "text_field": text_field, "tokenizer": tok.unique_identifiers,
    }
    paths = _paths(prefix)
    tmp = {k: Path(f"{prefix}.tmp{os.getpid()}.{k}") for k in ("bin", "idx", "manifest")}
    _refuse_outputs_over_inputs(prefix, files, [*paths.values(), *tmp.values()])
    existing = read_manifest(prefix)
    if existing is not None and not overwrite:
        diff = sorted(k for k in settings if existing.get("settings", {}).get(k) != settings[k])
        if diff:
            raise FileExistsError(f"{prefix}.bin/.idx exist but were built with different {diff}; pass "
                                  f"--overwrite (overwrite=True) to rebuild, or choose another output prefix")
        log(f"{prefix}: complete output exists ({existing['documents']} documents, {existing['tokens']} "
            f"tokens); skipping (--overwrite rebuilds)")
        return PreprocessResult(prefix, existing["documents"], existing["tokens"], existing["skipped_rows"],
                                [tuple(b) for b in existing.get("bad_rows", [])], reused=True)
    if existing is None and not overwrite:
        _refuse_untrusted_outputs(prefix, paths)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(prefix, log)
    dtype = DType.optimal_dtype(tok.vocab_size)
    documents = tokens = 0
    bad: list[tuple[str, str]] = []
    skipped = 0
    pool = bar = builder = None
    try:
        builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=dtype)
        jobs = _jobs(files, text_field, split, chunk_rows)
        if workers == 1:
            global _TOKENIZER
            _TOKENIZER = tok
            results = map(_process_chunk, jobs)
        else:
            import multiprocessing as mp

            # spawn, not fork: the parent may hold torch/tokenizers thread pools that do not survive fork.
            pool = mp.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(None if tokenizer is None else str(tokenizer), eod_token))
            results = _bounded_imap(pool, jobs, window=4 * workers)
        bar = _progress(progress, files)
        for flat, lengths, chunk_bad in results:
            if chunk_bad:
                if not skip_bad_rows:
                    w, reason = chunk_bad[0]
                    raise BadRecordError(w, reason + " (pass --skip-bad-rows to skip and count bad rows)")
                for b in chunk_bad:
                    if len(bad) < _MAX_BAD_IN_MANIFEST:
                        bad.append(b)
                skipped += len(chunk_bad)
            if len(flat) and int(flat.max()) >= tok.vocab_size:
                raise ValueError(f"token id {int(flat.max())} >= vocab_size {tok.vocab_size}: the tokenizer's "
                                 f"vocabulary and its reported size disagree")
            arr = flat.astype(dtype, copy=False)
            pos = 0
            for n in lengths.tolist():
                builder.add_document(arr[pos:pos + n], [n])
                pos += n
            documents += len(lengths)
            tokens += int(lengths.sum())
            if bar is not None:
                bar.update(len(lengths) + len(chunk_bad))
                bar.set_postfix(tokens=tokens, refresh=False)
        if documents == 0:
            raise ValueError(f"no documents in {files}" + (f" ({skipped} bad rows skipped)" if skipped else "")
                             + ": refusing to write an empty dataset")
        builder.finalize(str(tmp["idx"]))
        # Rename data first, manifest last: a crash at any point leaves no manifest naming these files,
        # so a rerun never mistakes a partial output for a complete one.
        paths["manifest"].unlink(missing_ok=True)
        os.replace(tmp["bin"], paths["bin"])
        os.replace(tmp["idx"], paths["idx"])
        manifest = {
            "version": MANIFEST_VERSION, "settings": settings, "documents": documents, "tokens": tokens,
            "skipped_rows": skipped, "bad_rows": bad, "dtype": np.dtype(dtype).name,
            "bin_bytes": paths["bin"].stat().st_size, "idx_bytes": paths["idx"].stat().st_size,
        }
        tmp["manifest"].write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp["manifest"], paths["manifest"])
    finally:
        if bar is not None:
            bar.close()
        if builder is not None and not builder.data_file.closed:  # failed before finalize()
            builder.data_file.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for p in tmp.values():
            p.unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    msg = f"{prefix}: wrote {documents} documents, {tokens} tokens (incl. EOD) in {dt:.1f}s"
    if skipped:
        msg += f"; skipped {skipped} bad rows, first: " + "; ".join(f"{w}: {r}" for w, r in bad[:3])
    log(msg)
    return PreprocessResult(prefix, documents, tokens, skipped, bad, seconds=dt)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:  # one of them does not exist
        return False


def _refuse_outputs_over_inputs(prefix: str, inputs: list[str], outputs: list[Path]) -> None:
    """An output (or temporary) that is one of the inputs would destroy the input: refuse, whatever --overwrite.

    (Temporaries end in .bin/.idx/.manifest, which are no input format, so the clean-up of interrupted runs
    never meets an input either.)
    """
    for f in (Path(f) for f in inputs if not f.startswith("hf:")):
        hit = next((o for o in outputs if _same_file(o, f)), None)
        if hit is not None:
            raise ValueError(f"output {hit} would overwrite the input {f}: the output prefix {prefix!r} writes "
                             f"{prefix}.bin, {prefix}.idx and the manifest {prefix}.json; choose another --output-prefix")


def _refuse_untrusted_outputs(prefix: str, paths: dict[str, Path]) -> None:
    """Files under the output names that no tandem manifest accounts for are never replaced silently.

    A ``.bin``/``.idx`` is ours when ``<prefix>.json`` is a tandem-preprocess manifest recording its size
    (e.g. the other file was deleted); anything else there (another tool's file, a truncated copy, the
    leftover of a run killed between its renames) stops the run until ``--overwrite`` says to replace it.
    """
    manifest = paths["manifest"]
    recorded = None
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
            recorded = m if isinstance(m, dict) and "settings" in m and "version" in m else None
        except (OSError, ValueError):
            recorded = None
        if recorded is None:
            raise FileExistsError(f"{manifest} exists and is not a tandem-preprocess manifest; it would be replaced "
                                  f"by this output's manifest. Choose another output prefix, or pass --overwrite")
    foreign = [p for kind, p in (("bin", paths["bin"]), ("idx", paths["idx"]))
               if p.exists() and (recorded is None or p.stat().st_size != recorded.get(f"{kind}_bytes"))]
    if foreign:
        why = "absent" if recorded is None else "it records other sizes"
        raise FileExistsError(f"{' and '.join(map(str, foreign))} exist{'s' if len(foreign) == 1 else ''} without a "
                              f"matching tandem manifest ({manifest}: {why}), e.g. from another tool, another run, a "
                              f"run killed while renaming or a truncated copy. Pass --overwrite to replace "
                              f"{'it' if len(foreign) == 1 else 'them'}, or choose another output prefix")


def _remove_stale_temporaries(prefix: str, log) -> None:
    """Delete ``<prefix>.tmp<pid>.*`` left by a killed run (SIGKILL skips cleanup); a live pid's are kept."""
    import re

    folder, base = Path(prefix).parent, Path(prefix).name
    pat = re.compile(re.escape(base) + r"\.tmp(\d+)\.(bin|idx|manifest)$")
    for f in folder.iterdir():
        m = pat.match(f.name)
        if m and not _pid_alive(int(m.group(1))):
            log(f"removing {f} left by an interrupted run")
            f.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _progress(enabled: bool, files: list[str]):
    if not enabled:
        return None
    from tqdm import tqdm

    total = None
    try:  # Parquet knows its row count up front; JSON Lines would need a full pass, so no total there.
        if all(f.lower().endswith(".parquet") for f in files):
            import pyarrow.parquet as pq

            total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except Exception:  # the count is cosmetic; reading errors surface with their location below
        total = None
    return tqdm(total=total, unit="docs", desc="tokenising", file=sys.stderr, mininterval=0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tandem-preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", "-i", nargs="+", required=True,
                   help="JSONL/Parquet files, save_to_disk folders, folders of files, or hf:<name>[:<config>]")
    p.add_argument("--output-prefix", "-o", required=True, help="writes <prefix>.bin, .idx and .json")
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder or tokenizer.json (default: shipped)")
    p.add_argument("--eod-token", default=None, help="token that ends each document (default: the tokenizer's eos)")
    p.add_argument("--text-field", default="text", help="field holding the document text (default: text)")
    p.add_argument("--split", default=None, help="split of a DatasetDict / load_dataset source")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1: in-process)")
    p.add_argument("--chunk-rows", type=int, default=512, help="rows per work unit")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of failing")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if a complete output exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    import warnings

    # megatron-core warns on import that TE/Apex are absent; irrelevant to writing indexed files.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    try:
        preprocess(args.input, args.output_prefix, tokenizer=args.tokenizer, eod_token=args.eod_token,
                   text_field=args.text_field, split=args.split, workers=args.workers,
                   chunk_rows=args.chunk_rows, skip_bad_rows=args.skip_bad_rows, overwrite=args.overwrite,
                   progress=not args.no_progress)
    except (BadRecordError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"tandem-preprocess: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
