"""Run untrusted (model-written) programs in a Linux namespace sandbox, with limits, and never without one.

    box = Sandbox(SandboxLimits(wall_s=5, memory_mb=256))     # probes once: SandboxUnavailable if it cannot
    res = box.run(["python3", "main.py"], files={"main.py": src}, stdin=b"1 2\\n")
    res.returncode, res.stdout, res.timed_out, res.output_truncated

**What the program sees.** A process tree in fresh user, mount, network, PID, IPC and UTS namespaces:

- *filesystem*: a new root (a size-limited ``tmpfs``, read-only after set-up) holding read-only bind mounts
  of ``/usr`` and the ``/bin`` ``/lib*`` ``/sbin`` links (plus the interpreter's prefix when it lives
  elsewhere), ``/dev/{null,zero,random,urandom}``, and ``/sandbox``: its working directory, a private
  ``tmpfs`` of ``disk_mb`` that is its **only writable place** (``/tmp`` points there). There is no
  ``/etc``, ``/home``, ``/root``, ``/proc``, ``/sys``, ``/work`` or project checkout: the host's files other
  than the system binaries and libraries do not exist for it. The switch is ``pivot_root`` followed by a
  detached unmount of the old root, so no ``chroot`` escape leads back (``..`` of ``/`` is ``/``).
- *identity*: uid/gid 1000 inside, mapped to the host's ``nobody`` (65534) when the trainer runs as root,
  else to the trainer's own uid; no capabilities after ``execve`` (non-root in its namespace), and
  ``no_new_privs``. Mapping root's sandboxes to ``nobody`` matters: the kernel does not enforce
  ``RLIMIT_NPROC`` for processes of the host's root user.
- *network*: a new network namespace has only a loopback device, down: IPv4, IPv6 and localhost
  connections all fail (nothing of the host's loopback is reachable either).
- *environment*: a fixed ``PATH``/``HOME``/``TMPDIR``/``LANG`` — nothing of the trainer's environment.
- *limits* (``setrlimit``): CPU seconds, address space, file size, process count, open files, no core
  dumps; a wall-clock limit and an output cap enforced by the parent, which then kills the namespace's
  init process (every process of the sandbox dies with it: nothing outlives a run).

The program is the PID-namespace init, so a background child it leaves behind is killed when it exits,
``kill(-1)`` reaches only its own processes, and it cannot see or signal the trainer (other PID namespace,
other uid, its own session).

**Why no library.** bubblewrap / nsjail / firejail are separate binaries a cluster image may lack
(``newuidmap`` is missing here too), and Python 3.11 has no ``os.unshare``/``os.mount``. The handful of
system calls needed (``unshare``, ``mount``, ``umount2``, ``pivot_root``, ``prctl``) are made through
``ctypes`` by a stdlib-only bootstrap (this file run as a script), in a fresh single-threaded process —
the trainer itself never forks with ``preexec_fn`` (unsafe in a multi-threaded process).

**Refusal.** Where the kernel refuses any step (user namespaces disabled, seccomp, no ``/usr`` to bind),
:class:`Sandbox` raises :class:`SandboxUnavailable` when it is created (a probe run), and :meth:`Sandbox.run`
raises it for a refused set-up: a program is never run outside the sandbox. Linux only.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

__all__ = ["Sandbox", "SandboxLimits", "SandboxResult", "SandboxUnavailable", "default_interpreter"]

BOOT = os.path.abspath(__file__)
INSIDE_UID = 1000
NOBODY = 65534
WORKDIR = "/sandbox"
#: host paths bind-mounted read-only (those that are symlinks, e.g. /bin -> usr/bin, are recreated as links)
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8"}


class SandboxUnavailable(RuntimeError):
    """The kernel (or this machine's set-up) does not allow the sandbox; nothing was run unsandboxed."""


@dataclass
class SandboxLimits:
    wall_s: float = 10.0  # wall clock of the whole run, set-up included (the parent then kills the namespace)
    cpu_s: int = 5  # RLIMIT_CPU of each process
    memory_mb: int = 512  # RLIMIT_AS of each process
    disk_mb: int = 32  # size of the writable /sandbox tmpfs (all files together; tmpfs is memory)
    file_mb: int = 16  # RLIMIT_FSIZE: largest single file
    processes: int = 32  # RLIMIT_NPROC: processes + threads of the sandbox's user
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # stdout and stderr together; beyond, the run is killed and flagged

    def check(self) -> None:
        for k, v in asdict(self).items():
            if not v > 0:
                raise ValueError(f"sandbox limit {k} must be > 0, got {v!r}")


@dataclass
class SandboxResult:
    returncode: int | None  # None when killed by the parent (wall limit or output cap)
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_truncated: bool = False
    seconds: float = 0.0
    signal: int | None = None  # the signal that ended the program, if any

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


def default_interpreter() -> str:
    """A Python for sandboxed programs: the system's ``/usr/bin/python3`` when present (always visible in
    the sandbox), else the trainer's own interpreter (its prefix is then bind-mounted too)."""
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(cand):
            return cand
    return os.path.realpath(sys.executable)


def _prefix_of(interpreter: str) -> str | None:
    """The install prefix to bind when ``interpreter`` lives outside the system paths."""
    real = os.path.realpath(interpreter)
    if any(real == p or real.startswith(p + "/") for p in SYSTEM_PATHS):
        return None
    # <prefix>/bin/pythonX.Y
    return os.path.dirname(os.path.dirname(real))


class Sandbox:
    """Runs commands in the namespace sandbox of the module doc. Creating one runs a probe program and
    raises :class:`SandboxUnavailable` if the sandbox cannot be set up here (cached per interpreter)."""

    _probed: dict[str, str | None] = {}  # interpreter -> None (works) or the refusal message

    def __init__(self, limits: SandboxLimits | None = None, interpreter: str | None = None, probe: bool = True):
        self.limits = limits or SandboxLimits()
        self.limits.check()
        self.interpreter = interpreter or default_interpreter()
        if not sys.platform.startswith("linux"):
            raise SandboxUnavailable(f"the code sandbox needs Linux namespaces; this is {sys.platform}")
        if probe:
            self.probe()

    def probe(self) -> None:
        key = self.interpreter
        if key not in Sandbox._probed:
            try:
                res = self.run([self.interpreter, "-I", "-c", "print(6 * 7)"],
                               limits=SandboxLimits(wall_s=20, cpu_s=10, memory_mb=512))
                Sandbox._probed[key] = None if res.ok and res.stdout.strip() == b"42" else (
                    f"the probe program failed (returncode {res.returncode}, stderr {res.stderr[-300:]!r})")
            except SandboxUnavailable as e:
                Sandbox._probed[key] = str(e)
        if Sandbox._probed[key] is not None:
            raise SandboxUnavailable(f"sandbox unavailable: {Sandbox._probed[key]}")

    def run(self, argv: Sequence[str], files: Mapping[str, str | bytes] | None = None, stdin: bytes = b"",
            limits: SandboxLimits | None = None) -> SandboxResult:
        """Run ``argv`` (``argv[0]`` a path visible inside, e.g. the interpreter) in ``/sandbox`` holding
        ``files`` (relative names), with ``stdin``. Raises :class:`SandboxUnavailable` if set-up is refused;
        everything the program does is reported in the result, never raised."""
        lim = limits or self.limits
        payload = {
            "argv": list(argv), "limits": asdict(lim), "env": ENV, "stdin": stdin.decode("latin-1"),
            "files": {k: (v if isinstance(v, str) else v.decode("latin-1")) for k, v in (files or {}).items()},
            "binary": sorted(k for k, v in (files or {}).items() if isinstance(v, bytes)),
            "binds": [p for p in (_prefix_of(self.interpreter),) if p],
            "map_to": NOBODY if os.geteuid() == 0 else os.geteuid(),
            "map_gid": NOBODY if os.geteuid() == 0 else os.getegid(),
        }
        for name in payload["files"]:
            if name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"sandbox file names must be relative, got {name!r}")
        status_r, status_w = os.pipe()
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", BOOT, str(status_w)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd="/",
                                    start_new_session=True, pass_fds=(status_w,), close_fds=True)
        finally:
            os.close(status_w)
        try:
            return self._supervise(proc, status_r, json.dumps(payload).encode(), lim, t0)
        finally:
            os.close(status_r)
            _kill(proc, None)

    def _supervise(self, proc, status_r: int, payload: bytes, lim: SandboxLimits, t0: float) -> SandboxResult:
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:  # the bootstrap died before reading: reported below as unavailable
            pass
        deadline = t0 + lim.wall_s
        out, err, status = bytearray(), bytearray(), bytearray()
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status}
        poller = select.poll()  # not select(): a trainer may hold more than FD_SETSIZE descriptors
        for fd in streams:
            poller.register(fd, select.POLLIN)
        timed_out = truncated = False
        init = None  # a pidfd of the namespace's init, once it is known to be our child
        while streams:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for fd, _ in poller.poll(min(left, 1.0) * 1000):
                if fd not in streams:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    poller.unregister(fd)
                    del streams[fd]
                    continue
                streams[fd].extend(chunk)
                if fd == status_r and init is None:
                    init = _open_init(status, proc.pid)
            if len(out) + len(err) > lim.output_bytes:
                truncated = True
                break
        init = init if init is not None else _open_init(status, proc.pid)
        try:
            if timed_out or truncated:
                _kill(proc, init)
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.5))
            except subprocess.TimeoutExpired:  # output closed but the program still runs (closed its stdout)
                timed_out = True
                _kill(proc, init)
        finally:
            if init is not None:
                os.close(init)
        seconds = time.monotonic() - t0
        lines = bytes(status).decode(errors="replace").splitlines()
        errors = [line[6:] for line in lines if line.startswith("error ")]
        if errors:
            raise SandboxUnavailable(f"sandbox set-up refused: {errors[0]}")
        if not (timed_out or truncated) and not any(line.startswith("pid ") for line in lines):
            raise SandboxUnavailable(f"sandbox bootstrap failed: {bytes(err[-500:]).decode(errors='replace')}")
        code = sig = None
        for line in lines:
            if line.startswith("exit "):
                code = int(line[5:])
            elif line.startswith("signal "):
                sig = int(line[7:])
                code = -sig
            elif line.startswith("noexec "):
                code = 127
                err.extend(f"sandbox: cannot execute the program: {line[7:]}\n".encode())
        if timed_out or truncated:
            code = None
        cap = lim.output_bytes
        return SandboxResult(code, bytes(out[:cap]), bytes(err[:cap]), timed_out, truncated, seconds, sig)


def _open_init(status: bytearray, boot_pid: int) -> int | None:
    """A pidfd of the init the bootstrap reported, if that process is still the bootstrap's child (a pidfd
    cannot signal a recycled pid; the parent check rules out one recycled before it was opened)."""
    for line in bytes(status).decode(errors="replace").splitlines():
        if line.startswith("pid "):
            try:
                fd = os.pidfd_open(int(line[4:]))
            except (OSError, AttributeError):
                return None
            try:
                with open(f"/proc/{int(line[4:])}/status") as f:
                    ppid = next((int(x.split()[1]) for x in f if x.startswith("PPid:")), None)
            except OSError:
                ppid = None
            if ppid == boot_pid:
                return fd
            os.close(fd)
            return None
    return None


def _kill(proc: subprocess.Popen, init: int | None) -> None:
    """SIGKILL the namespace's init (every process of the sandbox dies with it) and the bootstrap's
    session (the init also has the bootstrap's death as its parent-death signal)."""
    if init is not None:
        try:
            signal.pidfd_send_signal(init, signal.SIGKILL)
        except OSError:
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for f in (proc.stdout, proc.stderr):
        if f and not f.closed:
            f.close()


# --- the bootstrap: this file run as a script (stdlib only, a fresh single-threaded process) -------------

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}


class _Refused(Exception):
    pass


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)

    def call(name, *args):
        fn = getattr(libc, name)
        if fn(*args) != 0:
            e = ctypes.get_errno()
            raise _Refused(f"{name}{tuple(a.decode() if isinstance(a, bytes) else a for a in args[:3])}: "
                           f"{os.strerror(e)}")

    return libc, call


def _mount(call, src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    call("mount", enc(src), enc(dst), enc(fstype), flags, enc(data))


def _bind_readonly(call, src: str, dst: str) -> None:
    _mount(call, src, dst, None, MS_BIND | MS_REC)
    # a remount inside a user namespace must keep the flags the kernel locked on the original mount
    st = os.statvfs(src).f_flag
    keep = 0
    for st_bit, ms_bit in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                           (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                           (getattr(os, "ST_RELATIME", 4096), MS_RELATIME)):
        if st & st_bit:
            keep |= ms_bit
    _mount(call, None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)


def _build_root(call, libc, p: dict) -> None:
    """In the new mount namespace: a tmpfs root with the read-only system binds, pivot into it."""
    _mount(call, None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    root = "/tmp"  # any existing directory serves as the mount point (this namespace's view only)
    _mount(call, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={4 + len(p['stdin']) // (1 << 20)}m,mode=0755")  # mount points and the stdin file
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            os.makedirs(root + path)
            _bind_readonly(call, path, root + path)
    for path in p["binds"]:
        if not os.path.exists(root + path):
            os.makedirs(root + path)
            _bind_readonly(call, path, root + path)
    os.makedirs(root + "/dev")
    for dev in DEVICES:
        open(root + dev, "w").close()
        _mount(call, dev, root + dev, None, MS_BIND)
    os.makedirs(root + WORKDIR)
    lim = p["limits"]
    _mount(call, "tmpfs", root + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(lim['disk_mb'])}m,mode=0755")
    os.symlink(WORKDIR, root + "/tmp")
    binary = set(p["binary"])
    for name, text in p["files"].items():
        dst = os.path.join(root + WORKDIR, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(text.encode("latin-1") if name in binary else text.encode())
    with open(root + "/.stdin", "wb") as f:
        f.write(p["stdin"].encode("latin-1"))
    os.makedirs(root + "/.old")
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise _Refused(f"pivot_root: unknown system call number on {os.uname().machine}")
    os.chdir(root)
    if libc.syscall(nr, b".", b".old") != 0:
        raise _Refused(f"pivot_root: {os.strerror(ctypes.get_errno())}")
    os.chdir("/")
    call("umount2", b"/.old", MNT_DETACH)
    os.rmdir("/.old")
    _mount(call, None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _exec_program(p: dict, status: int) -> None:
    """The namespace's PID 1: limits, its own session, stdin, then exec the program (never returns)."""
    lim = p["limits"]
    mb = 1 << 20
    for res, value in ((resource.RLIMIT_CPU, int(lim["cpu_s"])), (resource.RLIMIT_AS, int(lim["memory_mb"]) * mb),
                       (resource.RLIMIT_FSIZE, int(lim["file_mb"]) * mb), (resource.RLIMIT_NPROC, int(lim["processes"])),
                       (resource.RLIMIT_NOFILE, int(lim["open_files"])), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    os.setsid()
    fd = os.open("/.stdin", os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    os.chdir(WORKDIR)
    os.umask(0o022)
    os.execve(p["argv"][0], p["argv"], p["env"])


def _boot(status: int) -> None:
    """Enter the namespaces (as ``nobody`` when started as root), build the root, fork the PID-namespace
    init and wait for it. Any refused step is written to ``status`` as ``error ...`` (exit 125)."""
    p = json.loads(sys.stdin.buffer.read())
    os.set_inheritable(status, False)
    libc, call = _libc()
    try:
        uid, gid = int(p["map_to"]), int(p["map_gid"])
        if os.geteuid() == 0:  # root's processes are exempt from RLIMIT_NPROC: become nobody first
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change made /proc/self root's; take it back
        try:
            call("unshare", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
        except _Refused as e:
            raise _Refused(f"the kernel refused new user/mount/network/PID namespaces ({e}); user namespaces "
                           f"are disabled or limited on this machine (kernel.unprivileged_userns_clone, "
                           f"user.max_user_namespaces, a seccomp profile)") from None
        for name, text in (("setgroups", "deny"), ("uid_map", f"{INSIDE_UID} {uid} 1"),
                           ("gid_map", f"{INSIDE_UID} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        _build_root(call, libc, p)
        call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except (_Refused, OSError) as e:
        os.write(status, f"error {e}\n".encode())
        os._exit(125)
    init = os.fork()
    if init == 0:  # PID 1 of the new PID namespace
        try:
            call("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            _exec_program(p, status)
        except BaseException as e:  # noqa: BLE001 — reported, never run unsandboxed
            kind = "noexec" if isinstance(e, FileNotFoundError) else "error"
            os.write(status, f"{kind} {type(e).__name__}: {e}\n".encode())
        os._exit(125)
    os.write(status, f"pid {init}\n".encode())
    _, st = os.waitpid(init, 0)
    end = f"exit {os.WEXITSTATUS(st)}" if os.WIFEXITED(st) else f"signal {os.WTERMSIG(st)}"
    os.write(status, f"{end}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    # imported before privileges are dropped: the trainer's stdlib may live where nobody cannot read
    import ctypes
    import resource

    _boot(int(sys.argv[1]))
