import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dp_helpers import make_texts, write_jsonl
from tandem.data_pipelines.preprocess import main, preprocess, read_manifest
from tandem.data_pipelines.readers import BadRecordError

REPO = Path(__file__).resolve().parents[2]


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds


def expected(tok, texts):
    return [tok.encode(t) + [tok.eod] for t in texts]


def test_jsonl_round_trip(tmp_path, tok):
    texts = make_texts(60) + [""]  # an empty document is kept: it becomes a lone EOD
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    data = Path(src).read_bytes()
    Path(src).write_bytes(b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n"))  # BOM + CRLF (Windows editors)
    res = preprocess(src, tmp_path / "out" / "a", progress=False, log=lambda *_: None)
    docs, ds = read_docs(tmp_path / "out" / "a")
    assert docs == expected(tok, texts)
    assert res.documents == len(texts) and res.tokens == sum(map(len, docs)) and res.skipped_rows == 0
    assert np.array_equal(ds.document_indices, np.arange(len(texts) + 1))  # one sequence per document
    assert ds.index.dtype == np.uint16  # vocab 512 fits the compact dtype


def test_parquet_hf_disk_and_folder_inputs(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = make_texts(30, seed=1)
    pq.write_table(pa.table({"body": texts[:15], "n": list(range(15))}), tmp_path / "p.parquet", row_group_size=4)
    datasets.Dataset.from_dict({"body": texts[15:]}).save_to_disk(str(tmp_path / "hf"))
    preprocess([tmp_path / "p.parquet", tmp_path / "hf"], tmp_path / "mix", text_field="body",
               progress=False, log=lambda *_: None)
    assert read_docs(tmp_path / "mix")[0] == expected(tok, texts)
    with pytest.raises(BadRecordError, match=r"hf:row 1: missing field 'text'"):
        preprocess(tmp_path / "hf", tmp_path / "nofield", progress=False, log=lambda *_: None)
    # a folder of files is read in name order
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": t} for t in texts[10:]])
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in texts[:10]])
    preprocess(folder, tmp_path / "dir", progress=False, log=lambda *_: None)
    assert read_docs(tmp_path / "dir")[0] == expected(tok, texts)


def test_workers_give_identical_output(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in make_texts(200, seed=2)])
    preprocess(src, tmp_path / "one", chunk_rows=16, progress=False, log=lambda *_: None)
    preprocess(src, tmp_path / "two", chunk_rows=16, workers=2, progress=False, log=lambda *_: None)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


BAD_ROWS = [
    ('{"text": "fine"}', None),
    ('{"text": "broken"', "malformed JSON"),
    ('{"title": "no text"}', "missing field 'text'"),
    ('{"text": 17}', "must be a string, got int"),
    ('{"text": "\\ud800 lone surrogate"}', "not valid UTF-8"),
    ('[1, 2]', "expected a JSON object"),
]


def _bad_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    with open(p, "wb") as f:
        for line, _ in BAD_ROWS:
            f.write(line.encode() + b"\n")
        f.write(b'{"text": "caf\xe9"}\n')  # latin-1 byte: invalid UTF-8, line 7
        f.write(b'{"text": "also fine"}\n')
    return str(p)


def test_bad_rows_fail_with_file_and_line(tmp_path):
    src = _bad_file(tmp_path)
    with pytest.raises(BadRecordError, match=r"bad\.jsonl:2: malformed JSON"):
        preprocess(src, tmp_path / "o", progress=False, log=lambda *_: None)
    # nothing under the final names, no temporaries left behind
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    lines = Path(src).read_bytes().splitlines(keepends=True)
    for lineno, (_, reason) in enumerate(BAD_ROWS, start=1):
        if reason is None:
            continue
        one = tmp_path / f"only{lineno}.jsonl"
        one.write_bytes(lines[0] * (lineno - 1) + lines[lineno - 1])  # the bad row sits at line `lineno`
        with pytest.raises(BadRecordError, match=rf"only{lineno}\.jsonl:{lineno}: .*{reason}"):
            preprocess(str(one), tmp_path / f"o{lineno}", progress=False, log=lambda *_: None)


def test_bad_rows_skipped_and_counted(tmp_path, tok):
    src = _bad_file(tmp_path)
    logged = []
    res = preprocess(src, tmp_path / "o", skip_bad_rows=True, progress=False, log=logged.append)
    assert res.skipped_rows == 6 and res.documents == 2
    assert [w.rsplit(":", 1)[1] for w, _ in res.bad_rows] == ["2", "3", "4", "5", "6", "7"]
    assert "invalid UTF-8" in res.bad_rows[-1][1]
    assert read_docs(tmp_path / "o")[0] == expected(tok, ["fine", "also fine"])
    assert "skipped 6 bad rows" in logged[0] and "bad.jsonl:2" in logged[0]
    assert read_manifest(str(tmp_path / "o"))["skipped_rows"] == 6


def test_parquet_bad_rows_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ok", None, "ok"]}), tmp_path / "n.parquet")
    with pytest.raises(BadRecordError, match=r"n\.parquet:row 2: field 'text' must be a string, got NoneType"):
        preprocess(tmp_path / "n.parquet", tmp_path / "o", progress=False, log=lambda *_: None)
    with pytest.raises(BadRecordError, match=r"n\.parquet:row 1: missing field 'body'"):
        preprocess(tmp_path / "n.parquet", tmp_path / "o", text_field="body", progress=False, log=lambda *_: None)


def test_idempotent_and_crash_safe(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in make_texts(20)])
    out = tmp_path / "o"
    first = preprocess(src, out, progress=False, log=lambda *_: None)
    mtime = os.stat(f"{out}.bin").st_mtime_ns
    again = preprocess(src, out, progress=False, log=lambda *_: None)
    assert again.reused and again.tokens == first.tokens and os.stat(f"{out}.bin").st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="different \\['text_field'\\]"):
        preprocess(src, out, text_field="body", progress=False, log=lambda *_: None)
    with open(src, "a") as f:  # the input grew since: the old output is stale
        f.write('{"text": "one more"}\n')
    with pytest.raises(FileExistsError, match="different \\['input_bytes'\\]"):
        preprocess(src, out, progress=False, log=lambda *_: None)
    first = preprocess(src, out, overwrite=True, progress=False, log=lambda *_: None)
    mtime = os.stat(f"{out}.bin").st_mtime_ns
    # a truncated .bin (e.g. a copy cut short) no longer matches the manifest: rebuilt, not trusted
    with open(f"{out}.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(FileExistsError, match="without a matching tandem manifest"):
        preprocess(src, out, progress=False, log=lambda *_: None)
    rebuilt = preprocess(src, out, overwrite=True, progress=False, log=lambda *_: None)
    assert not rebuilt.reused and read_manifest(str(out))["tokens"] == first.tokens
    # a lone .bin that no manifest accounts for (here: a run killed between its renames, which removes the
    # manifest first) is not replaced silently
    os.rename(f"{out}.json", f"{out}.json.bak")
    os.remove(f"{out}.idx")
    with pytest.raises(FileExistsError, match=r"o.bin exists without a matching tandem manifest \(.*o.json: absent\)"):
        preprocess(src, out, progress=False, log=lambda *_: None)
    os.rename(f"{out}.json.bak", f"{out}.json")
    # the .idx deleted, the .bin still of the size its manifest records: ours, simply rebuilt; temporaries
    # of a killed run (dead pid) are removed, those of a live run are not touched
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"o.tmp{int(dead.stdout)}.bin"
    live = tmp_path / f"o.tmp{os.getppid()}.bin"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    assert not preprocess(src, out, progress=False, log=lambda *_: None).reused
    assert not stale.exists() and live.exists()


def test_empty_input_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(ValueError, match="no documents"):
        preprocess(src, tmp_path / "o", progress=False, log=lambda *_: None)
    assert not (tmp_path / "o.bin").exists()
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="holds no .jsonl"):
        preprocess(tmp_path / "emptydir", tmp_path / "o", progress=False, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocess(tmp_path / "missing.jsonl", tmp_path / "o", progress=False, log=lambda *_: None)


def test_cli_main_reports_errors(tmp_path, capsys):
    src = _bad_file(tmp_path)
    assert main(["-i", src, "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: malformed JSON" in err and "--skip-bad-rows" in err


def _tree_hashes(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def _refusals(tmp_path):
    """(argv, expected words in the one error line) of outputs that would replace something already there."""
    corpus = write_jsonl(tmp_path / "corpus.json", [{"text": t} for t in make_texts(3)])  # .json is JSON Lines
    os.link(corpus, tmp_path / "linked.json")
    (tmp_path / "lone.idx").write_bytes(b"someone else's index")
    (tmp_path / "notes.json").write_text('{"mine": true}\n')
    return {
        "output-is-input": (["-i", corpus, "-o", str(tmp_path / "corpus"), "--overwrite"], "would overwrite the input"),
        "output-is-input-via-dotdot": (["-i", corpus, "-o", str(tmp_path / "x" / ".." / "corpus")], "would overwrite the input"),
        "manifest-hard-link-of-input": (["-i", corpus, "-o", str(tmp_path / "linked"), "--overwrite"], "would overwrite the input"),
        "lone-idx": (["-i", corpus, "-o", str(tmp_path / "lone")], "lone.idx exists without a matching tandem manifest"),
        "foreign-json": (["-i", corpus, "-o", str(tmp_path / "notes")], "not a tandem-preprocess manifest"),
    }


@pytest.mark.parametrize("case", ["output-is-input", "output-is-input-via-dotdot", "manifest-hard-link-of-input",
                                  "lone-idx", "foreign-json"])
def test_cli_refuses_to_replace_inputs_or_foreign_files(tmp_path, case):
    """Exit 2, one line on stderr, and every file that was there is byte-identical afterwards."""
    args, needle = _refusals(tmp_path)[case]
    before = _tree_hashes(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tandem.data_pipelines.preprocess", *args, "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("tandem-preprocess: error:") and needle in lines[0], proc.stderr
    assert _tree_hashes(tmp_path) == before


def test_cli_subprocess(tmp_path, tok):
    texts = make_texts(10)
    src = write_jsonl(tmp_path / "c.jsonl", [{"content": t} for t in texts])
    proc = subprocess.run(
        [sys.executable, "-m", "tandem.data_pipelines.preprocess", "--input", src, "--output-prefix",
         str(tmp_path / "cli"), "--text-field", "content", "--workers", "2"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    n_tokens = sum(len(d) for d in expected(tok, texts))
    assert f"wrote 10 documents, {n_tokens} tokens" in proc.stdout
    assert "tokenising" in proc.stderr  # the progress bar
    assert read_docs(tmp_path / "cli")[0] == expected(tok, texts)


def test_parallel_reading_is_bounded():
    """The reader may run at most `window` chunks ahead of the writer (a whole file never sits in memory)."""
    from tandem.data_pipelines.preprocess import _bounded_imap

    state = {"read": 0, "consumed": 0, "max_ahead": 0}

    class Done:
        def __init__(self, v):
            self.v = v

        def get(self):
            return self.v

    class FakePool:
        def apply_async(self, fn, args):
            return Done(args[0])

    def jobs():
        for i in range(100):
            state["read"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["read"] - state["consumed"])
            yield i

    out = []
    for v in _bounded_imap(FakePool(), jobs(), window=3):
        state["consumed"] += 1
        out.append(v)
    assert out == list(range(100)) and state["max_ahead"] <= 3
