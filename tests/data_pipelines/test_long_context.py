import json
import random
import re

import pytest
import torch

from dp_helpers import write_indexed
from tandem.data_pipelines import long_context as lc
from tandem.data_pipelines.blends import Phase, PretrainDataConfig
from tandem.data_pipelines.packing import Collator, PackingStats


def oracle(ex: lc.SyntheticExample) -> str:
    """Solves each task from the text alone, the way the task intends (so a broken generator fails it)."""
    ctx, q = ex.context, ex.question
    if ex.kind == "needle":
        key = re.search(r"number for (\S+)\?", q).group(1)
        return re.search(rf"number for {re.escape(key)} is (\d+)", ctx).group(1)
    if ex.kind == "kv_retrieval":
        key = re.search(r"record (\S+) hold", q).group(1)
        return re.search(rf"Record {re.escape(key)} holds the value (\d+)", ctx).group(1)
    if ex.kind == "multi_hop":
        name = re.search(r"value of (\S+)\?", q).group(1)
        env = {}
        for a, b in re.findall(r"Let (\S+) be (?:equal to )?(\S+?)\.(?:\s|$)", ctx):
            env[a] = env.get(b, b)  # a forward chain: every reference is defined before it is used
        return str(env[name])
    item = ex.meta["item"]
    nums = [int(n) for n in re.findall(rf"received (\d+) {item}\.", ctx)]
    return str(sum(nums) if ex.meta["op"] == "sum" else len(nums))


@pytest.mark.parametrize("kind,kwargs", [("needle", {}), ("kv_retrieval", {"num_pairs": 6}),
                                         ("multi_hop", {"hops": 4}), ("aggregation", {"op": "sum"}),
                                         ("aggregation", {"op": "count"})])
def test_generators_answers_verified_by_checkers(kind, kwargs, tok):
    exs = lc.generate_examples(kind, lengths=[200, 600], depths=[0.0, 0.5, 1.0], seed=3, tokenizer=tok, **kwargs)
    assert len(exs) == 6
    for ex in exs:
        assert ex.check(oracle(ex)) and ex.check(f" {ex.answer}.")
        assert not ex.check(str(int(ex.answer) + 1)) and not ex.check("I do not know")
        n = len(tok.encode(ex.prompt))
        assert 0.8 * ex.target_tokens <= n <= 1.25 * ex.target_tokens + 60, (n, ex.target_tokens)
        assert ex.text.endswith(f"Answer: {ex.answer}")
    # deterministic in the seed
    again = lc.generate_examples(kind, lengths=[200, 600], depths=[0.0, 0.5, 1.0], seed=3, tokenizer=tok, **kwargs)
    assert [e.text for e in again] == [e.text for e in exs]


def test_needle_depth_is_where_the_needle_is(tok):
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ex = lc.needle(random.Random(1), 2000, depth, tok)
        pos = ex.context.index("special magic number") / len(ex.context)
        assert abs(pos - depth) < 0.05, (depth, pos)


def test_multi_hop_chain_reads_forwards_at_full_depth(tok):
    ex = lc.multi_hop(random.Random(2), 300, 1.0, tok, hops=3)
    chain = ex.meta["chain"]
    positions = [ex.context.index(f"Let {n} be") for n in chain]
    assert positions == sorted(positions) and ex.check(oracle(ex))


def test_evaluate_retrieval_reports_by_depth_and_length(tok):
    exs = lc.generate_examples("needle", lengths=[150, 400], depths=[0.0, 0.5, 1.0], per_cell=2, seed=0, tokenizer=tok)
    by_prompt = {e.prompt: e for e in exs}
    perfect = lc.evaluate_retrieval(lambda p: oracle(by_prompt[p]), examples=exs)
    assert perfect.accuracy == 1.0 and perfect.n == 12 and not perfect.failures

    def short_memory(prompt):  # "sees" only the last 150 characters: finds deep needles only
        m = re.search(r"number for \S+ is (\d+)", prompt[-150:])
        return m.group(1) if m else "0"

    rep = lc.evaluate_retrieval(short_memory, examples=exs)
    assert rep.by_depth[1.0] == 1.0 and rep.by_depth[0.0] == 0.0
    assert set(rep.by_length) == {150, 400} and set(rep.by_cell) == {(n, d) for n in (150, 400) for d in (0.0, 0.5, 1.0)}
    assert rep.failures and rep.failures[0]["answer"] != rep.failures[0]["prediction"]
    d = rep.as_dict()
    assert d["eval/needle/depth_1"] == 1.0 and "eval/needle/len_150" in d


def test_evaluate_with_a_model(tok):
    from tandem.model import HybridConfig, HybridLM

    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    rep = lc.evaluate_needle(model=model, tokenizer=tok, lengths=[64], depths=[0.0, 1.0], per_cell=1,
                             max_new_tokens=4)
    assert rep.n == 2 and set(rep.by_depth) == {0.0, 1.0}
    assert 0.0 <= rep.accuracy <= 1.0 and model.training  # mode restored
    # greedy decoding continues the prompt with the argmax token, step by step
    gen = lc.greedy_generate_fn(model, tok, max_new_tokens=3)
    ids = tok.encode("The value of key")
    with torch.no_grad():
        first = int(model.eval()(torch.tensor([ids]))[0, -1].argmax())
    model.train()
    out = gen("The value of key")
    assert (first == tok.eod and out == "") or out.startswith(tok.decode([first]))
    with pytest.raises(ValueError, match="exactly one of"):
        lc.evaluate_needle(lambda p: "1", model=model, tokenizer=tok)


def test_write_jsonl_feeds_preprocessing(tmp_path, tok):
    from tandem.data_pipelines.preprocess import preprocess
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    exs = lc.generate_examples("kv_retrieval", lengths=[120], depths=[0.3, 0.9], seed=5, tokenizer=tok)
    assert lc.write_jsonl(tmp_path / "kv.jsonl", exs) == 2
    rec = json.loads((tmp_path / "kv.jsonl").read_text().splitlines()[0])
    assert rec["answer"] == exs[0].answer and rec["depth"] == 0.3
    preprocess(tmp_path / "kv.jsonl", tmp_path / "kv", progress=False, log=lambda *_: None)
    ds = IndexedDataset(str(tmp_path / "kv"))
    assert tok.decode(ds[1].tolist()[:-1]) == exs[1].text


def test_long_short_mixture(tmp_path, tok):
    src = write_indexed(tmp_path / "s", 400, 3, 512, min_len=3, max_len=30)
    long_cfg = PretrainDataConfig([Phase("cpt", {src: 1.0})], seq_length=64, cache_dir=str(tmp_path / "c"))
    short_cfg = PretrainDataConfig([Phase("cpt", {src: 1.0})], seq_length=16, cache_dir=str(tmp_path / "c"))
    mix = lc.build_long_short_mixture(long_cfg, short_cfg, tok, num_rows=40, long_fraction=0.25)
    assert len(mix) == 40 and (mix.num_long, mix.num_short) == (10, 30)
    assert sum(mix[i]["is_long"] for i in range(8)) == 2  # the ratio holds over short windows too
    rows = [mix[i] for i in range(40)]
    short = next(r for r in rows if not r["is_long"])
    # four independent 16-token samples: a segment starts at each piece and after each EOD
    seq_idx, tokens = short["seq_idx"], short["tokens"]
    for t in range(1, 64):
        starts = t % 16 == 0 or tokens[t - 1] == tok.eod
        assert seq_idx[t] == seq_idx[t - 1] + int(starts)
    long_row = next(r for r in rows if r["is_long"])
    is_eod = (long_row["tokens"] == tok.eod).long()
    assert torch.equal(long_row["seq_idx"], torch.cumsum(is_eod, 0) - is_eod)
    batch = Collator(tok.eod)(rows[:4])
    assert batch["input_ids"].shape == (4, 64) and torch.equal(batch["seq_idx"][0], rows[0]["seq_idx"])
    assert batch["is_long"].tolist() == [int(r["is_long"]) for r in rows[:4]]
    assert PackingStats().update(batch).fill_rate == 1.0
    with pytest.raises(ValueError, match="multiple of short_length"):
        lc.LongShortMixture(None, None, long_fraction=0.5, long_length=60, short_length=16, num_rows=4, eod=2)
    with pytest.raises(ValueError, match="long_fraction must be in"):
        lc.LongShortMixture(None, None, long_fraction=1.5, long_length=64, short_length=16, num_rows=4, eod=2)


def test_answer_loss_weights_keep_only_the_answers_of_whole_documents():
    """Hand-made row (EOD 0, marker [1, 2]): the first segment continues a document from the previous row
    (its answer is not trained), then a whole task document, a document without the marker, and a task
    document cut off by the row end right after its marker."""
    marker = torch.tensor([1, 2])
    tokens = torch.tensor([6, 1, 2, 9, 0,  5, 5, 1, 2, 7, 0,  3, 3, 3, 0,  4, 4, 1, 2])
    is_eod = (tokens == 0).long()
    seq_idx = torch.cumsum(is_eod, 0) - is_eod  # the EOD belongs to the document it ends
    loss_mask = torch.ones(19)
    loss_mask[14] = 0  # e.g. eod_mask_loss at an EOD input
    keep, weight = lc.answer_loss_weights(tokens, loss_mask, seq_idx, marker)
    # position p predicts tokens[p + 1]: the marker's last token (8) predicts the answer 7, 9 predicts the EOD,
    # 10 (the EOD input) predicts the next document's first token; the cut document's answer starts at 18
    expect = torch.zeros(19)
    expect[[8, 9, 10, 18]] = 1
    assert torch.equal(keep, expect)
    # the row's weight (18 target tokens) moves onto its 4 answer targets; the rest weighs 1 but has no loss
    assert torch.allclose(weight[[8, 9, 10, 18]], torch.full((4,), 18 / 4))
    # given the EOD id, the EOD input (its target is the next document's first token) is not an answer
    keep_eod, weight_eod = lc.answer_loss_weights(tokens, loss_mask, seq_idx, marker, eod=0)
    expect[10] = 0
    assert torch.equal(keep_eod, expect) and torch.allclose(weight_eod[[8, 9, 18]], torch.full((3,), 18 / 3))
    assert (weight[keep == 0] == 1).all() and float((keep * weight).sum()) == pytest.approx(float(loss_mask.sum()))
    # no marker in the row: nothing trains; a row shorter than the marker too
    keep, weight = lc.answer_loss_weights(tokens.clamp(min=3), loss_mask, seq_idx, marker)
    assert keep.sum() == 0 and (weight == 1).all()
    keep, _ = lc.answer_loss_weights(tokens[:1], loss_mask[:1], seq_idx[:1], torch.tensor([1, 2, 3]))
    assert keep.sum() == 0


def test_long_short_mixture_with_answer_marker(tmp_path, tok):
    """A mixture of needle documents (long) and other text (short) with the answer marker: long rows keep
    the loss on their answers only, whose labels are the needle digits and EOD; short rows are unchanged
    and weigh 1; the collated batch carries ``loss_weight``."""
    from tandem.data_pipelines.preprocess import preprocess

    exs = lc.generate_examples("needle", lengths=[40, 60, 90], depths=[0.0, 0.5, 1.0], per_cell=8, seed=1,
                               tokenizer=tok, value_digits=1)
    lc.write_jsonl(tmp_path / "needles.jsonl", exs)
    preprocess(tmp_path / "needles.jsonl", tmp_path / "needles", progress=False, log=lambda *_: None)
    src = write_indexed(tmp_path / "s", 400, 3, 512, min_len=3, max_len=30)
    long_cfg = PretrainDataConfig([Phase("cpt", {str(tmp_path / "needles"): 1.0})], seq_length=128,
                                  cache_dir=str(tmp_path / "c"))
    short_cfg = PretrainDataConfig([Phase("cpt", {src: 1.0})], seq_length=32, cache_dir=str(tmp_path / "c"))
    marker = tok.encode("\nAnswer:")
    mix = lc.build_long_short_mixture(long_cfg, short_cfg, tok, num_rows=12, long_fraction=0.5, answer_marker=marker)
    plain = lc.build_long_short_mixture(long_cfg, short_cfg, tok, num_rows=12, long_fraction=0.5)
    digits = {tok.encode(f" {d}")[-1] for d in range(10)}
    answers = whole = 0
    for i in range(12):
        row, ref = mix[i], plain[i]
        assert torch.equal(row["tokens"], ref["tokens"]) and row["loss_weight"].shape == (128,)
        if not row["is_long"]:
            assert torch.equal(row["loss_mask"], ref["loss_mask"]) and (row["loss_weight"] == 1).all()
            continue
        kept = row["loss_mask"].nonzero().flatten()
        labels = set(row["labels"][kept].tolist())
        assert labels <= digits | {tok.eod} | set(row["tokens"].tolist())
        answers += sum(int(row["labels"][p]) in digits for p in kept.tolist())
        # reference: documents that begin in the row (after its first EOD) and reach their answer in it
        toks, seq = row["tokens"].tolist(), row["seq_idx"].tolist()
        for d in range(1, max(seq) + 1):
            doc = [t for t, s in zip(toks, seq) if s == d]
            m = len(marker)
            whole += any(doc[j:j + m] == marker for j in range(len(doc) - m)) and doc[-1] == tok.eod
        assert float((row["loss_mask"] * row["loss_weight"]).sum()) == pytest.approx(float(ref["loss_mask"].sum())) \
            or row["loss_mask"].sum() == 0
    assert answers == whole > 0  # one answer digit per whole needle document of the long rows
    batch = Collator(tok.eod)([mix[i] for i in range(4)])
    assert batch["loss_weight"].shape == (4, 128)


def test_token_cross_entropy_weighs_tokens():
    from tandem.trainer.stages.base import token_cross_entropy

    ce = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    model = lambda input_ids, seq_idx=None, labels=None: ce  # noqa: E731  (per-token CE, no aux loss)
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long),
             "loss_mask": torch.tensor([[1.0, 0.0, 1.0, 1.0]])}
    out = token_cross_entropy(model, batch)
    assert float(out.loss_sum) == 8.0 and float(out.num_tokens) == 3.0
    out = token_cross_entropy(model, {**batch, "loss_weight": torch.tensor([[1.0, 5.0, 2.0, 0.5]])})
    assert float(out.loss_sum) == 1 + 6 + 2 and float(out.num_tokens) == 3.5


def test_unknown_task_and_bad_depth():
    with pytest.raises(ValueError, match="unknown synthetic task 'haystack'"):
        lc.generate_examples("haystack", lengths=[10], depths=[0.5])
    with pytest.raises(ValueError, match="depth must be in"):
        lc.generate_examples("needle", lengths=[10], depths=[1.5])
