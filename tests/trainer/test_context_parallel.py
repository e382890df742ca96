"""Context parallelism (``parallel.cp``): CP = 2 equals one process, forward and backward.

One torchrun launch (2 gloo processes, ``cp_worker.py``) checks attention alone, Mamba-2 alone, the whole
model and the whole model with EP = 2 over the same ranks, on packed documents that cross rank and chunk
boundaries. Tolerances are relative to the largest reference value (fp32).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tandem.trainer.parallel.context import ContextParallel

from .conftest import REPO

TOL = 1e-5


def _torchrun(*args, nproc=2, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_cp2_forward_backward_equals_single_process(tmp_path):
    out = tmp_path / "verdict.json"
    res = _torchrun(str(REPO / "tests" / "trainer" / "cp_worker.py"), str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["model"]["cp_rank"] for r in ranks] == [0, 1]
    for r in ranks:
        for check in ("attention", "mamba"):
            for key in ("out", "input_grad", "grads"):
                assert r[check][key] <= TOL, (check, key, r[check])
        for check in ("model", "model_ep2"):
            for key in ("loss", "logits", "grads"):
                assert r[check][key] <= TOL, (check, key, r[check])
        assert r["model"]["local_experts"] == 8 and r["model_ep2"]["local_experts"] == 4


class _FakeGroupCP(ContextParallel):
    """The layout methods without a process group (rank/size given)."""

    def __init__(self, size, rank):
        self.group, self.size, self.rank = None, size, rank
        self.chunk_ids = (rank, 2 * size - 1 - rank)


def test_load_balanced_split_covers_every_token_once():
    t = torch.arange(24)[None]
    pieces = [_FakeGroupCP(3, r).shard(t) for r in range(3)]
    assert pieces[0].tolist() == [[0, 1, 2, 3, 20, 21, 22, 23]]
    assert sorted(torch.cat(pieces, 1)[0].tolist()) == list(range(24))
    for r in range(3):
        assert torch.equal(_FakeGroupCP(3, r).positions(8), pieces[r][0])
    with pytest.raises(ValueError, match="divisible by 2 × parallel.cp = 6"):
        _FakeGroupCP(3, 0).shard(torch.arange(20)[None])
