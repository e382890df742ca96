"""The sbatch recipes' decisions (run dir, python, requeue or not, signal forwarding), with stand-in
``srun``/``scontrol`` on PATH so that each case takes a second. The real path runs in test_local_slurm.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

FAKE_SRUN = r"""#!/bin/bash
# stand-in srun: records its arguments, then behaves as the training step would
echo "srun $*" >> "$FAKE_LOG"
if [[ -n $FAKE_WAIT_FOR_SIGNAL ]]; then
    trap 'echo "step got USR1" >> "$FAKE_LOG"; exit ${FAKE_ON_SIGNAL:-75}' USR1
    echo started >> "$FAKE_LOG"
    for i in $(seq 1 300); do sleep 0.1; done
    exit 99
fi
exit ${FAKE_STATUS:-0}
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ $1 == show ]]; then
    echo "JobId=$SLURM_JOB_ID JobName=t JobState=${FAKE_JOB_STATE:-RUNNING} Restarts=0"
    exit 0
fi
exit ${FAKE_SCONTROL_RC:-0}
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "fake.log"
    log.touch()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TANDEM_"))}
    base.update({
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_JOB_ID": "4711",
        "SLURM_JOB_NAME": "t", "SLURM_SUBMIT_DIR": str(REPO), "TANDEM_PYTHON": "/bin/true",
        "TANDEM_RUNS_ROOT": str(tmp_path / "runs"),
    })

    def start(script="smoke.sbatch", *args, **env):
        return subprocess.Popen(["bash", str(REPO / "slurm" / script), *args], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**base, **env})

    def run(script="smoke.sbatch", *args, **env):
        p = start(script, *args, **env)
        out, _ = p.communicate(timeout=60)
        return p.returncode, out, log.read_text()

    return start, run, log, tmp_path


def test_success_runs_launcher_with_recipe_and_job_keyed_run_dir(fake):
    _, run, _, tmp = fake
    rc, out, calls = run("smoke.sbatch", "stage.steps=3")
    assert rc == 0, out
    srun = [l for l in calls.splitlines() if l.startswith("srun ")]
    assert len(srun) == 1
    assert f"/bin/true {REPO}/slurm/launch.py -cn smoke stage.steps=3 run.dir={tmp}/runs/smoke/4711" in srun[0]
    assert "scontrol" not in calls and "training finished" in out


def test_recipe_choice_and_explicit_run_dir_are_kept(fake):
    _, run, _, tmp = fake
    rc, out, calls = run("pretrain.sbatch", "-cn", "smoke", "run.dir=/x/y")
    assert rc == 0, out
    assert "-cn smoke run.dir=/x/y" in calls and "runs/" not in calls  # default recipe nano3_pretrain replaced


def test_preempted_step_requeues_the_job(fake):
    _, run, _, _ = fake
    rc, out, calls = run(FAKE_STATUS="75", SLURM_RESTART_COUNT="2")
    assert rc == 0, out
    assert "scontrol requeue 4711" in calls
    assert "restart 3 of at most 20" in out


def test_restarts_are_bounded(fake):
    _, run, _, _ = fake
    rc, out, calls = run(FAKE_STATUS="75", SLURM_RESTART_COUNT="3", TANDEM_MAX_RESTARTS="3")
    assert rc == 75
    assert "scontrol" not in calls
    assert "not requeued: the job already restarted 3 times (TANDEM_MAX_RESTARTS=3)" in out


@pytest.mark.parametrize("status", ["1", "2", "137"])
def test_failure_is_not_requeued(fake, status):
    _, run, _, _ = fake
    rc, out, calls = run(FAKE_STATUS=status)
    assert rc == int(status)
    assert "scontrol" not in calls
    assert f"training failed with exit status {status} (not a preemption): not requeued" in out


@pytest.mark.parametrize("state", ["COMPLETING", "CANCELLED"])
def test_cancelled_job_is_not_requeued(fake, state):
    """scancel sends TERM too: the trainer checkpoints and exits 75, but a cancelled job stays cancelled."""
    _, run, _, _ = fake
    rc, out, calls = run(FAKE_STATUS="75", FAKE_JOB_STATE=state)
    assert rc == 75
    assert "scontrol show job 4711" in calls and "requeue" not in calls
    assert f"the job is {state}, not RUNNING" in out and "not requeued from here" in out


def test_failed_requeue_is_reported(fake):
    _, run, _, _ = fake
    rc, out, calls = run(FAKE_STATUS="75", FAKE_SCONTROL_RC="1")
    assert rc == 75 and "scontrol requeue 4711" in calls
    assert "scontrol requeue failed" in out


def _wait_for(path: Path, text: str, timeout: float = 30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path.read_text()!r}")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_is_forwarded_once_then_requeued(fake, sig):
    start, _, log, _ = fake
    p = start("smoke.sbatch", FAKE_WAIT_FOR_SIGNAL="1")
    _wait_for(log, "started")
    p.send_signal(sig)
    time.sleep(0.05)
    p.send_signal(sig)  # a second notice (e.g. TERM after USR1) is not forwarded again
    out, _ = p.communicate(timeout=60)
    calls = log.read_text()
    assert p.returncode == 0, out
    assert calls.count("step got USR1") == 1
    assert "scontrol requeue 4711" in calls


def test_step_killed_by_signal_after_notice_is_requeued(fake):
    """A notice during start-up, before the trainer's handler is installed, kills the task (status > 128):
    that is still a preemption (the run resumes from its previous checkpoint)."""
    start, _, log, _ = fake
    p = start("smoke.sbatch", FAKE_WAIT_FOR_SIGNAL="1", FAKE_ON_SIGNAL="138")
    _wait_for(log, "started")
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "scontrol requeue 4711" in log.read_text()


@pytest.mark.parametrize("env, args, message", [
    ({"SLURM_JOB_ID": ""}, [], "submit with sbatch"),
    ({"TANDEM_PYTHON": "/no/python"}, [], "make setup"),
    ({}, ["-cn", "no_such_recipe"], "no recipe"),
    ({"TANDEM_HOME": "/tmp"}, [], "submit from the repository root or set TANDEM_HOME"),
    ({"TANDEM_VENV": "/no/venv", "TANDEM_PYTHON": ""}, [], "has no bin/activate"),
])
def test_bad_setup_says_what_to_fix(fake, env, args, message):
    _, run, _, _ = fake
    rc, out, calls = run("smoke.sbatch", *args, **env)
    assert rc == 2 and message in out, out
    assert "srun" not in calls


@pytest.mark.parametrize("script", ["smoke.sbatch", "pretrain.sbatch", "sft.sbatch", "cpt.sbatch", "rlvr.sbatch", "rlhf.sbatch"])
def test_scripts_ask_for_preemption_notice_requeue_and_appended_logs(script):
    directives = [l.split(None, 1)[1] for l in (REPO / "slurm" / script).read_text().splitlines()
                  if l.startswith("#SBATCH ")]
    assert any(d.startswith("--signal=B:USR1@") for d in directives), directives
    assert "--requeue" in directives and "--open-mode=append" in directives


def test_launcher_outside_srun_says_what_to_fix():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run([sys.executable, str(REPO / "slurm" / "launch.py"), "-cn", "smoke"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert "SLURM_PROCID not set: run the launcher as a task of an srun step" in out.stderr


def test_launcher_execs_the_trainer_with_the_mapped_env(tmp_path):
    """One task's environment → the trainer's Hydra app, which prints the composed config and exits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "1",
                "SLURM_STEP_NODELIST": "node[3-4]", "SLURM_JOB_ID": "31", "PYTHONPATH": str(REPO), "PATH": str(tmp_path)})  # no scontrol: pure-Python hostlist
    out = subprocess.run([sys.executable, str(REPO / "slurm" / "launch.py"), "-cn", "smoke", "stage.steps=7", "--cfg", "job"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[launch] rank 0/1 local 0/1 node 0" in out.stderr and "master node3:20031" in out.stderr
    assert "steps: 7" in out.stdout
