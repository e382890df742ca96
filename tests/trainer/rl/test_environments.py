"""The math environment (extraction, math-verify equivalence) and the dispatcher (timeouts and errors
score 0 and are counted, order is kept, async environments, the process backend)."""

import multiprocessing
import time

import pytest

from tandem.trainer.rl.environments import ENVIRONMENTS, check_tasks, get_environment, score_batch
from tandem.trainer.rl.environments.math import MathEnv, extract_answer, extract_boxed

from .envs_for_tests import AsyncEnv, EchoEnv, SlowPrepareEnv, UnpicklableEnv


@pytest.mark.parametrize("text, answer, method", [
    (r"so the result is \boxed{42}.", "42", "boxed"),
    (r"\boxed{\frac{\sqrt{3}}{2}} and then", r"\frac{\sqrt{3}}{2}", "boxed"),  # nested braces
    (r"first \boxed{1}, finally \boxed{ {a}_{2} }", "{a}_{2}", "boxed"),  # the last box, stripped
    (r"\fbox{7}", "7", "boxed"),
    ("The answer is 42.", "42", "answer_is"),
    (r"Thus the final answer is $\frac{3}{4}$.", r"\frac{3}{4}", "answer_is"),
    ("Answer: **-5**", "-5", "answer_is"),
    ("We get 3 apples, then 1,000 more.", "1000", "last_number"),
    ("so x = 2.5", "2.5", "last_number"),
    (r"<think>maybe \boxed{9}</think>It is \boxed{8}", "8", "boxed"),  # only after the reasoning
    (r"<think>\boxed{9} and the budget ran out", None, None),  # reasoning never closed: no answer
    ("no digits here", None, None),
    (r"\boxed{unclosed", None, None),
])
def test_extract_answer(text, answer, method):
    assert extract_answer(text) == (answer, method)


def test_extract_boxed_deep_nesting():
    assert extract_boxed(r"\boxed{\left\{ \frac{1}{\sqrt{2}} \right\}}") == r"\left\{ \frac{1}{\sqrt{2}} \right\}"


@pytest.mark.parametrize("gold, completion", [
    (r"\frac{1}{2}", r"\boxed{0.5}"),
    ("0.5", r"The answer is $\frac{1}{2}$"),
    ("2", r"\boxed{\sqrt{4}}"),
    (42, r"\boxed{42}"),  # a numeric gold answer from JSON
    (r"x + 1", r"\boxed{1 + x}"),
])
def test_math_env_accepts_equivalent_forms(gold, completion):
    v = MathEnv().verify({"answer": gold}, completion)
    assert v.reward == 1.0, v.info


def test_math_env_rejects_wrong_and_missing_answers():
    env = get_environment("math")
    wrong = env.verify({"answer": r"\frac{1}{2}"}, r"\boxed{\frac{1}{3}}")
    assert wrong.reward == 0.0
    assert wrong.components == {"extracted": 1.0, "format_ok": 1.0}
    assert wrong.info["extracted"] == r"\frac{1}{3}"
    plain = env.verify({"answer": "7"}, "it is 7")
    assert plain.reward == 1.0 and plain.components == {"extracted": 1.0, "format_ok": 0.0}
    none = env.verify({"answer": "7"}, "<think>seven")
    assert none.reward == 0.0 and none.components == {"extracted": 0.0, "format_ok": 0.0}


def test_registry_and_unknown_tasks():
    assert ENVIRONMENTS["math"] is MathEnv
    check_tasks(["math"])
    with pytest.raises(ValueError, match="no environment registered for task.*'chess'"):
        check_tasks(["math", "chess"])


def test_dispatcher_scores_timeouts_and_errors_as_zero_and_counts_them():
    envs = {"echo": EchoEnv()}
    pairs = [({"task": "echo"}, c) for c in ["0.5", "sleep 5", "raise", "bad", "nan", "1"]]
    pairs.append(({"task": "chess"}, "1"))
    t0 = time.perf_counter()
    verdicts, stats = score_batch(pairs, envs=envs, timeout_s=0.5, max_workers=4)
    elapsed = time.perf_counter() - t0
    assert [v.reward for v in verdicts] == [0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert verdicts[0].components == {"len": 3.0}
    assert [v.info.get("error") for v in verdicts] == [None, "timeout", "error", "error", "error", None, "error"]
    assert (stats.calls, stats.ok, stats.timeouts, stats.errors) == (7, 2, 1, 4)
    assert any("verifier crashed" in m for m in stats.first_errors)
    assert elapsed < 3.0  # the hung call was abandoned at its timeout, not waited for
    assert stats.as_metrics()["env_timeout_frac"] == pytest.approx(1 / 7)


def test_dispatcher_timeout_is_per_call_not_per_batch():
    # 6 calls of 0.3 s on 2 workers take ~0.9 s in all; each is well inside its own 0.6 s limit
    pairs = [({"task": "echo"}, "sleep 0.3")] * 6
    verdicts, stats = score_batch(pairs, envs={"echo": EchoEnv()}, timeout_s=0.6, max_workers=2)
    assert stats.timeouts == 0 and stats.ok == 6 and stats.seconds >= 0.85


def test_dispatcher_runs_async_environments_and_cancels_them():
    pairs = [({"task": "async_echo"}, "x"), ({"task": "async_echo"}, "sleep 10"), ({"task": "echo"}, "1")]
    verdicts, stats = score_batch(pairs, envs={"async_echo": AsyncEnv(), "echo": EchoEnv()}, timeout_s=0.3)
    assert [v.reward for v in verdicts] == [2.0, 0.0, 1.0]
    assert verdicts[0].info == {"async": True} and (stats.ok, stats.timeouts) == (2, 1)


def test_dispatcher_math_env_on_threads():
    pairs = [({"task": "math", "answer": "0.5"}, r"\boxed{\frac{1}{2}}"),
             ({"task": "math", "answer": "3"}, r"\boxed{4}")]
    verdicts, stats = score_batch(pairs, timeout_s=20)
    assert [v.reward for v in verdicts] == [1.0, 0.0] and stats.ok == 2


@pytest.mark.slow
def test_dispatcher_process_backend_kills_hung_workers():
    pairs = [({"task": "echo"}, "0.25"), ({"task": "echo"}, "sleep 30"), ({"task": "echo"}, "raise"),
             ({"task": "math", "answer": "0.5"}, r"\boxed{\frac{1}{2}}")]
    t0 = time.perf_counter()
    verdicts, stats = score_batch(pairs, envs={"echo": EchoEnv()}, timeout_s=3, max_workers=2, backend="process")
    assert [v.reward for v in verdicts] == [0.25, 0.0, 0.0, 1.0]
    assert (stats.ok, stats.timeouts, stats.errors) == (2, 1, 1)
    assert time.perf_counter() - t0 < 20  # the sleeping worker was terminated, not joined
    assert not multiprocessing.active_children()  # and no worker outlives the batch


@pytest.mark.slow
def test_dispatcher_process_backend_unpicklable_env_scores_errors():
    verdicts, stats = score_batch([({"task": "u"}, "1")] * 3, envs={"u": UnpicklableEnv()}, timeout_s=5,
                                  max_workers=1, backend="process")
    assert [v.reward for v in verdicts] == [0.0] * 3 and stats.errors == 3
    assert "did not start" in stats.first_errors[0] and not multiprocessing.active_children()


def test_prepare_runs_before_the_timeout_clock():
    verdicts, stats = score_batch([({"task": "p"}, "x")] * 2, envs={"p": SlowPrepareEnv()}, timeout_s=0.5)
    assert [v.reward for v in verdicts] == [1.0, 1.0] and stats.timeouts == 0
