"""Two ranks on a skewed blend of indexed datasets: every source's megatron dataset is built at start on
every rank together (its index build ends in a collective barrier), so a rank that draws from a rare
source late never waits alone. Used to hang after step 1 with weights 0.9 / 0.1."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, TINY_RUN


@pytest.fixture(scope="module")
def two_prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    prefixes = []
    for name, seed in (("common", 0), ("rare", 1)):
        corpus = root / f"{name}.jsonl"
        subprocess.run([sys.executable, "-m", "tandem.data_pipelines.smoke_data", "--out", str(corpus), "--docs", "300",
                        "--seed", str(seed)], check=True, cwd=REPO, capture_output=True)
        subprocess.run([sys.executable, "-m", "tandem.data_pipelines.preprocess", "-i", str(corpus), "-o", str(root / name),
                        "--no-progress"], check=True, cwd=REPO, capture_output=True)
        prefixes.append(root / name)
    return prefixes


@pytest.mark.slow
def test_skewed_indexed_blend_on_two_ranks_finishes(two_prefixes, tmp_path):
    common, rare = two_prefixes
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "stage.steps=8", "stage.eval_every=4", "data.phase2=[]", "data.phase2_start=1.0",
            f"data.phase1=[{{path: 'indexed:{common}', weight: 0.9}}, {{path: 'indexed:{rare}', weight: 0.1}}]"]
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tandem.trainer.cli",
         "-cn", "smoke", "parallel=ddp_gloo", *args, f"run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 8 and "val_loss" in records[-1]
