"""SFT data: schema validation with file:line, overlong policy, FFD packing invariants, determinism."""

import json
import random

import pytest
import torch
from dp_helpers import CHAT_TOOLS, write_jsonl

from tandem.data_pipelines import sft_synthetic
from tandem.data_pipelines.chat import render_prompt, render_sft_samples
from tandem.data_pipelines.packing import IGNORE_LABEL, Collator, build_dataloader
from tandem.data_pipelines.readers import BadRecordError
from tandem.data_pipelines.sft import SFTPackedDataset, first_fit_decreasing, iter_conversations, validate_conversation

U = {"role": "user", "content": "What is 1 + 1?"}
A = {"role": "assistant", "content": "2", "reasoning_content": "1 + 1 = 2"}
GOOD = {"messages": [U, A]}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 1}}]}
TOOL = {"role": "tool", "content": "2"}


@pytest.mark.parametrize("row,problem", [
    ({"messages": [U, {"role": "bot", "content": "x"}]}, r"messages\[1\]: unknown role 'bot'"),
    ({"messages": [U, {"content": "x"}]}, r"messages\[1\]: missing 'role'"),
    ({"messages": [{"role": "system", "content": "s"}, U]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "  "}, A]}, r"messages\[0\]: user message has empty content"),
    ({"messages": [U, {"role": "assistant", "content": "", "reasoning_content": "r"}]},
     r"messages\[1\]: assistant message has neither content nor tool calls"),
    ({"messages": [U, CALL, TOOL, A], "tools": [{"name": "lookup"}]}, r"tool call 'add' names a tool that is not defined \(the row's tools are \['lookup'\]\)"),
    ({"messages": [U, CALL, TOOL, A]}, "the row defines no tools"),
    ({"messages": [U, TOOL, A]}, r"messages\[1\]: tool message without a preceding assistant tool call"),
    ({"messages": [U, CALL, TOOL, TOOL, A], "tools": CHAT_TOOLS}, r"messages\[3\]: tool message without"),
    ({"messages": [U, A, {"role": "system", "content": "s"}]}, r"messages\[2\]: a system message is only allowed as the first"),
    ({"messages": "hi"}, "field 'messages' must be a non-empty list"),
    ({"messages": []}, "field 'messages' must be a non-empty list of messages, got an empty list"),
    ({"prompt": "hi"}, "missing field 'messages'"),
    ({"messages": [U, {"role": "assistant", "content": 3}]}, r"field 'messages\[1\].content' must be a string, got int"),
    ({"messages": [U, A], "enable_thinking": "yes"}, "'enable_thinking' must be true or false"),
    ({"messages": [U, dict(A, tool_calls={"name": "add"})], "tools": CHAT_TOOLS}, r"tool_calls must be a list"),
    ({"messages": [U, dict(CALL, tool_calls=[{"name": "add", "arguments": "{bad"}]), A], "tools": CHAT_TOOLS},
     r"tool_calls\[0\].arguments is a string but not valid JSON"),
    ({"messages": [U, dict(CALL, tool_calls=[{"arguments": {}}]), A], "tools": CHAT_TOOLS}, r"tool_calls\[0\] has no 'name'"),
    ({"messages": [dict(U, reasoning_content="r"), A]}, "'reasoning_content' is only allowed on assistant"),
    ({"messages": [U, A], "tools": [{"description": "x"}]}, r"tools\[0\] has no 'name'"),
    ({"messages": [U, A], "tools": {"name": "add"}}, "field 'tools' must be a list"),
])
def test_bad_rows_name_file_line_and_problem(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row, GOOD])
    with pytest.raises(BadRecordError, match=rf"d\.jsonl:2: .*{problem}") as e:
        list(iter_conversations(path))
    assert e.value.where.endswith("d.jsonl:2")
    from tandem.data_pipelines.readers import ReadStats
    stats = ReadStats()
    assert len(list(iter_conversations(path, bad_rows="skip", stats=stats))) == 2
    assert stats.skipped == 1 and stats.bad[0][0].endswith("d.jsonl:2")


def test_normalisation_of_valid_rows():
    conv = validate_conversation({
        "messages": [U, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "content": {"sum": 2}}, A],
        "tools": json.dumps(CHAT_TOOLS), "enable_thinking": False})
    assert conv.messages[1] == {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1}}]}
    assert conv.messages[2]["content"] == '{"sum": 2}' and conv.tools == CHAT_TOOLS and conv.enable_thinking is False


def test_parquet_and_hf_datasets_with_tool_calls_read_like_jsonl(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": [U, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 1}'}}]},
        TOOL, {"role": "assistant", "content": "2"}], "tools": CHAT_TOOLS}, GOOD]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")  # absent struct fields become None
    write_jsonl(tmp_path / "d.jsonl", rows)
    a = SFTPackedDataset(str(tmp_path / "d.parquet"), tok, 512)
    b = SFTPackedDataset(str(tmp_path / "d.jsonl"), tok, 512)
    assert [a.sample(k) for k in range(a.stats.samples)] == [b.sample(k) for k in range(b.stats.samples)]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))  # Arrow: the same None-filling
    c = SFTPackedDataset(str(tmp_path / "hf"), tok, 512)
    assert [c.sample(k) for k in range(c.stats.samples)] == [b.sample(k) for k in range(b.stats.samples)]
    bad = [{"messages": [U, {"role": "robot", "content": "x"}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(BadRecordError, match=r"bad\.parquet:row 1: messages\[1\]: unknown role 'robot'"):
        SFTPackedDataset(str(tmp_path / "bad.parquet"), tok, 512)


def _rows_of_lengths(tok, n_tokens_list):
    """Conversations whose (single) sample has roughly the given number of tokens."""
    rows = []
    for k, n in enumerate(n_tokens_list):
        rows.append({"messages": [{"role": "user", "content": f"q{k}"},
                                  {"role": "assistant", "content": " ".join(["the"] * n)}]})
    return rows


def test_overlong_drop_and_truncate_are_counted(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", _rows_of_lengths(tok, [5, 10, 80, 120, 20]))
    lengths = [len(render_sft_samples(validate_conversation(r).messages, tok)[0]["input_ids"])
               for r in _rows_of_lengths(tok, [5, 10, 80, 120, 20])]
    seq_len = 64
    n_long = sum(n > seq_len for n in lengths)
    assert n_long == 2
    drop = SFTPackedDataset(path, tok, seq_len, overlong="drop")
    assert (drop.stats.dropped, drop.stats.truncated, drop.stats.samples) == (2, 0, 3)
    cut = SFTPackedDataset(path, tok, seq_len, overlong="truncate")
    assert (cut.stats.dropped, cut.stats.truncated, cut.stats.samples) == (0, 2, 5)
    assert sorted(len(cut.sample(k)["input_ids"]) for k in range(5)) == sorted(min(n, seq_len) for n in lengths)
    # a cut that leaves nothing to train drops the sample
    long_prompt = [{"messages": [{"role": "user", "content": "the " * 100}, {"role": "assistant", "content": "x"}]}, GOOD]
    s = SFTPackedDataset(write_jsonl(tmp_path / "p.jsonl", long_prompt), tok, 64, overlong="truncate")
    assert (s.stats.dropped, s.stats.truncated, s.stats.samples) == (1, 0, 1)
    with pytest.raises(ValueError, match="no SFT samples left"):
        SFTPackedDataset(write_jsonl(tmp_path / "q.jsonl", long_prompt[:1]), tok, 64, overlong="drop")
    with pytest.raises(ValueError, match="overlong"):
        SFTPackedDataset(path, tok, 64, overlong="cut")


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    return str(sft_synthetic.write(tmp_path_factory.mktemp("sft") / "s.jsonl", 300, seed=3))


def test_packed_rows_invariants(synth_path, tok):
    ds = SFTPackedDataset(synth_path, tok, 200, seed=1)
    T = 200
    seen = []
    targets = 0
    for i in range(len(ds)):
        r = ds[i]
        ids, lab, lm, sidx, pos, valid = (r[k] for k in ("input_ids", "labels", "loss_mask", "seq_idx", "position_ids", "valid"))
        assert ids.dtype == lab.dtype == sidx.dtype == torch.long and lm.dtype == torch.float32 and ids.shape == (T,)
        assert torch.equal(lm.bool(), lab != IGNORE_LABEL)  # labels are IGNORE wherever nothing is trained
        assert (sidx[1:] >= sidx[:-1]).all() and sidx[0] == 0
        assert (sidx[~valid] == r["num_docs"]).all() and (lab[~valid] == IGNORE_LABEL).all()
        t = torch.nonzero(lab != IGNORE_LABEL).flatten()
        assert (t < T - 1).all() and torch.equal(lab[t], ids[t + 1]) and torch.equal(sidx[t], sidx[t + 1])  # no cross-sample label
        pos0 = 0
        for d, k in enumerate(ds.row_samples(i)):
            s = ds.sample(k)
            n = len(s["input_ids"])
            seen.append(k)
            assert ids[pos0:pos0 + n].tolist() == s["input_ids"] and (sidx[pos0:pos0 + n] == d).all()
            assert pos[pos0:pos0 + n].tolist() == list(range(n))
            assert lm[pos0:pos0 + n - 1].tolist() == s["loss_mask"][1:] and lab[pos0 + n - 1] == IGNORE_LABEL
            pos0 += n
        assert valid.sum() == pos0
        targets += int(lm.sum())
    assert sorted(seen) == list(range(ds.stats.samples))  # every sample in exactly one row
    # the targets are exactly the assistant tokens the renderer trains, independently re-rendered
    expected = sum(sum(s["loss_mask"][1:]) for c in iter_conversations(synth_path)
                   for s in render_sft_samples(c.messages, tok, enable_thinking=c.enable_thinking))
    assert targets == ds.stats.target_tokens == expected
    assert ds.stats.rows == len(ds) and 0.9 < ds.stats.fill_rate <= 1.0
    batch = next(iter(build_dataloader(ds, micro_batch_size=4, eod=tok.eod)))
    assert batch["input_ids"].shape == (4, T) and torch.equal(batch["seq_idx"][0], ds[0]["seq_idx"])
    assert set(Collator(tok.eod)([ds[0]])) >= {"input_ids", "labels", "loss_mask", "seq_idx", "position_ids", "valid"}


def test_first_fit_decreasing_matches_a_plain_reference_and_packs_tightly():
    def reference(lengths, cap):
        bins, used = [], []
        for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
            for b in range(len(bins)):
                if used[b] + lengths[i] <= cap:
                    bins[b].append(i)
                    used[b] += lengths[i]
                    break
            else:
                bins.append([i])
                used.append(lengths[i])
        return bins

    rng = random.Random(0)
    for _ in range(50):
        cap = rng.randint(5, 100)
        lengths = [rng.randint(1, cap) for _ in range(rng.randint(0, 300))]
        bins = first_fit_decreasing(lengths, cap)
        assert bins == reference(lengths, cap)
        used = [sum(lengths[i] for i in b) for b in bins]
        assert all(u <= cap for u in used)
        # first fit: no two rows could have been one (the later row's first item did not fit the earlier)
        assert all(used[a] + used[b] > cap for a in range(len(used)) for b in range(a + 1, len(used)))
    with pytest.raises(ValueError):
        first_fit_decreasing([3, 11], 10)


def test_deterministic_given_the_seed(synth_path, tok):
    a, b = SFTPackedDataset(synth_path, tok, 256, seed=5), SFTPackedDataset(synth_path, tok, 256, seed=5)
    c = SFTPackedDataset(synth_path, tok, 256, seed=6)
    assert len(a) == len(b)
    for i in range(len(a)):
        assert all(torch.equal(a[i][k], b[i][k]) for k in ("input_ids", "labels", "loss_mask", "seq_idx"))
    assert any(not torch.equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(min(len(a), len(c))))
    assert a.stats.as_dict() == b.stats.as_dict()


def test_train_on_final_and_no_truncation(tmp_path, tok):
    multi = {"messages": [U, A, {"role": "user", "content": "And 2 + 2?"},
                          {"role": "assistant", "content": "4", "reasoning_content": "2 + 2 = 4"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [multi])
    all_ = SFTPackedDataset(path, tok, 256)
    final = SFTPackedDataset(path, tok, 256, train_on="final")
    flat = SFTPackedDataset(path, tok, 256, truncate_history_thinking=False)
    assert (all_.stats.samples, final.stats.samples, flat.stats.samples) == (2, 1, 1)
    assert all_.stats.target_tokens == flat.stats.target_tokens > final.stats.target_tokens
    think = tok.token_to_id("<think>")
    reasoning_targets = lambda ds: sum(int(((ds[i]["labels"] == think)).sum()) for i in range(len(ds)))  # noqa: E731
    assert reasoning_targets(all_) == 2 and reasoning_targets(final) == 1


def test_synthetic_data_is_valid_mixed_and_deterministic(tmp_path, tok):
    rows = sft_synthetic.generate(200, seed=0)
    assert rows == sft_synthetic.generate(200, seed=0) and rows != sft_synthetic.generate(200, seed=1)
    on = [r for r in rows if r["enable_thinking"]]
    off = [r for r in rows if not r["enable_thinking"]]
    assert len(on) == len(off) == 100
    assert all("reasoning_content" in m for r in on for m in r["messages"] if m["role"] == "assistant")
    assert not any("reasoning_content" in m for r in off for m in r["messages"])
    assert 20 < sum(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in rows) < 80
    for r in rows:  # every answer follows from its question
        msgs = r["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                expr = msgs[i - 1]["content"][len("What is "):-1]
                assert m["content"] == f"The answer is {eval(expr)}."  # noqa: S307 (digits and + - * only)
                validate_conversation(r)
    prompts = sft_synthetic.eval_prompts(6)
    assert [p["enable_thinking"] for p in prompts] == [True, False] * 3
    for p in prompts:
        ids = render_prompt(p["messages"], tok, enable_thinking=p["enable_thinking"])
        assert tok.decode(ids).endswith("<think>\n" if p["enable_thinking"] else "<think></think>")
    assert sft_synthetic.answer_of("<think>\nso 3\n</think>\nThe answer is 42.<|im_end|>") == "42"
    assert sft_synthetic.answer_of("The answer is -7.") == "-7"
    assert sft_synthetic.answer_of("<think></think>no idea") is None
    out = tmp_path / "s.jsonl"
    assert sft_synthetic.main(["--out", str(out), "--samples", "10", "--seed", "2"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == sft_synthetic.generate(10, seed=2)
