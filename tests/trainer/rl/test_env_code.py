"""The code environment and its sandbox: verifier results on right / wrong / malformed programs, a battery
of hostile programs (each contained, scored 0, the trainer unaffected), and the refusal path.

Each hostile program prints the expected answer ("3") only if its attack *succeeded*, so a reward of 0
means it was contained; the host-side checks (files, processes, the test process itself) come after."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tandem.trainer.rl.environments import score_batch
from tandem.trainer.rl.environments.code import CodeEnv, extract_program, outputs_match
from tandem.trainer.rl.environments.sandbox import Sandbox, SandboxLimits, SandboxUnavailable

HERE = Path(__file__).resolve()

try:
    Sandbox()
    UNAVAILABLE = None
except SandboxUnavailable as e:
    UNAVAILABLE = str(e)
needs_sandbox = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no sandbox on this machine: {UNAVAILABLE}")

LIMITS = SandboxLimits(wall_s=1.5, cpu_s=1, memory_mb=128, disk_mb=4, file_mb=2, processes=8, output_bytes=4096)
ADD = {"task": "code", "answer": "", "metadata": {"tests": [{"input": "1 2\n", "output": "3\n"}]}}


@pytest.fixture(scope="module")
def env():
    return CodeEnv(limits=LIMITS, total_wall_s=5.0)


def block(src: str) -> str:
    return f"<think></think>Here it is:\n```python\n{textwrap.dedent(src).strip()}\n```\n"


def test_extract_program():
    assert extract_program("```python\nprint(1)\n```") == "print(1)\n"
    assert extract_program("```\na\n```\n```py\nb\n```\n```\nc\n```") == "b\n"  # tagged wins, last tagged
    assert extract_program("```\nc\n```") == "c\n"
    assert extract_program("<think>```python\nx\n```") is None  # reasoning never closed
    assert extract_program("<think>```python\nx\n```</think>no code") is None
    assert extract_program("no block at all") is None
    assert outputs_match("3\n", "3   \n\n\n") and not outputs_match("3", "4") and not outputs_match("3", "")


@needs_sandbox
def test_right_wrong_malformed(env):
    right = env.verify(ADD, block("a, b = map(int, input().split())\nprint(a + b)"))
    assert right.reward == 1.0 and right.components["tests_passed"] == 1.0 and right.components["ran"] == 1.0
    wrong = env.verify(ADD, block("print(4)"))
    assert wrong.reward == 0.0 and wrong.info["outcomes"] == ["wrong"]
    syntax = env.verify(ADD, block("print(("))
    assert syntax.reward == 0.0 and syntax.components["ran"] == 0.0 and "SyntaxError" in syntax.info["stderr"]
    none = env.verify(ADD, "the answer is 3")
    assert none.reward == 0.0 and none.components["extracted"] == 0.0


@needs_sandbox
def test_fraction_all_or_nothing_and_asserts(env):
    sample = {"task": "code", "answer": "", "metadata": {
        "tests": [{"input": "2\n", "output": "4\n"}, {"input": "3\n", "output": "9\n"}],
        "asserts": ["assert sq(2) == 4", "assert sq(-3) == 9"]}}
    half = block("def sq(x):\n    return x * 2\nif __name__ == '__main__':\n    print(sq(int(input())))")
    v = env.verify(sample, half)  # x*2 is right for 2 only: one case and one assert of four
    assert v.reward == pytest.approx(0.5) and v.info["outcomes"] == ["pass", "wrong", "pass", "fail"]
    all_ = {**sample, "metadata": {**sample["metadata"], "reward": "all"}}
    assert env.verify(all_, half).reward == 0.0
    good = block("def sq(x):\n    return x * x\nif __name__ == '__main__':\n    print(sq(int(input())))")
    assert env.verify(all_, good).reward == 1.0
    with pytest.raises(ValueError, match="neither 'tests' nor 'asserts'"):
        env.verify({"task": "code", "answer": "", "metadata": {}}, good)


def _listener(family, host):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(4)
    return s


HOSTILE = {
    # network: a real listener in the trainer's namespace, IPv4 and IPv6 loopback, a name, the internet
    "net_ipv4_localhost": """
        import socket
        s = socket.create_connection(("127.0.0.1", {port4}), timeout=1)
        print(3)""",
    "net_ipv6_localhost": """
        import socket
        s = socket.socket(socket.AF_INET6); s.settimeout(1); s.connect(("::1", {port6}))
        print(3)""",
    "net_localhost_name": """
        import socket
        socket.create_connection(("localhost", {port4}), timeout=1); print(3)""",
    "net_internet": """
        import socket
        socket.create_connection(("1.1.1.1", 53), timeout=1); print(3)""",
    # files: the host's /etc, the project's own files, the trainer's folder, /proc of the trainer
    "read_etc_passwd": """print(3 if open('/etc/passwd').read() else 0)""",
    "read_project_file": """print(3 if open({here!r}).read() else 0)""",
    "list_project_dir": """import os; print(3 if os.listdir({repo!r}) else 0)""",
    "read_trainer_proc": """print(3 if open('/proc/{pid}/environ', 'rb').read() else 0)""",
    "write_outside": """
        import os
        for p in ({outside!r}, '/usr/pwned', '/pwned', '/dev/pwned'):
            try:
                open(p, 'w').write('x'); print(3); break
            except OSError: pass""",
    "chroot_escape": """
        import os
        os.makedirs('x', exist_ok=True); os.chroot('x')
        for _ in range(20): os.chdir('..')
        os.chroot('.'); print(3 if os.path.exists({here!r}) else 0)""",
    # resources
    "fork_bomb": """
        import os
        n = 0
        while True:
            try:
                if os.fork() == 0:
                    import time; time.sleep(30); os._exit(0)
                n += 1
            except OSError:
                pass
            if n > 64: print(3); break""",
    "memory_bomb": """x = bytearray(1 << 30); print(3)""",
    "infinite_loop": """while True: pass""",
    "huge_output": """
        import sys
        while True: sys.stdout.write('3\\n' * 100000)""",
    "sleep_past_wall": """import time; time.sleep(30); print(3)""",
    "disk_fill": """
        n = 0
        try:
            for i in range(1000):
                with open(f'f{{i}}', 'wb') as f: f.write(b'x' * (1 << 20)); n += 1
        except OSError:
            pass
        print(3 if n > 8 else 0)""",
    # processes: the trainer, the parent, the group, everything
    "kill_trainer": """
        import os, signal
        os.kill({pid}, signal.SIGKILL); print(3)""",
    "kill_parent_and_group": """
        import os, signal
        for f in (lambda: os.kill(os.getppid(), 9), lambda: os.killpg(0, 9), lambda: os.kill(-1, 9)):
            try: f()
            except OSError: pass
        print(0)""",
    "background_outlives": """
        import os
        if os.fork() == 0:
            os.execv('/bin/sleep', ['/bin/sleep', '{marker}'])
        print(0)""",
    "read_parent_env": """import os; print(3 if 'TANDEM_SECRET' in os.environ or '{secret}' in str(os.environ) else 0)""",
}


@needs_sandbox
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_contained(env, name, tmp_path, monkeypatch):
    l4 = _listener(socket.AF_INET, "127.0.0.1")
    try:
        l6 = _listener(socket.AF_INET6, "::1")
        port6 = l6.getsockname()[1]
    except OSError:  # no IPv6 on this host: the program still tries (and must fail)
        l6, port6 = None, 9
    secret = "s3cr3t-" + name
    monkeypatch.setenv("TANDEM_SECRET", secret)
    marker = f"{37 + len(name)}.{os.getpid() % 1000:03d}"
    outside = tmp_path / "pwned"
    tmp_path.chmod(0o777)  # even a world-writable host folder must be out of reach
    src = textwrap.dedent(HOSTILE[name]).format(port4=l4.getsockname()[1], port6=port6, here=str(HERE),
                                                repo=str(HERE.parents[3]), pid=os.getpid(), outside=str(outside),
                                                marker=marker, secret=secret)
    t0 = time.monotonic()
    try:
        v = env.verify(ADD, block(src))
    finally:
        l4.close()
        if l6:
            l6.close()
    took = time.monotonic() - t0
    assert v.reward == 0.0, (name, v)
    assert took < LIMITS.wall_s + 2.0, f"{name} took {took:.1f}s (wall limit {LIMITS.wall_s}s)"
    assert not outside.exists()
    assert not Path("/pwned").exists() and not Path("/usr/pwned").exists()
    if name == "background_outlives":
        time.sleep(0.2)
        alive = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith(marker)]
        assert not alive, f"background process outlived the run: {alive}"
    if name == "fork_bomb":
        assert v.info["outcomes"][0] in ("timeout", "crash")  # the wall or the CPU limit ended it
    # and the trainer still works: the sandbox runs the next program normally
    assert env.verify(ADD, block("print(sum(map(int, input().split())))")).reward == 1.0


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


@needs_sandbox
def test_hostile_batch_through_dispatcher(env):
    """The dispatcher (threads, several at once) scores a batch of hostile and honest programs: the honest
    ones still score 1, the hostile 0, and nothing is counted as an environment error."""
    progs = ["while True: pass", "import time; time.sleep(9)", "x = bytearray(1 << 30)",
             "print(sum(map(int, input().split())))", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"]
    pairs = [(ADD, block(p)) for p in progs]
    verdicts, stats = score_batch(pairs, envs={"code": env}, timeout_s=10, max_workers=5)
    assert [v.reward for v in verdicts] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert stats.errors == 0 and stats.timeouts == 0
    assert stats.seconds < 2 * LIMITS.wall_s + 2  # concurrently, not one after the other


def test_refused_namespaces_is_a_clear_error(tmp_path):
    """Where the kernel refuses user namespaces, creating the environment raises SandboxUnavailable and
    nothing runs. Simulated for real: inside a user namespace whose ``user.max_user_namespaces`` is 1, the
    sandbox's own ``unshare`` is refused by the kernel (ENOSPC)."""
    probe = ("from tandem.trainer.rl.environments.code import CodeEnv\n"
             "from tandem.trainer.rl.environments.sandbox import SandboxUnavailable\n"
             "try:\n    CodeEnv()\nexcept SandboxUnavailable as e:\n    print('UNAVAILABLE', e)\n"
             "else:\n    print('RAN')\n")
    if UNAVAILABLE is not None:  # this machine refuses already: the direct path is the check
        with pytest.raises(SandboxUnavailable, match="sandbox unavailable"):
            CodeEnv()
        return
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) to build the refusing namespace")
    script = tmp_path / "probe.py"
    script.write_text(probe)
    cmd = ("echo 1 > /proc/sys/user/max_user_namespaces && "
           f"exec unshare -U --map-user=1000 --map-group=1000 {sys.executable} {script}")
    out = subprocess.run(["unshare", "-Ur", "sh", "-c", cmd], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(HERE.parents[3])})
    assert "UNAVAILABLE sandbox unavailable" in out.stdout, (out.stdout, out.stderr[-2000:])
    assert "refused new user/mount/network/PID namespaces" in out.stdout
    assert "RAN" not in out.stdout
