"""Source specs and the byte-level sources: they build samples, splits and interleaves exactly as megatron
does (checked against megatron itself), so smoke runs exercise the same semantics as indexed data."""

import numpy as np
import pytest
import torch

from dp_helpers import write_indexed
from tandem.data_pipelines.blends import (Phase, PretrainDataConfig, blend_schedule, blending_indices_numpy,
                                          build_pretrain_datasets)
from tandem.data_pipelines.sources import (BYTE_TOKENIZER, SyntheticDataset, TextDataset, parse_spec, split_ranges,
                                           window_sample)


def test_numpy_interleave_equals_megatrons():
    from megatron.core.datasets import helpers

    rng = np.random.default_rng(0)
    for n_sources, size in ((1, 5), (2, 97), (3, 500), (5, 1000)):
        w = rng.random(n_sources)
        w /= w.sum()
        src, idx = np.zeros(size, np.int16), np.zeros(size, np.int64)
        helpers.build_blending_indices(src, idx, w, n_sources, size, False)
        ours = blending_indices_numpy(w, size)
        assert np.array_equal(ours[0], src) and np.array_equal(ours[1], idx)
    weights, sizes = [[0.6, 0.4, 0], [0, 0.25, 0.75]], [70, 30]
    for a, b in zip(blend_schedule(weights, sizes), blend_schedule(weights, sizes, megatron=False)):
        assert np.array_equal(a, b)


def test_window_sample_is_megatrons_sample(tmp_path, tok):
    """The byte-level sources build their sample dict as GPTDataset.__getitem__ does (loss mask at EOD
    inputs and pad labels, positions restarting after EOD)."""
    prefix = write_indexed(tmp_path / "s", 200, 3, 500, eod=tok.eod)
    cfg = PretrainDataConfig([Phase("p", {prefix: 1.0})], seq_length=24, split="100,0,0", cache_dir=str(tmp_path / "c"))
    gpt = build_pretrain_datasets(cfg, tok, 50).train.datasets[0]
    for i in range(0, 50, 7):
        s = gpt[i]
        window = torch.cat([s["tokens"], s["labels"][-1:]])
        ours = window_sample(window, eod=tok.eod, pad=tok.pad, eod_mask_loss=True)
        assert (s["tokens"] == tok.eod).any() or i > 0
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(ours[key], s[key].to(ours[key].dtype)), (i, key)


def test_split_ranges_are_megatrons():
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                       parse_and_normalize_split)

    for split in ("98,2,0", "95,5,0", "100,0,0", "90,5,5", "1,1,1"):
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        for n in (3, 7, 40, 1001):
            want = [None if m is None else (int(round(m[0] * n)), int(round(m[1] * n))) for m in matrix]
            assert split_ranges(split, n) == want, (split, n)


def test_synthetic_and_text_sources(tmp_path):
    a = SyntheticDataset("arithmetic", 3, "train", 32, 10, eod_mask_loss=True)
    assert torch.equal(a[4]["tokens"], SyntheticDataset("arithmetic", 3, "train", 32, 10, True)[4]["tokens"])
    assert not torch.equal(a[4]["tokens"], SyntheticDataset("arithmetic", 3, "valid", 32, 10, True)[4]["tokens"])
    s = a[4]
    assert torch.all(s["loss_mask"][s["tokens"] == BYTE_TOKENIZER.eod] == 0) and (s["tokens"] == 2).any()
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefghij"), 40)) for _ in range(30)]  # windows unique by content
    text = TextDataset(docs, seed=1, split="train", seq_length=16, num_samples=200, eod_mask_loss=False)
    n = text.per_epoch
    first = [tuple(text[i]["tokens"].tolist()) for i in range(n)]
    second = [tuple(text[i]["tokens"].tolist()) for i in range(n, 2 * n)]
    assert len(set(first)) == n and set(first) == set(second) and first != second  # each epoch reshuffled
    assert text[3]["loss_mask"].all()
    assert parse_spec("/data/web") == ("indexed", "/data/web") == parse_spec("indexed:/data/web")
    with pytest.raises(ValueError, match="unknown source spec 'hf:x'"):
        parse_spec("hf:x")
