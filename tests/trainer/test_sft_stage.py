"""The SFT stage in the shared loop: packed conversations, assistant-only loss, exact resume, bad data."""

import json
import shutil

import pytest
import torch

from tandem.data_pipelines import sft_synthetic
from tandem.data_pipelines.tokenizer import load_tokenizer
from tandem.trainer.run import run
from tandem.trainer.stages import SFTStage
from tandem.trainer.data import DataError

from .conftest import compose_recipe, run_cli

SFT_RUN = [
    "stage.steps=4", "stage.global_batch=4", "stage.micro_batch=2", "stage.eval_every=0", "stage.eval_batches=1",
    "data.seq_len=128", "logger.log_every=1", "logger.progress_bar=false", "optim.warmup_steps=1",
    "model.preset=tiny", "model.init_from=null",
]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    return sft_synthetic.write(tmp_path_factory.mktemp("sft") / "train.jsonl", 200, seed=0)


def _cfg(conversations, run_dir, *extra):
    return compose_recipe("smoke_sft", [*SFT_RUN, f"data.chat.train=[{conversations}]", f"run.dir={run_dir}", *extra])


def _stage(conversations, rank=0, world=1, **kw):
    cfg = _cfg(conversations, "unused", *[f"{k}={v}" for k, v in kw.items()])
    return SFTStage(cfg.data, cfg.stage, rank, world)


def test_batches_train_only_on_assistant_tokens(conversations):
    """In every packed conversation, the targets are exactly the assistant turns after its last user
    message (earlier turns are trained in their own sample, with their reasoning): from the token after
    the ``<|im_start|>assistant\n`` header through ``<|im_end|>``; labels are the next token."""
    stage = _stage(conversations)
    tok = load_tokenizer()
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assistant, user = tok.encode("assistant\n"), tok.encode("user\n")
    (batch, *_) = stage.batches_for_step(0)
    ids, labels, mask, seq_idx = batch["input_ids"], batch["labels"], batch["loss_mask"], batch["seq_idx"]
    assert mask.sum() > 0 and torch.all(labels[mask == 0] == -100) and torch.all(labels[mask > 0] >= 0)
    multi_turn_rows = 0
    for b in range(ids.shape[0]):
        row, expected = ids[b].tolist(), torch.zeros(ids.shape[1])
        for doc in seq_idx[b].unique().tolist():
            pos = torch.nonzero(seq_idx[b] == doc).flatten().tolist()
            toks = [row[t] for t in pos]
            heads = [i for i, x in enumerate(toks) if x == im_start]
            users = [i for i in heads if toks[i + 1: i + 1 + len(user)] == user]
            if not users:
                continue  # padding
            turns = [i for i in heads if toks[i + 1: i + 1 + len(assistant)] == assistant]
            multi_turn_rows += len(turns) > 1
            for h in (i for i in turns if i > users[-1]):
                body = h + len(assistant)  # position of the header's "\n": its label is the first body token
                end = toks.index(im_end, body)
                for i in range(body, end):
                    expected[pos[i]] = 1.0
        assert torch.equal(mask[b], expected), b
        t_idx = torch.nonzero(mask[b]).flatten()
        assert torch.equal(labels[b, t_idx], ids[b, t_idx + 1])
    assert multi_turn_rows > 0  # the check saw truncated history turns


def test_ranks_split_the_global_batch_and_holdout_is_disjoint(conversations):
    one = _stage(conversations)
    r0, r1 = _stage(conversations, 0, 2), _stage(conversations, 1, 2)
    rows = one.rows_for_step(3)
    assert len(set(rows)) == len(rows) == 4
    b0, b1 = r0.batches_for_step(3), r1.batches_for_step(3)
    assert len(b0) == len(b1) == 1
    whole = one.batches_for_step(3)
    assert torch.equal(torch.cat([b0[0]["input_ids"], b1[0]["input_ids"]]), torch.cat([b["input_ids"] for b in whole]))
    train_ids = {tuple(one.train_set.sample(k)["input_ids"]) for k in range(one.train_set.stats.samples)}
    valid_ids = {tuple(one.valid_set.sample(k)["input_ids"]) for k in range(one.valid_set.stats.samples)}
    assert valid_ids and train_ids
    assert one.train_set.stats.conversations + one.valid_set.stats.conversations == 200


def test_sft_run_learns_and_resumes_exactly(conversations, tmp_path):
    run(_cfg(conversations, tmp_path / "straight", "stage.steps=6"))
    run(_cfg(conversations, tmp_path / "split", "stage.steps=6", "stage.save_every=3"))
    ckpts = tmp_path / "split" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000006")
    (ckpts / "latest").write_text("step_00000003\n")
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()[:3]
    (tmp_path / "split" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run(_cfg(conversations, tmp_path / "split", "stage.steps=6", "stage.save_every=3"))
    losses = [[json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("straight", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert losses[0][-1] < losses[0][0]
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["stage"] == "sft" and "val_loss" in records[-1]
    # tokens are the real (non-padding) input tokens of the rows trained on, target tokens those with loss
    stage = _stage(conversations)
    rows = [r for s in range(6) for r in stage.rows_for_step(s)]
    real = sum(int(stage.train_set[r]["valid"].sum()) for r in rows)
    targets = sum(float(stage.train_set[r]["loss_mask"].sum()) for r in rows)
    assert records[-1]["tokens"] == real < 6 * stage.stage.global_batch * stage.data.seq_len
    assert records[-1]["target_tokens"] == targets < real
    assert [json.loads(l)["tokens"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()] == \
        [r["tokens"] for r in records]  # carried across the resume
    # changed data under a resumed run is refused, not silently continued in another order
    other = sft_synthetic.write(tmp_path / "other.jsonl", 150, seed=1)
    with pytest.raises(DataError, match="differ from the checkpoint"):
        run(_cfg(other, tmp_path / "split", "stage.steps=8"))


def test_bad_conversation_exits_2_naming_file_and_line(conversations, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = conversations.read_text().splitlines()[:5]
    lines.insert(3, json.dumps({"messages": [{"role": "narrator", "content": "hi"}]}))
    bad.write_text("\n".join(lines) + "\n")
    res = run_cli("-cn", "smoke_sft", *SFT_RUN, f"data.chat.train=[{bad}]", f"run.dir={tmp_path / 'r'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{bad}:4" in res.stderr and "narrator" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "r").exists()
    res = run_cli("-cn", "smoke_sft", *SFT_RUN, "data.chat.train=[]", f"run.dir={tmp_path / 'r'}")
    assert res.returncode == 2 and "data.chat.train" in res.stderr


@pytest.mark.slow
def test_two_process_sft_matches_single_process(conversations, tmp_path):
    """Ranks hold different conversations with different target counts; the global-token normalisation
    makes 2 processes (gloo) train exactly like 1 with the same global batch. The 2 processes read their
    rows through a loader worker each (``data.num_workers=1``), the single one in process: the same rows."""
    from .conftest import read_records, run_torchrun

    args = ["-cn", "smoke_sft", *SFT_RUN, f"data.chat.train=[{conversations}]", "stage.eval_batches=2"]
    single = run_cli(*args, "data.num_workers=0", f"run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_torchrun(*args, "data.num_workers=1", "parallel=ddp_gloo", f"run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = read_records(tmp_path / "single"), read_records(tmp_path / "ddp")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"], (a, b)
        assert x["target_tokens"] == y["target_tokens"] and 0 <= y["data/wait_fraction"] <= 1 and y["data/wait_s"] >= 0
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-5 * a[-1]["val_loss"]


def test_step_rows_are_consecutive_slices_of_per_epoch_permutations(conversations):
    """Step s takes positions [s·B, (s+1)·B) of the concatenated epochs, each epoch a seeded permutation of
    every packed row; the permutation is drawn once per epoch (steps straddling epochs, and a batch larger
    than an epoch, included)."""
    import torch

    for gb in (8, 64):
        stage = _stage(conversations, **{"stage.global_batch": gb, "stage.micro_batch": 4})
        n = len(stage.train_set)
        epochs = [torch.randperm(n, generator=torch.Generator().manual_seed(stage.data.seed * 1_000_003 + e)).tolist()
                  for e in range(12)]
        flat = [r for e in epochs for r in e]
        steps = range(0, (5 * n) // gb)
        assert [stage.rows_for_step(s) for s in steps] == [flat[s * gb:(s + 1) * gb] for s in steps]
        assert len(stage._orders) <= 2  # noqa: SLF001 — the cache holds the two most recent epochs only


def test_packed_rows_are_built_once_and_memory_mapped(conversations, tmp_path):
    """With a cache dir the packed rows are built once into it and loaded memory-mapped: the same rows,
    stats and fingerprint as a build in memory; a second stage reads the copy (no tokenising: the source
    is not even opened again), and a changed file gets a new build."""
    import shutil

    import numpy as np

    from tandem.data_pipelines.sft import SFTPackedDataset

    src = tmp_path / "train.jsonl"
    shutil.copy(conversations, src)
    plain = _stage(src)
    cached = _stage(src, **{"data.cache_dir": tmp_path / "cache"})
    builds = sorted(p.name for p in (tmp_path / "cache" / "sft").iterdir())
    assert [b.split("-")[0] for b in builds] == ["heldout", "train"]
    for a, b in ((plain.train_set, cached.train_set), (plain.valid_set, cached.valid_set)):
        assert isinstance(b._ids, np.memmap) and a.fingerprint == b.fingerprint and len(a) == len(b)  # noqa: SLF001
        assert a.stats.as_dict() == b.stats.as_dict()
        for i in range(len(a)):
            assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a[i].values(), b[i].values()))
    calls = []
    real_init = SFTPackedDataset.__init__
    SFTPackedDataset.__init__ = lambda self, *a, **k: calls.append(a) or real_init(self, *a, **k)
    try:
        again = _stage(src, **{"data.cache_dir": tmp_path / "cache"})
        assert calls == [] and again.train_set.fingerprint == plain.train_set.fingerprint
        with src.open("a") as f:  # a changed source is rebuilt, under a new key
            f.write(src.read_text().splitlines()[0] + "\n")
        _stage(src, **{"data.cache_dir": tmp_path / "cache"})
        assert len(calls) == 2 and len(list((tmp_path / "cache" / "sft").iterdir())) == 4
    finally:
        SFTPackedDataset.__init__ = real_init
