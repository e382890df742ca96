import numpy as np
import pytest
import torch

from dp_helpers import write_indexed
from tandem.data_pipelines.blends import Phase, PretrainDataConfig, blend_schedule, build_pretrain_datasets
from tandem.data_pipelines.packing import build_dataloader

# token-id ranges identify the source of a sample
RANGES = {"a": (3, 170), "b": (170, 340), "c": (340, 512)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    return {k: write_indexed(d / k, 1500, lo, hi, seed=i) for i, (k, (lo, hi)) in enumerate(RANGES.items())}


def source_of(tokens: torch.Tensor) -> str:
    body = tokens[tokens != 2]
    (name,) = [k for k, (lo, hi) in RANGES.items() if lo <= int(body.min()) and int(body.max()) < hi]
    return name


def two_phase(sources, tmp_path, **kw):
    return PretrainDataConfig(
        phases=[Phase("p1", {sources["a"]: 0.6, sources["b"]: 0.4}, fraction=0.7),
                Phase("p2", {sources["b"]: 0.25, sources["c"]: 0.75}, fraction=0.3)],
        seq_length=32, seed=7, split="95,5,0", cache_dir=str(tmp_path / "cache"), **kw)


def test_blend_proportions(sources, tmp_path, tok):
    w = {"a": 0.5, "b": 0.3, "c": 0.2}
    cfg = PretrainDataConfig([Phase("only", {sources[k]: v for k, v in w.items()})], seq_length=32,
                             cache_dir=str(tmp_path / "c"))
    data = build_pretrain_datasets(cfg, tok, train_samples=3000)
    shares = data.train.source_shares()
    for k, v in w.items():
        assert abs(shares[sources[k]] - v) < 0.002
    # the tag matches the content, and the share holds over a short window too (megatron's interleave)
    counts = {k: 0 for k in w}
    for i in range(200):
        s = data.train[i]
        name = source_of(s["tokens"])
        assert data.train.prefixes[s["source"]] == sources[name]
        counts[name] += 1
    for k, v in w.items():
        assert abs(counts[k] / 200 - v) < 0.02


def test_seed_determinism(sources, tmp_path, tok):
    cfg = two_phase(sources, tmp_path)
    a = build_pretrain_datasets(cfg, tok, 400)
    b = build_pretrain_datasets(two_phase(sources, tmp_path / "cold"), tok, 400)  # cold cache, fresh objects
    other = PretrainDataConfig(cfg.phases, cfg.seq_length, seed=8, split=cfg.split, cache_dir=cfg.cache_dir)
    c = build_pretrain_datasets(other, tok, 400)
    same = [torch.equal(a.train[i]["tokens"], b.train[i]["tokens"]) for i in range(0, 400, 7)]
    diff = [torch.equal(a.train[i]["tokens"], c.train[i]["tokens"]) for i in range(0, 400, 7)]
    assert all(same) and not any(diff)
    # the schedule indices are cached and memory-mapped (one entry per sample: ~30 GB at 25T tokens)
    assert isinstance(a.train.source_index, np.memmap) and isinstance(b.train.source_sample_index, np.memmap)
    assert len(list((tmp_path / "cache").glob("tandem_blend_*_taken.json"))) == 1
    from tandem.data_pipelines.blends import _cached_blend_schedule

    src, idx, taken = _cached_blend_schedule([[0.6, 0.4, 0], [0, 0.25, 0.75]], [280, 120], None)
    assert np.array_equal(src, a.train.source_index) and np.array_equal(idx, a.train.source_sample_index)
    assert list(taken) == a.train.taken
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_phase_switch_at_token_fraction(sources, tmp_path, tok):
    data = build_pretrain_datasets(two_phase(sources, tmp_path), tok, train_samples=1000)
    tr = data.train
    assert tr.bounds == [0, 700, 1000]
    assert (tr.phase_of(699), tr.phase_of(700)) == (0, 1)
    assert (data.phase_at(699), data.phase_at(700)) == ("p1", "p2")
    assert tr[699]["phase"] == 0 and tr[700]["phase"] == 1
    p1, p2 = tr.source_shares(0, 700), tr.source_shares(700)
    assert p1 == pytest.approx({sources["a"]: 0.6, sources["b"]: 0.4, sources["c"]: 0.0}, abs=0.002)
    assert p2 == pytest.approx({sources["a"]: 0.0, sources["b"]: 0.25, sources["c"]: 0.75}, abs=0.004)
    assert {source_of(tr[i]["tokens"]) for i in range(690, 700)} <= {"a", "b"}
    assert {source_of(tr[i]["tokens"]) for i in range(700, 720)} == {"b", "c"}
    # aligned to a global batch of 48: the switch moves to 48 * round(700 / 48) = 720
    aligned = build_pretrain_datasets(two_phase(sources, tmp_path), tok, train_samples=1000, align=48)
    assert aligned.train.bounds == [0, 720, 1000] and aligned.fingerprint() != data.fingerprint()


def test_no_phase1_replay_in_phase2(sources, tmp_path, tok):
    data = build_pretrain_datasets(two_phase(sources, tmp_path), tok, train_samples=1000)
    tr = data.train
    b = tr.prefixes.index(sources["b"])
    in_b = tr.source_index == b
    idx1 = tr.source_sample_index[:700][in_b[:700]]
    idx2 = tr.source_sample_index[700:][in_b[700:]]
    # phase 2 continues source b's sample stream where phase 1 stopped
    assert np.array_equal(np.sort(np.concatenate([idx1, idx2])), np.arange(len(idx1) + len(idx2)))
    windows1 = {tuple(tr[i]["tokens"].tolist()) for i in np.flatnonzero(in_b[:700])}
    windows2 = {tuple(tr[i]["tokens"].tolist()) for i in 700 + np.flatnonzero(in_b[700:])}
    assert len(windows1) == len(idx1) and len(windows2) == len(idx2) and not windows1 & windows2


def test_blend_schedule_carries_offsets():
    src, idx, taken = blend_schedule([[1, 1, 0], [0, 1, 3]], [10, 8])
    assert list(taken) == [5, 7, 6]
    for s in range(3):  # every source's indices are 0..taken-1, each once, in increasing order
        assert list(idx[src == s]) == list(range(taken[s]))
    assert set(src[:10]) == {0, 1} and set(src[10:]) == {1, 2}  # zero weight never picked


def test_resume_across_the_switch(sources, tmp_path, tok):
    def batches(cache, consumed, n, rank=0, dp=2):
        data = build_pretrain_datasets(two_phase(sources, cache), tok, train_samples=1000)
        loader = build_dataloader(data.train, 4, eod=tok.eod, consumed_samples=consumed, dp_rank=rank, dp_size=dp)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    full = batches(tmp_path, 0, 100)  # 100 steps x 8 global samples = 800: crosses the switch at 700
    for consumed in (552, 696, 704):  # before, at (step straddling 700), and after the switch
        resumed = batches(tmp_path / f"restart{consumed}", consumed, 3)  # cold cache, fresh objects
        for k, batch in enumerate(resumed):
            ref = full[consumed // 8 + k]
            for key in ("input_ids", "labels", "loss_mask", "seq_idx", "source", "phase"):
                assert torch.equal(batch[key], ref[key]), (consumed, k, key)
    assert full[87]["phase"].tolist() == [0, 0, 0, 0] and full[88]["phase"].tolist() == [1, 1, 1, 1]


def test_validation_sets_per_phase(sources, tmp_path, tok):
    data = build_pretrain_datasets(two_phase(sources, tmp_path), tok, train_samples=300, valid_samples=40)
    assert sorted(data.valid) == ["p1", "p2"] and all(len(v) == 40 for v in data.valid.values())
    train_windows = {tuple(data.train[i]["tokens"].tolist()) for i in range(300)}
    for name, v in data.valid.items():
        names = {source_of(v[i]["tokens"]) for i in range(40)}
        assert names == ({"a", "b"} if name == "p1" else {"b", "c"})
        assert not train_windows & {tuple(v[i]["tokens"].tolist()) for i in range(40)}


def test_config_errors(sources, tmp_path, tok):
    def build(phases, **kw):
        cfg = PretrainDataConfig(phases, seq_length=32, cache_dir=str(tmp_path / "c"))
        return build_pretrain_datasets(cfg, tok, **{"train_samples": 100, **kw})

    with pytest.raises(ValueError, match="all blend weights are zero"):
        build([Phase("p", {sources["a"]: 0.0, sources["b"]: 0})])
    with pytest.raises(ValueError, match="phases is empty"):
        build([])
    with pytest.raises(ValueError, match="blend is empty"):
        build([Phase("p", {})])
    with pytest.raises(ValueError, match="weight of .* must be a finite number >= 0"):
        build([Phase("p", {sources["a"]: -1.0})])
    with pytest.raises(ValueError, match="fractions must sum to 1"):
        build([Phase("p1", {sources["a"]: 1}, 0.5), Phase("p2", {sources["b"]: 1}, 0.4)])
    with pytest.raises(ValueError, match="'p2' gets 0 of 100 train samples"):
        build([Phase("p1", {sources["a"]: 1}, 0.999), Phase("p2", {sources["b"]: 1}, 0.001)])
    with pytest.raises(FileNotFoundError, match=r"missing \[.*nope\.bin', .*nope\.idx'\].*tandem-preprocess"):
        build([Phase("p", {str(tmp_path / "nope"): 1.0})])
    with pytest.raises(ValueError, match="train_samples must be >= 1"):
        build([Phase("p", {sources["a"]: 1})], train_samples=0)


def test_empty_source_or_split_is_an_error(tmp_path, tok):
    empty = write_indexed(tmp_path / "empty", 0, 3, 10)
    cfg = PretrainDataConfig([Phase("p", {empty: 1.0})], seq_length=32, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="holds no documents"):
        build_pretrain_datasets(cfg, tok, 10)
    # megatron would loop forever on a split with no documents (3 docs x 2% = 0 validation documents)
    few = write_indexed(tmp_path / "few", 3, 3, 500)
    cfg = PretrainDataConfig([Phase("p", {few: 1.0})], seq_length=8, split="98,2,0", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"split '98,2,0' gives its 3 documents none for valid.*'100,0,0'"):
        build_pretrain_datasets(cfg, tok, 10)
    cfg.split = "100,0,0"
    assert len(build_pretrain_datasets(cfg, tok, 10).train) == 10


def test_config_from_hydra_yaml(sources, tok):
    from omegaconf import OmegaConf

    from tandem.data_pipelines.blends import config_from_dict

    yaml = f"""
    seq_length: 32
    seed: 7
    split: "95,5,0"
    phases:
      - name: p1
        fraction: 0.7
        blend: [{{prefix: {sources['a']}, weight: 0.6}}, {{prefix: {sources['b']}, weight: 0.4}}]
      - name: p2
        fraction: 0.3
        blend: {{{sources['b']}: 0.25, {sources['c']}: 0.75}}
    """
    cfg = config_from_dict(OmegaConf.create(yaml))
    assert [p.name for p in cfg.phases] == ["p1", "p2"] and cfg.phases[0].blend == {sources["a"]: 0.6, sources["b"]: 0.4}
    single = config_from_dict({"seq_length": 8, "blend": {sources["a"]: 1}})
    assert single.phases[0].name == "main" and single.phases[0].fraction == 1.0
    with pytest.raises(ValueError, match=r"unknown data config key\(s\) \['seqlen'\]"):
        config_from_dict({"seqlen": 8, "blend": {sources["a"]: 1}})
    with pytest.raises(ValueError, match=r"phases\[0\]\.blend\[0\] must be \{prefix: ..., weight: ...\}"):
        config_from_dict({"seq_length": 8, "phases": [{"blend": [{"path": "x", "weight": 1}]}]})
    with pytest.raises(ValueError, match="all blend weights are zero"):
        config_from_dict({"seq_length": 8, "blend": {sources["a"]: 0}})


def test_extension_replans_phases_from_the_resume_point(sources, tmp_path, tok):
    """A run planned for 400 samples, extended at sample 200 (phase 1) to 800 and at 720 (phase 2) to 1000:
    the switch moves to 70% of the new total while it lies ahead, stays once passed; the samples before
    each resume point are the old plan's; no source sample is used twice."""
    from tandem.data_pipelines.blends import plan_phases

    cfg = two_phase(sources, tmp_path)
    assert plan_phases(cfg, 800, 8, [(200, 400)])[0] == [0, 560, 800]
    assert plan_phases(cfg, 800, 8, [(280, 400)])[0] == [0, 560, 800]  # at the switch: phase 2 not started yet
    assert plan_phases(cfg, 800, 8, [(320, 400)])[0] == [0, 280, 800]  # passed: stays
    old = build_pretrain_datasets(cfg, tok, 400, align=8).train
    once = build_pretrain_datasets(cfg, tok, 800, align=8, extensions=[(200, 400)]).train
    twice = build_pretrain_datasets(cfg, tok, 1000, align=8, extensions=[(200, 400), (720, 800)])
    assert twice.fingerprint() != build_pretrain_datasets(cfg, tok, 1000, align=8).fingerprint()
    twice = twice.train
    assert twice.bounds == [0, 560, 1000]
    for a, b, n in ((old, once, 200), (once, twice, 720)):
        assert np.array_equal(a.source_index[:n], b.source_index[:n])
        assert np.array_equal(a.source_sample_index[:n], b.source_sample_index[:n])
    for s in range(3):
        used = twice.source_sample_index[twice.source_index == s]
        assert len(set(used.tolist())) == len(used)
    assert abs(twice.source_shares(560, 1000)[sources["c"]] - 0.75) < 0.01
