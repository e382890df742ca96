"""The sbatch recipes on a real (private, single-node) Slurm: 2-task gloo DP, preemption → checkpoint →
requeue → resume with losses equal to an uninterrupted run, and a failing job that is not requeued."""

import json
import re
import time
from pathlib import Path

import pytest

from .conftest import REPO, job_env

pytestmark = pytest.mark.slow

# Tiny and short; save_every=0 so the only checkpoints are the preemption's and the final one.
RUN = [
    "stage.steps=30", "stage.global_batch=4", "stage.micro_batch=2", "data.seq_len=32", "stage.eval_batches=1",
    "stage.eval_every=0", "stage.save_every=0", "logger.log_every=1", "logger.progress_bar=false",
]
STEPS = 30


def _metrics(run_dir: Path) -> list[dict]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(l) for l in text[: text.rfind("\n") + 1].splitlines()]  # complete lines only


def _submit(slurm, runs: Path, script: str, sbatch_args: list[str], overrides: list[str]) -> tuple[int, Path]:
    log_dir = runs / "logs"
    log_dir.mkdir(exist_ok=True)
    job = slurm.sbatch([*sbatch_args, f"--output={log_dir}/%x-%j.out", str(REPO / "slurm" / script), *overrides],
                       cwd=REPO, env=job_env(runs))
    return job, log_dir


def _log(log_dir: Path, job: int) -> str:
    files = list(log_dir.glob(f"*-{job}.out"))
    return files[0].read_text() if files else "(no log yet)"


@pytest.fixture(scope="module")
def reference(local_slurm, slurm_runs):
    """smoke.sbatch, 2 tasks on one node, uninterrupted."""
    job, logs = _submit(local_slurm, slurm_runs, "smoke.sbatch", ["--ntasks=2"], RUN)
    info = local_slurm.wait_job(job, timeout=240)
    return job, info, slurm_runs / "smoke" / str(job), _log(logs, job)


def test_smoke_sbatch_two_tasks_completes(reference):
    job, info, run_dir, log = reference
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    port = 20000 + job % 10000
    for rank in (0, 1):  # the launcher's mapping, as the tasks saw it
        assert re.search(rf"\[launch\] rank {rank}/2 local {rank}/2 node 0 on \S+; master \S+:{port}", log), log
    assert "2 ranks on cpu" in log
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5  # it trained
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
    final = ckpts / f"step_{STEPS:08d}"
    assert (final / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (final / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]


def test_preemption_checkpoints_requeues_and_resumes_exactly(local_slurm, slurm_runs, reference):
    ref_job, ref_info, ref_dir, _ = reference
    assert ref_info["JobState"] == "COMPLETED"
    job, logs = _submit(local_slurm, slurm_runs, "smoke.sbatch", ["--ntasks=2"], RUN)
    run_dir = slurm_runs / "smoke" / str(job)

    # Preempt mid-run: the notice that --signal=B:USR1@grace would deliver, sent to the batch shell.
    end = time.monotonic() + 180
    while not ((run_dir / "metrics.jsonl").exists() and len(_metrics(run_dir)) >= 2):
        info = local_slurm.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (info, _log(logs, job))
        assert time.monotonic() < end, f"no training steps after 180 s: {_log(logs, job)}"
        time.sleep(0.1)
    local_slurm.run("scancel", "--signal=USR1", "--batch", str(job))

    info = local_slurm.wait_job(job, timeout=300)
    log = _log(logs, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    assert info["Restarts"] == "1", (info, log)
    # first life: notice forwarded, checkpoint, exit 75, requeue; second life sees SLURM_RESTART_COUNT=1
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log
    assert "got SIGUSR1: asking the training tasks to checkpoint" in log
    m = re.search(r"checkpoint written to (\S+/step_(\d+)); exiting with 75", log)
    assert m, log
    stop_step = int(m.group(2))
    assert 0 < stop_step < STEPS, f"the notice arrived too late to interrupt the run (step {stop_step})"
    assert "preempted (exit 75): requeueing job" in log
    assert f"resumed from {m.group(1)} at step {stop_step}" in log
    assert log.index("SLURM_RESTART_COUNT=1") > log.index("preempted (exit 75)")  # appended across requeues
    assert (run_dir / "checkpoints" / f"step_{stop_step:08d}").is_dir()

    # the resumed run equals the uninterrupted one, bitwise
    ours, theirs = _metrics(run_dir), _metrics(ref_dir)
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))  # each step logged once
    assert [m["loss"] for m in ours] == [m["loss"] for m in theirs]
    assert ours[-1]["val_loss"] == theirs[-1]["val_loss"]
    final = f"checkpoints/step_{STEPS:08d}/model/model.safetensors"
    assert (run_dir / final).read_bytes() == (ref_dir / final).read_bytes()


def test_failing_job_is_not_requeued(local_slurm, slurm_runs):
    """pretrain.sbatch sized down to this node; a bad override fails at start-up and stays failed."""
    job, logs = _submit(local_slurm, slurm_runs, "pretrain.sbatch",
                        ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"],
                        ["-cn", "smoke", "stage.no_such_key=1"])
    info = local_slurm.wait_job(job, timeout=120)
    log = _log(logs, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log)
    assert info["ExitCode"] == "1:0", (info, log)
    assert "no_such_key" in log
    assert "training failed with exit status 1 (not a preemption): not requeued" in log
