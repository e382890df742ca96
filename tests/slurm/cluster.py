"""A private single-node Slurm on localhost for tests: munge + slurmctld + slurmd from a generated slurm.conf.

    with LocalSlurm(tmp_dir) as slurm:
        job = slurm.sbatch(["--ntasks=2", "slurm/smoke.sbatch"], cwd=repo)
        slurm.wait_job(job)

Everything (key, socket, state, spool, logs, pid files) lives in one folder; the daemons run in the
foreground under their own sessions (``slurmctld -D``, ``slurmd -D``, ``munged -F``), because daemon mode
leaves zombies where PID 1 does not reap. Ports are picked free, so a host Slurm on 6817/6818 is not
disturbed. ``stop()`` cancels jobs, stops the daemons with TERM then KILL, and raises if any process of
this cluster (found by its ``SLURM_CONF`` or by its folder on the command line) is left.

Written against Debian 12's Slurm 22.05 packages (slurmctld, slurmd, munge).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun", "munged"]


class SlurmUnavailable(RuntimeError):
    """Slurm is missing and cannot be installed here (the reason is the message)."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]


def ensure_installed() -> None:
    """Install Debian's Slurm + munge when missing (root only). Raises SlurmUnavailable when it cannot."""
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm binaries missing ({', '.join(missing)}) and not root to install them: "
            f"apt-get install -y --no-install-recommends {' '.join(PACKAGES)}"
        )
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"Slurm binaries missing ({', '.join(missing)}) and no apt-get to install {PACKAGES}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if out.returncode != 0:
            # Root with apt but the install failed: a broken set-up, not a reason to skip.
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    still = missing_binaries()
    if still:
        raise RuntimeError(f"installed {PACKAGES} but still missing: {still}")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _term_when_parent_dies() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent exits (prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not Linux: stop() still stops the daemons


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self._procs: dict[str, subprocess.Popen] = {}

    # ----------------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, scontrol...) and therefore for the jobs."""
        # SLURM_* from an enclosing allocation (tests run inside a job) would leak into sbatch/srun
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**env, "SLURM_CONF": str(self.conf), "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}

    def _node_line(self) -> str:
        out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"slurmd -C failed: {out.stderr}")
        line = next(l for l in out.stdout.splitlines() if l.startswith("NodeName="))
        fields = dict(f.split("=", 1) for f in line.split())
        fields["NodeName"] = self.host
        # a little below what is free now, or the node registers as invalid
        avail_mb = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024
        fields["RealMemory"] = str(max(256, int(avail_mb * 0.8)))
        fields.pop("UpTime", None)
        return " ".join(f"{k}={v}" for k, v in fields.items()) + " NodeAddr=127.0.0.1 State=UNKNOWN"

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o755)  # munged refuses a socket folder that is not 755
        ctld_port, slurmd_port = _free_ports(2)
        self.sock = r / "munge" / "munge.socket"
        lines = [
            "ClusterName=tandemtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",  # no DNS needed for the daemons
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.sock},cred_expire=10",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MinJobAge=3600",
            "KillWait=10",
            "InactiveLimit=0",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            self._node_line(),
            # preemption from a higher partition: when an `urgent` job needs their CPUs, jobs in `debug` get
            # their --signal notice (USR1 to the batch shell: preempt_send_user_signal) and GraceTime seconds
            # to checkpoint before Slurm requeues them
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "SlurmctldParameters=preempt_send_user_signal",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30",
            "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # ----------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        # own session (setsid), stopped by pid in stop(); and TERM from the kernel should the test process
        # die without running stop() (SIGKILL, OOM)
        self._procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env, start_new_session=True, preexec_fn=_term_when_parent_dies)
        log.close()

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self.write_conf()
        m = self.root / "munge"
        key = m / "munge.key"
        made = subprocess.run([_sbin("mungekey"), "-c", "-k", str(key)], capture_output=True, text=True) \
            if shutil.which("mungekey", path="/usr/sbin:/usr/bin") else None
        if made is None or made.returncode != 0:
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self._spawn("munged", [_sbin("munged"), "-F", "--force", f"--socket={self.sock}", f"--key-file={key}",
                               f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait(lambda: self.sock.exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "the node to be idle")
        return self

    def _node_idle(self) -> bool:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} during start-up; see {self.root / 'log'}:\n"
                                   + self.logs_tail())
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env, timeout=30) \
            if shutil.which("sinfo") else subprocess.run(["scontrol", "show", "node", self.host], capture_output=True,
                                                          text=True, env=self.env, timeout=30)
        return out.returncode == 0 and "idle" in out.stdout.lower()

    def _wait(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}; logs in {self.root / 'log'}:\n" + self.logs_tail())

    def logs_tail(self, n: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-n:]}")
        return "\n".join(out)

    # ----------------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), capture_output=True, text=True, env={**self.env, **kw.pop("env", {})},
                             timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env or {})
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: int, timeout: float = 180, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                   "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                                                                   "DEADLINE")) -> dict[str, str]:
        end = time.monotonic() + timeout
        info = {}
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: {info}")

    # ----------------------------------------------------------------------------------------------
    def leftovers(self) -> list[tuple[int, str]]:
        """Processes of this cluster still alive: any with our SLURM_CONF in its environment or our folder
        on its command line (daemons, slurmstepd, job scripts, tasks)."""
        marker_env = f"SLURM_CONF={self.conf}".encode()
        marker_cmd = str(self.root).encode()
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmd = (d / "cmdline").read_bytes()
                env = (d / "environ").read_bytes()
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if marker_cmd in cmd or marker_env in env.split(b"\0"):
                found.append((int(d.name), cmd.replace(b"\0", b" ").decode(errors="replace").strip()))
        return found

    def stop(self, timeout: float = 20) -> None:
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", str(os.geteuid()), check=False)
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                q = self.run("squeue", "-h", "-o", "%i", check=False)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):  # reverse start order
            p = self._procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        left = self.leftovers()
        if left:
            time.sleep(2)  # slurmstepd may take a moment after slurmd is gone
            left = self.leftovers()
        if left:
            for pid, _ in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise RuntimeError(f"processes of the test Slurm were left behind (now killed): {left}")

    def __enter__(self) -> "LocalSlurm":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
