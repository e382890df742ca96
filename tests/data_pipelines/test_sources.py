import pytest
import torch

from dp_helpers import write_indexed
from tandem.data_pipelines.sources import IndexedTokenSource


def test_indexed_source_serves_fixed_windows(tmp_path, tok):
    prefix = write_indexed(tmp_path / "s", 300, 3, 512)
    src = IndexedTokenSource.from_spec(f"indexed:{prefix}", seed=3, valid_fraction=0.1, key="data.phase1[0].path",
                                       tokenizer=tok, cache_dir=str(tmp_path / "c"))
    assert src.name == f"indexed:{prefix}"
    w = src.sample("train", 5, 32)
    assert w.shape == (33,) and w.dtype == torch.long
    again = IndexedTokenSource(prefix, seed=3, valid_fraction=0.1, tokenizer=tok, cache_dir=str(tmp_path / "c2"))
    assert torch.equal(again.sample("train", 5, 32), w)  # fresh object, cold cache: same window
    n = src.num_samples("train", 32)
    assert torch.equal(src.sample("train", 5 + n, 32), w)  # wraps by epoch
    train = {tuple(src.sample("train", i, 32).tolist()) for i in range(n)}
    valid = {tuple(src.sample("valid", i, 32).tolist()) for i in range(src.num_samples("valid", 32))}
    assert len(train) == n and not train & valid  # disjoint document ranges
    other_seed = IndexedTokenSource(prefix, seed=4, valid_fraction=0.1, tokenizer=tok, cache_dir=str(tmp_path / "c"))
    assert not torch.equal(other_seed.sample("train", 5, 32), w)


def test_indexed_source_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"data\.phase1\[0\]\.path: .*missing"):
        IndexedTokenSource.from_spec(f"indexed:{tmp_path / 'nope'}", 0, 0.1, key="data.phase1[0].path")
    with pytest.raises(ValueError, match="expected 'indexed:<prefix"):
        IndexedTokenSource.from_spec("text:/x", 0, 0.1)
    few = write_indexed(tmp_path / "few", 5, 3, 500)
    src = IndexedTokenSource(few, valid_fraction=0.05, tokenizer=tok, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="none for valid"):
        src.sample("valid", 0, 8)


def test_fits_the_trainer_blend_schedule(tmp_path, tok):
    """Protocol check against the trainer's consumer: its blend schedule and batch maker take the source."""
    from tandem.trainer.data import BlendSchedule, make_batch

    a = IndexedTokenSource(write_indexed(tmp_path / "a", 200, 3, 200), tokenizer=tok, cache_dir=str(tmp_path / "c"))
    b = IndexedTokenSource(write_indexed(tmp_path / "b", 200, 200, 512, seed=1), tokenizer=tok, cache_dir=str(tmp_path / "c"))
    sched = BlendSchedule([[(a.name, 0.5), (b.name, 0.5)], [(b.name, 1.0)]], {a.name: a, b.name: b})
    drawn = sched.advance(8)
    batch = make_batch([sched.sources[name].sample("train", i, 24) for name, i in drawn])
    assert batch["input_ids"].shape == (8, 24)
    is_eod = batch["input_ids"] == tok.eod
    assert torch.equal(batch["seq_idx"], torch.cumsum(is_eod.long(), 1) - is_eod.long())
    assert {int(r[r != tok.eod].max()) < 200 for r in batch["input_ids"]} == {True, False}  # both sources drawn
