import gzip
import json

import pytest

from dp_helpers import write_jsonl
from tandem.data_pipelines.readers import BadRecordError, ReadStats, iter_records, require_fields


def sft_schema(row):
    """The kind of hook the SFT issue will supply: a list of {role, content} messages."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "field 'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant", "tool"):
            return f"messages[{i}] must be {{role: system|user|assistant|tool, content: str}}, got {m!r}"
    return None


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_jsonl_records_with_schema(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD, "", {"messages": [{"role": "robot", "content": "x"}]}, GOOD])
    with pytest.raises(BadRecordError, match=r"sft\.jsonl:3: messages\[0\] must be"):
        list(iter_records(path, schema=sft_schema))
    stats = ReadStats()
    recs = list(iter_records(path, schema=sft_schema, bad_rows="skip", stats=stats))
    assert [r.line for r in recs] == [1, 4] and recs[1].where.endswith("sft.jsonl:4")  # blank line 2 is no row
    assert stats.rows == 3 and stats.skipped == 1 and stats.bad[0][0].endswith("sft.jsonl:3")


def test_require_fields_and_gzip(tmp_path):
    p = tmp_path / "rl.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
        f.write(json.dumps({"prompt": "3+3?", "answer": 6}) + "\n")
        f.write(json.dumps({"question": "?"}) + "\n")
    schema = require_fields(prompt=str, answer=(str, int))
    with pytest.raises(BadRecordError, match=r"rl\.jsonl\.gz:3: missing field 'prompt'"):
        list(iter_records(p, schema=schema))
    stats = ReadStats()
    recs = list(iter_records(p, schema=schema, bad_rows="skip", stats=stats))
    assert [r.data["answer"] for r in recs] == ["4", 6] and stats.skipped == 1
    with pytest.raises(BadRecordError, match=r":1: field 'answer' must be int, got str"):
        list(iter_records(p, schema=require_fields(answer=int)))


def test_parquet_and_hf_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b", None], "answer": ["1", "2", "3"]}), tmp_path / "p.parquet")
    with pytest.raises(BadRecordError, match=r"p\.parquet:row 3: field 'prompt' must be str, got NoneType"):
        list(iter_records(tmp_path / "p.parquet", schema=require_fields(prompt=str)))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["x", "y"]}),
                               "test": datasets.Dataset.from_dict({"prompt": ["z"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.data["prompt"] for r in iter_records(tmp_path / "dd", split="test")] == ["z"]
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['test', 'train'\]; pick one"):
        list(iter_records(tmp_path / "dd"))
    with pytest.raises(ValueError, match="split 'dev' not found"):
        list(iter_records(tmp_path / "dd", split="dev"))
    # load_dataset on a local folder of JSON Lines (the hf: source), streaming
    (tmp_path / "lf").mkdir()
    write_jsonl(tmp_path / "lf" / "train.jsonl", [{"prompt": "p1"}, {"prompt": "p2"}])
    recs = list(iter_records(f"hf:{tmp_path / 'lf'}"))
    assert [r.data["prompt"] for r in recs] == ["p1", "p2"] and recs[0].where.endswith(":row 1")


def test_json_array_file_gets_a_hint(tmp_path):
    (tmp_path / "arr.json").write_text('[\n  {"text": "a"},\n  {"text": "b"}\n]\n')
    with pytest.raises(BadRecordError, match=r"arr\.json:1: malformed JSON .*one JSON array.*JSON Lines"):
        list(iter_records(tmp_path / "arr.json"))


def test_unknown_format_and_bad_mode(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv: unknown input format"):
        list(iter_records(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="bad_rows must be"):
        list(iter_records(tmp_path / "x.csv", bad_rows="ignore"))
