"""Four ranks on skewed blends of three indexed datasets over both phases: every source's megatron dataset
is built at start on every rank together (its index build ends in a collective barrier), so a rank that
draws from a rare source late never waits alone (two ranks used to hang after step 1 with weights 0.9 /
0.1), and the realised token shares over all ranks follow each phase's weights. The 2-rank exact-resume,
read-only-data and epoch-boundary test is tests/trainer/test_data_indexed.py."""

import json
import os
import subprocess
import sys

import pytest

from tandem.data_pipelines.preprocess import preprocess
from tandem.data_pipelines.smoke_data import write_smoke_corpus

from .conftest import REPO, TINY_RUN


@pytest.fixture(scope="module")
def three_prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    prefixes = []
    for seed, name in enumerate(("common", "mid", "rare")):  # in process: what tandem-preprocess writes
        corpus = write_smoke_corpus(root / f"{name}.jsonl", 300, seed=seed)
        preprocess([corpus], root / name)
        prefixes.append(root / name)
    return prefixes


@pytest.mark.slow
def test_skewed_indexed_blends_on_four_ranks_finish_with_the_weights_shares(three_prefixes, tmp_path):
    names = ("common", "mid", "rare")
    phase1, phase2 = dict(zip(names, (0.85, 0.1, 0.05))), dict(zip(names, (0.1, 0.1, 0.8)))
    blend = lambda w: "[" + ", ".join(f"{{path: 'indexed:{p}', weight: {w[n]}}}" for n, p in zip(names, three_prefixes)) + "]"  # noqa: E731
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "stage.steps=8", "stage.eval_every=4", "stage.global_batch=8", "stage.micro_batch=2",
            "data.phase2_start=0.5", f"data.phase1={blend(phase1)}", f"data.phase2={blend(phase2)}"]
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m", "tandem.trainer.cli",
         "-cn", "smoke", "parallel=ddp_gloo", *args, f"run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 8 and "val_loss" in records[-1]
    assert [r["phase"] for r in records] == [1] * 4 + [2] * 4
    for phase, weights in ((1, phase1), (2, phase2)):  # target-token shares over the 4 ranks' 32 rows per phase
        rows = [r for r in records if r["phase"] == phase]
        for name, w in weights.items():
            share = sum(r[f"data/share/{name}"] for r in rows) / len(rows)
            assert abs(share - w) <= 0.1, (phase, name, share, w)
