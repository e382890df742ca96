"""RL prompt datasets: the row schema, and errors that name file:line and the key."""

import json
import re

import pytest

from tandem.data_pipelines.readers import BadRecordError, ReadStats
from tandem.data_pipelines.rl_prompts import iter_rl_prompts, load_rl_prompts, rl_prompt_schema

GOOD = [
    {"prompt": "What is 1+1?", "task": "math", "answer": "2"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "6*7?"}],
     "task": "math", "answer": 42, "metadata": {"source": "toy", "level": 1}},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loads_prompts_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", GOOD)
    a, b = load_rl_prompts(path, tasks=["math"])
    assert (a.prompt, a.messages, a.task, a.answer, a.metadata, a.where) == ("What is 1+1?", None, "math", "2", {},
                                                                          f"{path}:1")
    assert b.prompt is None and b.messages[1] == {"role": "user", "content": "6*7?"} and b.answer == 42
    assert b.as_sample() == {"task": "math", "answer": 42, "metadata": {"source": "toy", "level": 1},
                             "where": f"{path}:2", "messages": b.messages}
    assert "messages" not in a.as_sample() and a.as_sample()["prompt"] == "What is 1+1?"


@pytest.mark.parametrize("row, key, message", [
    ({"task": "math", "answer": "1"}, "prompt", "exactly one of the fields 'prompt' and 'messages', it has neither"),
    ({"prompt": "q", "messages": [{"role": "user", "content": "q"}], "task": "math", "answer": "1"}, "prompt",
     "it has both"),
    ({"prompt": "   ", "task": "math", "answer": "1"}, "prompt", "field 'prompt' is empty"),
    ({"prompt": 3, "task": "math", "answer": "1"}, "prompt", "field 'prompt' must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}], "task": "math",
      "answer": "1"}, "messages[1].role", "must be one of system, user, assistant, tool, got 'robot'"),
    ({"messages": [{"role": "user"}], "task": "math", "answer": "1"}, "messages[0].content", "missing field"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "task": "math",
      "answer": "1"}, "messages", "ends with an assistant turn"),
    ({"messages": [], "task": "math", "answer": "1"}, "messages", "non-empty list"),
    ({"prompt": "q", "answer": "1"}, "task", "missing field"),
    ({"prompt": "q", "task": "chess", "answer": "1"}, "task", "'chess', which has no environment; known tasks: ['math']"),
    ({"prompt": "q", "task": "math"}, "answer", "missing field"),
    ({"prompt": "q", "task": "math", "answer": True}, "answer", "must be a string, number or list, got bool"),
    ({"prompt": "q", "task": "math", "answer": "1", "metadata": [1]}, "metadata", "must be an object, got list"),
])
def test_schema_errors_name_file_line_and_key(tmp_path, row, key, message):
    path = write_jsonl(tmp_path / "rl.jsonl", [GOOD[0], GOOD[1], row])
    with pytest.raises(BadRecordError) as e:
        load_rl_prompts(path, tasks=["math"])
    text = str(e.value)
    assert text.startswith(f"{path}:3: "), text
    assert f"'{key}'" in text and message in text, text
    assert e.value.where == f"{path}:3"


def test_malformed_json_line_and_skip_mode(tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", [GOOD[0], "{not json", {"prompt": "q", "task": "math"}, GOOD[1]])
    with pytest.raises(BadRecordError, match=re.escape(f"{path}:2: malformed JSON")):
        load_rl_prompts(path)
    stats = ReadStats()
    kept = list(iter_rl_prompts(path, bad_rows="skip", stats=stats))
    assert [p.where for p in kept] == [f"{path}:1", f"{path}:4"]
    assert stats.skipped == 2 and stats.bad[1] == (f"{path}:3", "missing field 'answer'")


def test_default_task_and_empty_dataset(tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "q", "answer": "1"}])
    assert load_rl_prompts(path, default_task="math")[0].task == "math"
    with pytest.raises(BadRecordError, match="'task' is 'math', which has no environment"):
        load_rl_prompts(path, default_task="math", tasks=["code"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no RL prompts"):
        load_rl_prompts(empty)


def test_parquet_rows_with_null_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "prompt": ["What is 2+2?", None, None],
        "messages": [None, [{"role": "user", "content": "3+3?"}], None],
        "task": ["math", "math", "math"],
        "answer": ["4", "6", "0"],
    })
    path = tmp_path / "rl.parquet"
    pq.write_table(table, path)
    with pytest.raises(BadRecordError, match=re.escape(f"{path}:row 3: a row needs exactly one of the fields 'prompt' and 'messages'")):
        load_rl_prompts(path)
    pq.write_table(table.slice(0, 2), path)
    a, b = load_rl_prompts(path)
    assert a.prompt == "What is 2+2?" and a.messages is None and b.messages == [{"role": "user", "content": "3+3?"}]
    assert b.where == f"{path}:row 2"


def test_schema_hook_alone():
    check = rl_prompt_schema(tasks={"math"})
    assert check({"prompt": "q", "task": "math", "answer": [1, 2]}) is None
    assert "answer" in check({"prompt": "q", "task": "math", "answer": None})
