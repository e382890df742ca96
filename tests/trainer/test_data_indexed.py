"""Pretraining on tandem-preprocess outputs through the CLI: a skewed blend of three sources over both phases
on two ranks (gloo) from a read-only data folder, with the realised shares per phase, and an exact resume
across the phase switch and an epoch boundary; your own data in one override (``data.path``)."""

import json
import os
import shutil
import stat

import pytest

from tandem.data_pipelines.preprocess import preprocess
from tandem.data_pipelines.smoke_data import write_smoke_corpus
from tandem.trainer.config import BlendEntry, DataConfig, StageConfig
from tandem.trainer.data import DataError
from tandem.trainer.stages import PretrainStage

from .conftest import TINY_RUN, read_records, run_cli, run_torchrun

# docs per source: "rare" is small (5 train documents ≈ 12 samples of 32 tokens per epoch), so phase 2,
# which takes 80% of its 24 samples from it, runs into its second epoch
SOURCES = {"common": 300, "mid": 200, "rare": 6}
PHASE1 = {"common": 0.7, "mid": 0.25, "rare": 0.05}
PHASE2 = {"common": 0.1, "mid": 0.1, "rare": 0.8}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i, (name, docs) in enumerate(SOURCES.items()):
        corpus = write_smoke_corpus(root / f"{name}.jsonl", docs, seed=i)
        preprocess([corpus], root / name)
        corpus.unlink()
    for p in root.iterdir():
        p.chmod(0o444)
    root.chmod(0o555)  # read-only: megatron's index caches must go to the run directory
    yield root
    root.chmod(0o755)


def _listing(root):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _blend(root, weights):
    return "[" + ", ".join(f"{{path: 'indexed:{root / k}', weight: {w}}}" for k, w in weights.items()) + "]"


def test_skewed_blend_two_ranks_read_only_data_exact_resume(data_dir, tmp_path):
    before = _listing(data_dir)
    args = ["-cn", "smoke", "parallel=ddp_gloo", *TINY_RUN, "stage.steps=12", "stage.save_every=4", "data.num_workers=1",
            "data.valid_fraction=0.1", "data.phase2_start=0.5",
            f"data.phase1={_blend(data_dir, PHASE1)}", f"data.phase2={_blend(data_dir, PHASE2)}"]
    straight = tmp_path / "straight"
    res = run_torchrun(*args, f"run.dir={straight}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _listing(data_dir) == before  # nothing written beside the data
    assert list((straight / "data_cache").glob("*GPTDataset*")) or list((straight / "data_cache").rglob("*.npy"))
    records = read_records(straight)
    assert [r["phase"] for r in records] == [1] * 6 + [2] * 6 and "val_loss" in records[-1]
    assert all(r["data/wait_s"] >= 0 and 0 <= r["data/wait_fraction"] <= 1 for r in records)
    for phase, weights in ((1, PHASE1), (2, PHASE2)):  # target-token shares of both ranks, per phase
        rows = [r for r in records if r["phase"] == phase]
        for name, w in weights.items():
            share = sum(r[f"data/share/{name}"] for r in rows) / len(rows)
            assert abs(share - w) < 0.05, (phase, name, share, w)
    # rare runs past one epoch in phase 2 (the trainer warns); resume from step 4 crosses both boundaries
    assert "rare: the schedule takes" in res.stderr + res.stdout
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for step in (8, 12):
        shutil.rmtree(resumed / "checkpoints" / f"step_{step:08d}")
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    res = run_torchrun(*args, f"run.dir={resumed}")
    assert res.returncode == 0, res.stderr[-3000:]
    again = read_records(resumed)
    assert [r["loss"] for r in again] == [r["loss"] for r in records]  # bitwise


def test_own_data_in_one_override(data_dir, tmp_path):
    """``data.path=<prefix>`` replaces the recipe's two phases (the smoke recipe's are generated data)."""
    run_dir = tmp_path / "own"
    res = run_cli("-cn", "smoke", *TINY_RUN, "stage.steps=2", "data.valid_fraction=0.1", f"data.path={data_dir / 'mid'}",
                  f"run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_records(run_dir)
    assert len(records) == 2 and {r["phase"] for r in records} == {1} and {r["data/share/mid"] for r in records} == {1.0}
    assert "val_loss" in records[-1]


def test_overriding_phase1_alone_is_refused_not_silently_mixed(data_dir, tmp_path):
    """The old trap: indexed data in data.phase1 under the smoke recipe's generated phase 2."""
    data = DataConfig(phase1=[BlendEntry(f"indexed:{data_dir / 'mid'}", 1.0)],
                      phase2=[BlendEntry("synthetic:prose", 1.0)], phase2_start=0.8)
    with pytest.raises(DataError, match=r"data\.phase2\[0\]\.path \('synthetic:prose'\) is a byte-level source and "
                                        r"data\.phase1\[0\]\.path .* data\.path=<prefix> or data\.blend"):
        PretrainStage(data, StageConfig(steps=4, global_batch=4, micro_batch=2))
    with pytest.raises(DataError, match=r"data\.path: .*missing"):
        PretrainStage(DataConfig(path=str(tmp_path / "nope")), StageConfig(steps=4, global_batch=4, micro_batch=2))
