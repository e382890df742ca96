"""The ``code`` environment: run the completion's program against tests in the namespace sandbox.

Prompt rows (``data_pipelines/rl_prompts.py`` schema) carry the tests in ``metadata``; ``answer`` is a
reference solution (the generated prompt sets are checked by running it)::

    {"prompt": "Read two integers and print their sum. Answer with a ```python block.",
     "task": "code", "answer": "a, b = map(int, input().split())\\nprint(a + b)",
     "metadata": {"tests": [{"input": "1 2\\n", "output": "3\\n"}, ...],      # stdin -> expected stdout
                  "asserts": ["assert add(1, 2) == 3", ...],                # and/or assert statements
                  "reward": "fraction"}}                                      # or "all" (all-or-nothing)

**Extraction**: on the text after the last ``</think>`` (an unclosed reasoning block has no program), the
last fenced block tagged ``python``/``py`` (else the last untagged fenced block).

**Tests**: each ``tests`` case is its own sandboxed run of the program with the case's stdin; its stdout
must equal ``output`` up to trailing whitespace on each line and trailing blank lines (compared here, in
the trainer, never inside the sandbox). The ``asserts`` run in one sandboxed process that executes the
program and then each statement, reporting per statement. Reward: the fraction of all cases and
asserts passed, or 1/0 with ``reward="all"`` (per row, or the environment's ``all_or_nothing``).
A case that times out, crashes, exceeds the output cap or prints the wrong answer fails; it never raises.

Honest limits: assert statements share a process with the program, so a program written against this
harness could forge its report lines (the report lines carry a per-run random token read from stdin, which
only stops accidental matches); prefer stdin/stdout cases where reward hacking matters. The sandbox
(:mod:`.sandbox`) contains what the program can reach, not what it prints.

Components: ``extracted`` (a fenced block was found), ``ran`` (the program did not fail to compile),
``tests_passed`` (the fraction, also when the reward is all-or-nothing), ``timeouts`` (fraction of cases
that hit the wall limit). ``info``: per-case outcomes and the first failure's stderr tail.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, Mapping

from .base import Environment, Verdict, register_environment
from .sandbox import Sandbox, SandboxLimits, SandboxResult

__all__ = ["CodeEnv", "extract_program", "outputs_match"]

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)

_ASSERT_HARNESS = r'''
import sys
_token = sys.stdin.readline().strip()
_tests = __import__("json").loads(sys.stdin.read())
_g = {"__name__": "solution"}  # a main guard does not run
try:
    exec(compile(open("solution.py").read(), "solution.py", "exec"), _g)
except BaseException as e:
    print(_token, "load", type(e).__name__, flush=True)
    raise SystemExit(1)
for _i, _t in enumerate(_tests):
    try:
        exec(compile(_t, f"assert_{_i}", "exec"), _g)
        print(_token, "pass", _i, flush=True)
    except BaseException as e:
        print(_token, "fail", _i, type(e).__name__, flush=True)
'''


def extract_program(completion: str) -> str | None:
    """The last ```python (or ```py) fenced block after the reasoning; else the last untagged block."""
    text = completion
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return None
    blocks = _FENCE.findall(text)
    tagged = [body for tag, body in blocks if tag.lower() in ("python", "py", "python3")]
    plain = [body for tag, body in blocks if not tag]
    pick = tagged or plain
    return pick[-1] if pick else None


def _norm(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(expected: str, got: str) -> bool:
    """Equal up to trailing whitespace per line and trailing blank lines."""
    return _norm(expected) == _norm(got)


@register_environment("code")
class CodeEnv(Environment):
    """Reward = fraction of tests passed (or all-or-nothing); see the module doc.

    ``limits``: the sandbox's per-run limits; ``total_wall_s``: the budget of one verify call (cases after
    it are failed without running, so a slow program cannot make a call outlast the dispatcher's timeout —
    keep ``stage.grpo.score_timeout_s`` above it). Creating the environment probes the sandbox and raises
    :class:`~.sandbox.SandboxUnavailable` where it cannot run (never an unsandboxed fallback)."""

    def __init__(self, limits: SandboxLimits | None = None, total_wall_s: float = 8.0, all_or_nothing: bool = False,
                 interpreter: str | None = None):
        self.limits = limits or SandboxLimits(wall_s=3.0, cpu_s=2, memory_mb=256, disk_mb=16, file_mb=8,
                                              processes=16, output_bytes=1 << 16)
        self.total_wall_s = total_wall_s
        self.all_or_nothing = all_or_nothing
        self.sandbox = Sandbox(self.limits, interpreter=interpreter)

    def _python(self, script: str) -> list[str]:
        return [self.sandbox.interpreter, "-I", "-S", "-B", script]

    def verify(self, sample: Mapping[str, Any], completion: str) -> Verdict:
        meta = sample.get("metadata") or {}
        cases = list(meta.get("tests") or [])
        asserts = [str(a) for a in meta.get("asserts") or []]
        if not cases and not asserts:
            raise ValueError(f"{sample.get('where', 'code sample')}: metadata has neither 'tests' nor 'asserts'")
        all_or_nothing = {"all": True, "fraction": False}.get(meta.get("reward"), self.all_or_nothing)
        program = extract_program(completion)
        n = len(cases) + len(asserts)
        if program is None:
            return Verdict(0.0, {"extracted": 0.0, "ran": 0.0, "tests_passed": 0.0, "timeouts": 0.0},
                           {"error": "no fenced code block"})
        deadline = time.monotonic() + self.total_wall_s
        outcomes: list[str] = []
        first_stderr = None
        compiled = True
        for case in cases:
            if time.monotonic() >= deadline or (all_or_nothing and outcomes and outcomes[-1] != "pass"):
                outcomes.append("skipped")
                continue
            res = self.sandbox.run(self._python("solution.py"), files={"solution.py": program},
                                   stdin=str(case.get("input", "")).encode())
            outcome = _outcome(res, lambda out: outputs_match(str(case.get("output", "")), out))
            if outcome != "pass" and first_stderr is None:
                first_stderr = res.stderr[-400:].decode(errors="replace")
            compiled = compiled and b"SyntaxError" not in res.stderr
            outcomes.append(outcome)
        if asserts:
            if time.monotonic() >= deadline:
                outcomes += ["skipped"] * len(asserts)
            else:
                token = secrets.token_hex(16)
                res = self.sandbox.run(self._python("harness.py"),
                                       files={"solution.py": program, "harness.py": _ASSERT_HARNESS},
                                       stdin=(token + "\n" + json.dumps(asserts)).encode())
                passed = set()
                for line in res.stdout.decode(errors="replace").splitlines():
                    parts = line.split()
                    if len(parts) >= 3 and parts[0] == token and parts[1] == "pass" and parts[2].isdigit():
                        passed.add(int(parts[2]))
                    if len(parts) >= 3 and parts[0] == token and parts[1] == "load":
                        compiled = compiled and parts[2] != "SyntaxError"
                base = "timeout" if res.timed_out else "output_cap" if res.output_truncated else "fail"
                outcomes += ["pass" if i in passed else base for i in range(len(asserts))]
                if len(passed) < len(asserts) and first_stderr is None:
                    first_stderr = res.stderr[-400:].decode(errors="replace")
        frac = sum(o == "pass" for o in outcomes) / n
        reward = float(frac == 1.0) if all_or_nothing else frac
        return Verdict(reward, {"extracted": 1.0, "ran": float(compiled), "tests_passed": frac,
                                "timeouts": sum(o == "timeout" for o in outcomes) / n},
                       {"outcomes": outcomes, "stderr": first_stderr})


def _outcome(res: SandboxResult, check) -> str:
    if res.timed_out:
        return "timeout"
    if res.output_truncated:
        return "output_cap"
    if res.returncode != 0:
        return "crash"
    return "pass" if check(res.stdout.decode(errors="replace")) else "wrong"
