"""DeepSpeed ZeRO together with expert parallelism (gloo, EP=2) equals one process with all experts and no
ZeRO: losses, pre-clip gradient norms (clipping active), expert load, final weights and optimizer state;
checkpoints move between EP=2/ZeRO and EP=1 without ZeRO in both directions.

2 processes: EP=2 × expert-data-parallel 1 (experts not partitioned further). 4 processes: EP=2 ×
expert-data-parallel 2, where ZeRO partitions each expert shard's optimizer state (ZeRO-3: its weights)
over the expert-data-parallel group and the norm's expert terms must still count each shard once."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import read_records, REPO, TINY_RUN, run_cli

pytest.importorskip("deepspeed")

CLIP = 0.5  # below every step's gradient norm here (≈ 1.7–2.3), so every step is clipped by the global norm
ARGS = [*TINY_RUN, "stage.micro_batch=1", "stage.save_every=3", "model.hybrid_override_pattern=ME*E",
        "optim.expert_bias_update_rate=0.01", f"optim.clip_grad={CLIP}"]
WORKER = str(REPO / "tests" / "trainer" / "zero_ep_worker.py")


def _ep_zero(stage, run_dir, *extra, nproc=2):
    """tandem at EP=2 with ZeRO-``stage`` on ``nproc`` processes; returns the worker's cross-rank verdict."""
    verdict = run_dir.parent / f"{run_dir.name}.verdict.json"
    if stage == 3:  # ZeRO-3 needs one micro-batch per rank per step (see tandem.trainer.parallel.zero)
        extra = (f"stage.micro_batch={4 // nproc}", *extra)
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), WORKER, str(verdict),
         "-cn", "smoke", "parallel=ep2", f"parallel.zero_stage={stage}", *ARGS, *extra, f"run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(verdict.read_text())


def _assert_same_steps(a, b, what):
    assert [r["step"] for r in a] == [r["step"] for r in b], what
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"], (what, a, b)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * x["grad_norm"], (what, a, b)
        assert x["moe/max_load"] == y["moe/max_load"], (what, a, b)


def _assert_same_checkpoint(a, b, what):
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys(), what
    for k in wa:
        # AdamW scales every update to ~lr (3e-3 here) whatever the gradient's size, so fp32 summation-order
        # noise in near-zero gradients (ZeRO-3 and EP reduce in other orders than one process) reaches the
        # weights at a few 1e-5 after 6 steps; 5e-5 is 1/60 of one update, far below a real mismatch
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=5e-5), (what, k, (wa[k] - wb[k]).abs().max())
    oa, ob = (torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b))
    assert [(g["name"], sorted(g["param_names"])) for g in oa["param_groups"]] == \
        [(g["name"], sorted(g["param_names"])) for g in ob["param_groups"]], what
    for name, entry in ob["state"].items():
        assert float(oa["state"][name]["step"]) == float(entry["step"]), (what, name)
        for k in ("exp_avg", "exp_avg_sq"):
            # moments of near-zero gradients (1e-8 and below) carry the same summation-order noise
            d = (oa["state"][name][k] - entry[k]).abs().max()
            assert torch.allclose(oa["state"][name][k], entry[k], rtol=1e-4, atol=1e-7), (what, name, k, d)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, EP=1, no ZeRO, same global batch."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    res = run_cli("-cn", "smoke", *ARGS, f"run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def ep2_zero2_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ep2_zero2") / "run"
    return run_dir, _ep_zero(2, run_dir)


def _check_against_single(run_dir, verdict, single_run, what):
    ref = read_records(single_run)
    assert len(ref) == 6 and all(r["grad_norm"] > CLIP for r in ref)  # the clipping path is exercised
    _assert_same_steps(ref, read_records(run_dir), what)
    _assert_same_checkpoint(run_dir / "checkpoints" / "step_00000006", single_run / "checkpoints" / "step_00000006", what)
    # the expert bias moved, identically on every rank; dense weights identical on every rank
    assert verdict["bias_layers"] == 2 and verdict["bias_range"] > 0, verdict
    assert verdict["bias_rank_diff"] == 0.0 and verdict["dense_rank_diff"] in (0.0, None), verdict


@pytest.mark.slow
def test_ep2_zero2_matches_single_process(ep2_zero2_run, single_run):
    _check_against_single(*ep2_zero2_run, single_run, "ep2 zero2")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_ep2_zero_matches_single_process(stage, single_run, tmp_path):
    _check_against_single(tmp_path / "run", _ep_zero(stage, tmp_path / "run"), single_run, f"ep2 zero{stage}")


@pytest.mark.slow
def test_ep2_zero2_checkpoint_resumes_at_ep1_and_back(ep2_zero2_run, single_run, tmp_path):
    """EP=2/ZeRO-2 step-3 checkpoint → 1 process, EP=1, no ZeRO; and the 1-process checkpoint → EP=2/ZeRO-2.
    Both continue exactly as the uninterrupted runs (which equal each other, tested above)."""
    ep_dir, _ = ep2_zero2_run
    res = run_cli("-cn", "smoke", *ARGS, f"run.dir={tmp_path / 'plain'}",
                  f"run.resume={ep_dir / 'checkpoints' / 'step_00000003'}")
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_steps(read_records(ep_dir)[3:], read_records(tmp_path / "plain"), "ep2 zero2 → ep1 plain")
    _ep_zero(2, tmp_path / "ez2", f"run.resume={single_run / 'checkpoints' / 'step_00000003'}")
    _assert_same_steps(read_records(single_run)[3:], read_records(tmp_path / "ez2"), "ep1 plain → ep2 zero2")
    _assert_same_checkpoint(tmp_path / "ez2" / "checkpoints" / "step_00000006",
                            single_run / "checkpoints" / "step_00000006", "ep1 plain → ep2 zero2")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_ep2_zero_with_expert_data_parallel_resumes_single_checkpoint(stage, single_run, tmp_path):
    """4 processes (expert shards partitioned over 2 expert-data-parallel ranks) resume the 1-process step-3
    checkpoint and continue exactly as it did: optimizer state scattered into expert partitions, gradients
    reduced and norm counted per expert group, state gathered back into the same checkpoint."""
    verdict = _ep_zero(stage, tmp_path / "run", f"run.resume={single_run / 'checkpoints' / 'step_00000003'}", nproc=4)
    _assert_same_steps(read_records(single_run)[3:], read_records(tmp_path / "run"), f"ep2 × edp2 zero{stage}")
    _assert_same_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000006",
                            single_run / "checkpoints" / "step_00000006", f"ep2 × edp2 zero{stage}")
    assert verdict["bias_rank_diff"] == 0.0 and verdict["dense_rank_diff"] in (0.0, None), verdict
