"""2-process data parallel (gloo, torchrun) matches 1 process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tandem.model import HybridLM

from .conftest import REPO, TINY_RUN, run_cli


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    args = [*TINY_RUN, "stage.steps=5", "stage.eval_batches=2"]
    single = run_cli("-cn", "smoke", *args, f"run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tandem.trainer.cli", "-cn", "smoke", "parallel=ddp_gloo", *args, f"run.dir={tmp_path / 'ddp'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    val = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"] for d in ("single", "ddp")]
    assert abs(val[0] - val[1]) <= 1e-5 * val[0]
    m1 = HybridLM.from_pretrained(tmp_path / "single" / "checkpoints" / "step_00000005" / "model")
    m2 = HybridLM.from_pretrained(tmp_path / "ddp" / "checkpoints" / "step_00000005" / "model")
    # Weights after 5 AdamW steps: the summation order of the gradient all-reduce differs from one process
    # at fp32 round-off, and Adam's m/(sqrt(v)+eps) amplifies that for elements whose gradient is near eps
    # (seen: one element of 8192 off by 1.1e-5 at lr 3e-3); the losses above agree to 1e-5 relative.
    for (n, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(p, q, atol=5e-5, rtol=1e-4, msg=n)
