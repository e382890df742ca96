"""DeepSpeed ZeRO as the loop's engine (CPU accelerator, gloo): 2 processes match 1 process with the same
global batch, and checkpoints move between ZeRO and plain runs."""

import os
import subprocess
import sys

import pytest

from .conftest import read_records, REPO, TINY_RUN, run_cli

pytest.importorskip("deepspeed")

ARGS = [*TINY_RUN, "stage.steps=5", "stage.micro_batch=1", "stage.save_every=2"]


def _torchrun(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tandem.trainer.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _assert_same_losses(a, b, what):
    assert [r["step"] for r in a] == [r["step"] for r in b], what
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"], (what, a, b)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    res = run_cli("-cn", "smoke", *ARGS, f"run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_dp2_matches_single_process(stage, single_run, tmp_path):
    # ZeRO-1/2 accumulate 2 micro-batches per rank; ZeRO-3 takes the same global batch in one (see below).
    extra = ["stage.micro_batch=2"] if stage == 3 else []
    res = _torchrun("-cn", "smoke", f"parallel=zero{stage}", *ARGS, *extra, f"run.dir={tmp_path / 'zero'}")
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_losses(read_records(single_run), read_records(tmp_path / "zero"), f"zero{stage}")
    if not extra:  # (the held-out set is eval_batches × micro_batch windows: comparable at equal micro_batch)
        val = [read_records(d)[-1]["val_loss"] for d in (single_run, tmp_path / "zero")]
        assert abs(val[0] - val[1]) <= 1e-5 * val[0]


@pytest.mark.slow
def test_zero2_checkpoint_resumes_without_zero_and_back(single_run, tmp_path):
    """ZeRO-2 (2 procs) step-2 checkpoint → 1 process, no ZeRO; and the 1-process checkpoint → ZeRO-3."""
    res = _torchrun("-cn", "smoke", "parallel=zero2", *ARGS, f"run.dir={tmp_path / 'z2'}")
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "z2" / "checkpoints" / "step_00000004"
    res = run_cli("-cn", "smoke", *ARGS, f"run.dir={tmp_path / 'plain'}", f"run.resume={ckpt}")
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_losses(read_records(single_run)[4:], read_records(tmp_path / "plain"), "zero2 → plain")
    ckpt = single_run / "checkpoints" / "step_00000004"
    res = _torchrun("-cn", "smoke", "parallel=zero3", *ARGS, "stage.micro_batch=2", f"run.dir={tmp_path / 'z3'}", f"run.resume={ckpt}")
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_losses(read_records(single_run)[4:], read_records(tmp_path / "z3"), "plain → zero3")


def test_zero3_refuses_gradient_accumulation(tmp_path):
    """DeepSpeed 0.19.8's ZeRO-3 drops accumulated micro-batch gradients here; the engine refuses rather
    than train on part of each batch (the message says how to fix the config)."""
    from tandem.trainer.config import OptimConfig, ParallelConfig, StageConfig
    from tandem.trainer.parallel.zero import DeepSpeedEngine
    from tandem.trainer.config import ConfigError
    from tandem.trainer.parallel.distributed import DistInfo

    import torch

    info = DistInfo(0, 2, 0, torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="stage.micro_batch=2"):
        DeepSpeedEngine(model, torch.optim.AdamW(model.parameters()), info, ParallelConfig(zero_stage=3), OptimConfig(),
                        StageConfig(global_batch=4, micro_batch=1))


def test_cpu_shm_op_is_not_built():
    """On the CPU accelerator the engine stops DeepSpeed JIT-compiling its shared-memory all-reduce op (90–150 s
    of C++ on a fresh machine; gloo does the collectives): the patch must reach the module DeepSpeed calls."""
    import importlib

    from tandem.trainer.parallel.zero import _skip_cpu_shm_op

    module = importlib.import_module("deepspeed.comm.torch")
    before = module.build_shm_op
    try:
        _skip_cpu_shm_op()
        assert module.build_shm_op() is None and module.build_shm_op is not before
    finally:
        module.build_shm_op = before
