import pytest
import torch

from dp_helpers import write_indexed
from tandem.data_pipelines.blends import Phase, PretrainDataConfig, build_pretrain_datasets
from tandem.data_pipelines.packing import (
    IGNORE_LABEL,
    Collator,
    PackingStats,
    ResumableBatchSampler,
    build_dataloader,
    pack_documents,
    seq_idx_from_tokens,
)

EOD = 2


def test_seq_idx_at_document_boundaries():
    tokens = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9], [EOD, 4, 4, 4, 4, 4, EOD, 3]])
    assert seq_idx_from_tokens(tokens, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 2]]


def test_megatron_rows_boundaries_match_the_dataset(tmp_path, tok):
    src = write_indexed(tmp_path / "s", 300, 3, 512, min_len=2, max_len=12)  # short docs: many per row
    cfg = PretrainDataConfig([Phase("p", {src: 1.0})], seq_length=64, cache_dir=str(tmp_path / "c"))
    data = build_pretrain_datasets(cfg, tok, train_samples=16)
    batch = Collator(tok.eod)([data.train[i] for i in range(16)])
    ids, seq_idx, lmask, pos = batch["input_ids"], batch["seq_idx"], batch["loss_mask"], batch["position_ids"]
    assert ids.shape == (16, 64) and seq_idx.dtype == torch.long and lmask.dtype == torch.float32
    # megatron restarts position ids after every EOD: exactly where seq_idx steps up
    steps = torch.zeros_like(seq_idx, dtype=torch.bool)
    steps[:, 1:] = seq_idx[:, 1:] == seq_idx[:, :-1] + 1
    assert torch.equal(steps[:, 1:], pos[:, 1:] == 0)
    assert (torch.diff(seq_idx, dim=1) >= 0).all() and (seq_idx[:, 0] == 0).all()
    # the EOD ends its own document; loss is off only where the input is EOD (next doc unpredictable)
    assert torch.equal(lmask == 0, ids == EOD)
    assert torch.equal(batch["labels"][:, :-1], ids[:, 1:])
    stats = PackingStats().update(batch).as_dict()
    assert stats["data/fill_rate"] == 1.0
    assert stats["data/docs_per_row"] == pytest.approx(float((seq_idx[:, -1] + 1).float().mean()))


def test_pack_documents_keeps_documents_whole():
    docs = [[10, 11, 12, EOD], [20, 21, EOD], [30, 31, 32, 33, 34, EOD], [40, EOD],
            {"input_ids": [50, 51, 52, EOD], "loss_mask": [0, 0, 1, 1]}]
    rows = list(pack_documents(docs, seq_length=8, pad_id=0))
    # first-fit: row A takes docs 0, 1, 3 (3+2+1 positions); row B docs 2, 4 (5+3) and, full, leaves first
    assert [r["num_docs"] for r in rows] == [2, 3]
    r1, r0 = rows
    assert r0["input_ids"].tolist() == [10, 11, 12, 20, 21, 40, 0, 0]
    assert r0["labels"].tolist() == [11, 12, EOD, 21, EOD, EOD, IGNORE_LABEL, IGNORE_LABEL]
    assert r0["seq_idx"].tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert r0["loss_mask"].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert r1["input_ids"].tolist() == [30, 31, 32, 33, 34, 50, 51, 52]
    assert r1["loss_mask"].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]  # mask of the predicted token
    batch = Collator(EOD)([r0, r1])
    assert torch.equal(batch["seq_idx"], torch.stack([r0["seq_idx"], r1["seq_idx"]]))  # kept, not recomputed
    stats = PackingStats().update(batch)
    assert stats.fill_rate == pytest.approx(14 / 16)
    assert stats.as_dict()["data/docs_per_row"] == pytest.approx(2.5)


def test_pack_documents_overflow():
    with pytest.raises(ValueError, match="document 1: 12 tokens do not fit a row of 8"):
        list(pack_documents([[1, 2], list(range(3, 15))], seq_length=8))
    (row,) = list(pack_documents([list(range(3, 15))], seq_length=8, overflow="truncate"))
    assert row["truncated"] == 3 and row["input_ids"].tolist() == list(range(3, 11))
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 2 tokens"):
        list(pack_documents([{"input_ids": [1, 2], "loss_mask": [1]}], seq_length=8))


def test_sampler_shards_and_resumes():
    full = [list(ResumableBatchSampler(50, 3, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(full[0]) == 8  # 50 // 6, the partial global step dropped
    seen = sorted(i for rank in full for b in rank for i in b)
    assert seen == list(range(48))
    assert full[0][1] == [6, 7, 8] and full[1][1] == [9, 10, 11]
    for r in range(2):
        assert list(ResumableBatchSampler(50, 3, consumed_samples=18, dp_rank=r, dp_size=2)) == full[r][3:]
    with pytest.raises(ValueError, match="multiple of micro_batch_size\\*dp_size=6"):
        ResumableBatchSampler(50, 3, consumed_samples=7, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank must be in"):
        ResumableBatchSampler(50, 3, dp_rank=2, dp_size=2)


def test_batches_drive_the_model_with_document_isolation(tmp_path, tok):
    """A real batch feeds HybridLM; changing one document leaves the next one's logits unchanged."""
    from tandem.model import HybridConfig, HybridLM

    src = write_indexed(tmp_path / "s", 100, 3, 512, min_len=5, max_len=20)
    cfg = PretrainDataConfig([Phase("p", {src: 1.0})], seq_length=48, cache_dir=str(tmp_path / "c"))
    data = build_pretrain_datasets(cfg, tok, train_samples=4)
    batch = next(iter(build_dataloader(data.train, 2, eod=tok.eod)))
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0).eval()
    ids, seq_idx = batch["input_ids"], batch["seq_idx"]
    with torch.no_grad():
        logits = model(ids, seq_idx=seq_idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        assert torch.isfinite((loss * batch["loss_mask"].flatten()).sum())
        changed = ids.clone()
        first_doc = seq_idx[0] == 0
        changed[0, first_doc & (ids[0] != tok.eod)] = 7
        later = seq_idx[0] > 0
        assert later.any()
        out = model(changed, seq_idx=seq_idx)
    torch.testing.assert_close(out[0, later], logits[0, later], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[0, first_doc], logits[0, first_doc])
