"""The environment interface and a batched dispatcher that never raises on an environment's failure.

    @register_environment("math")
    class MathEnv(Environment):
        def verify(self, sample, completion) -> Verdict: ...

    verdicts, stats = score_batch([(sample, completion), ...], timeout_s=10, max_workers=8)
    stats.timeouts, stats.errors            # calls that scored 0 because they hung or raised

``sample`` is the prompt record as a mapping (``data_pipelines.rl_prompts.RLPrompt.as_sample()``: ``task``,
``answer``, ``metadata``, ``prompt`` or ``messages``); ``completion`` the decoded generated text. Its
``task`` picks the environment from :data:`ENVIRONMENTS` (the NeMo Gym resource-server contract: ``verify(prompt, response,
metadata) → reward + components``; a failure or a timeout scores 0).

**Concurrency.** Each call has its own ``timeout_s``, counted from when it starts (at most
``max_workers`` run at once). An environment that defines ``async def averify`` runs on the dispatcher's
event loop and is cancelled at its timeout (the form for HTTP verifiers such as NeMo Gym's
``POST /verify``). A plain ``verify`` runs on a backend from :data:`BACKENDS`:

- ``thread`` (default): one daemon thread per call. A call past its timeout scores 0 and is abandoned —
  Python cannot kill a thread, so it keeps its CPU until it returns; verifiers should bound their own work.
- ``process``: a pool of ``max_workers`` spawned processes for the batch (the environment is pickled to
  them; their start-up and ``prepare`` happen before the first call's clock, and workers that cannot
  start within 120 s make every call an error instead of a hang). A worker past its timeout is killed
  with the pool at the end of the batch, so a hung verifier costs nothing afterwards; while the batch
  runs, that worker's slot is lost.

**Multi-turn** (the driver is ``tandem.trainer.rl.multiturn``). A multi-turn environment (tool calls →
observations → more generation) implements :meth:`Environment.step`: given the conversation so far (and the
episode's sample) it returns the next
:class:`Observation` (e.g. a tool result to append as a ``tool`` message before generating again) or
``None`` when the episode is over, and :meth:`Environment.verify` then scores the whole transcript. The
rollout driver calls ``step`` after every generated turn; single-turn environments inherit the default,
which ends the episode at once.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import math
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

__all__ = [
    "Verdict", "Observation", "Environment", "ENVIRONMENTS", "register_environment", "get_environment",
    "check_tasks", "DispatchStats", "BACKENDS", "register_backend", "score_batch", "ascore_batch",
]

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    reward: float
    components: dict[str, float] = field(default_factory=dict)  # named partial scores (logged, not summed)
    info: dict = field(default_factory=dict)  # free-form: extracted answer, error message, ...


@dataclass
class Observation:
    """What the environment answers to a turn of a multi-turn episode (see the module doc)."""

    content: str | list[dict]  # text, or chat messages to append (e.g. a ``tool`` message)
    info: dict = field(default_factory=dict)


def _defined(cls) -> set[str]:
    """Attribute names defined by ``cls`` or its bases below :class:`Environment`."""
    return {name for klass in cls.__mro__ if klass is not Environment and klass is not object
            for name in vars(klass)}


class Environment(abc.ABC):
    """A task's verifier. Subclasses implement :meth:`verify` and/or ``async def averify`` (the dispatcher
    prefers ``averify`` when a subclass defines it); instances must be picklable for the process backend."""

    name: str = "environment"
    #: names of :attr:`Verdict.components` the GRPO stage averages over its held-out rollouts and records as
    #: ``grpo/val/<task>/<name>`` (a verdict without one is left out of that mean)
    components: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        # refuse at class definition an environment that could never score (it would only count errors)
        super().__init_subclass__(**kwargs)
        if "verify" not in _defined(cls) and "averify" not in _defined(cls):
            raise TypeError(f"environment {cls.__name__} must define verify(sample, completion) or async averify")

    def verify(self, sample: Mapping[str, Any], completion: str) -> Verdict:
        raise NotImplementedError(f"{type(self).__name__} defines neither verify nor averify")

    # ``async def averify(self, sample, completion) -> Verdict`` is optional and deliberately not declared
    # here: the dispatcher checks whether a subclass defines it.

    def prepare(self) -> None:
        """Load heavy dependencies (a parser, a reward model) once per process; the dispatcher calls it
        before the first call's clock starts, in every worker of the process backend."""

    def step(self, history: Sequence[Mapping[str, Any]], sample: Mapping[str, Any] | None = None) -> Observation | None:
        """Multi-turn hook: the next observation after the last generated turn, or None to end the episode.
        ``sample`` is the episode's prompt record (its initial state, e.g. ``metadata``)."""
        return None


#: task name → Environment subclass (instantiated with no arguments by :func:`get_environment`)
ENVIRONMENTS: dict[str, type[Environment]] = {}


def register_environment(name: str):
    def deco(cls):
        if name in ENVIRONMENTS:
            raise ValueError(f"environment {name!r} is registered twice")
        cls.name = name
        ENVIRONMENTS[name] = cls
        return cls

    return deco


def get_environment(name: str, **kwargs) -> Environment:
    check_tasks([name])
    return ENVIRONMENTS[name](**kwargs)


def check_tasks(tasks: Iterable[str]) -> None:
    """ValueError naming every task without a registered environment (call it when the data is loaded)."""
    unknown = sorted(set(tasks) - set(ENVIRONMENTS))
    if unknown:
        raise ValueError(f"no environment registered for task(s) {unknown}; registered: {sorted(ENVIRONMENTS)}")


@dataclass
class DispatchStats:
    calls: int = 0
    ok: int = 0
    timeouts: int = 0
    errors: int = 0  # raised, returned something that is not a Verdict with a finite reward, or unknown task
    seconds: float = 0.0  # wall time of the batch
    first_errors: list[str] = field(default_factory=list)  # the first few messages, for the log

    def as_metrics(self) -> dict[str, float]:
        n = max(self.calls, 1)
        return {"env_timeout_frac": self.timeouts / n, "env_error_frac": self.errors / n, "env_seconds": self.seconds}


_KEEP_ERRORS = 5


# --- backends: run a blocking ``fn(*args)`` and give the event loop an awaitable ---------------------------

class Backend(abc.ABC):
    def __init__(self, max_workers: int):
        self.max_workers = max_workers

    async def start(self, envs: Sequence[Environment]) -> None:
        """Get ready before the first call, ``prepare`` included (start-up counts against no call's timeout)."""
        await asyncio.get_running_loop().run_in_executor(None, _prepare, list(envs))

    @abc.abstractmethod
    def submit(self, loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> Awaitable: ...

    def close(self, timed_out: bool) -> None:
        pass


#: name → Backend subclass
BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str):
    def deco(cls):
        BACKENDS[name] = cls
        return cls

    return deco


def _settle(loop, fut, ok: bool, value) -> None:
    """Resolve ``fut`` from another thread (nothing to do if the call already timed out)."""

    def apply():
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    try:
        loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the loop is closed: the batch ended while this abandoned call still ran
        pass


@register_backend("thread")
class ThreadBackend(Backend):
    def submit(self, loop, fn, *args):
        fut = loop.create_future()

        def run():
            try:
                value, ok = fn(*args), True
            except BaseException as e:  # noqa: BLE001 — reported as this call's error, never raised
                value, ok = e, False
            _settle(loop, fut, ok, value)

        threading.Thread(target=run, daemon=True, name="tandem-env-verify").start()
        return fut


def _prepare(envs: list[Environment], linger: float = 0.0) -> None:
    for env in envs:
        try:
            env.prepare()
        except Exception:  # noqa: BLE001 — its calls will fail too, and be counted there
            log.warning("environment %s: prepare() failed", env.name, exc_info=True)
    time.sleep(linger)


@register_backend("process")
class ProcessBackend(Backend):
    #: how long the workers may take to start and prepare before the backend counts as broken
    START_TIMEOUT_S = 120.0

    def __init__(self, max_workers: int):
        super().__init__(max_workers)
        # spawn, not fork: the trainer process holds CUDA and many threads, which fork does not survive
        self.pool = multiprocessing.get_context("spawn").Pool(max_workers)
        self.broken: str | None = None

    async def start(self, envs: Sequence[Environment]) -> None:
        # A spawned worker imports the environments' modules (unpickling them) and prepares them
        # (seconds); wait until every worker answered, so that the first calls' timeouts measure
        # verification and not start-up. Each ready task lingers a moment so one fast worker does not
        # take them all. Workers that cannot start (an unpicklable environment, a main module without
        # the ``if __name__ == "__main__"`` guard, which spawn re-runs) must not hang the batch: after
        # START_TIMEOUT_S every call scores 0 as an error.
        ready = [self.pool.apply_async(_prepare, (list(envs), 0.05)) for _ in range(self.max_workers)]

        def wait():
            deadline = time.monotonic() + self.START_TIMEOUT_S
            for r in ready:
                r.get(timeout=max(deadline - time.monotonic(), 0.01))

        try:
            await asyncio.get_running_loop().run_in_executor(None, wait)
        except Exception as e:  # noqa: BLE001 — reported on every call of the batch
            self.broken = f"process workers did not start: {type(e).__name__}: {e}"
            log.warning("%s", self.broken)

    def submit(self, loop, fn, *args):
        fut = loop.create_future()
        if self.broken:
            fut.set_exception(RuntimeError(self.broken))
            return fut
        self.pool.apply_async(fn, args, callback=lambda v: _settle(loop, fut, True, v),
                              error_callback=lambda e: _settle(loop, fut, False, e))
        return fut

    def close(self, timed_out: bool) -> None:
        if timed_out or self.broken:
            self.pool.terminate()  # kills workers still stuck in a verifier (or failing to start)
        else:
            self.pool.close()
        self.pool.join()


# --- the dispatcher --------------------------------------------------------------------------------------

def _defines_averify(env: Environment) -> bool:
    return inspect.iscoroutinefunction(getattr(type(env), "averify", None))


def _call_verify(env: Environment, sample, completion) -> Verdict:
    return env.verify(sample, completion)


def _check(verdict) -> Verdict:
    if not isinstance(verdict, Verdict):
        raise TypeError(f"verify returned {type(verdict).__name__}, not a Verdict")
    reward = float(verdict.reward)
    if not math.isfinite(reward):
        raise ValueError(f"verify returned a non-finite reward {verdict.reward!r}")
    verdict.reward = reward
    return verdict


async def ascore_batch(pairs: Sequence[tuple[Mapping[str, Any], str]], *,
                       envs: Mapping[str, Environment] | None = None, timeout_s: float = 10.0,
                       max_workers: int = 8, backend: str = "thread") -> tuple[list[Verdict], DispatchStats]:
    """Score ``(sample, completion)`` pairs: one Verdict per pair, in order, and the batch's stats.

    ``envs`` maps task name → environment instance (default: one instance of each registered class a task
    needs). A call that times out, raises, returns a bad value or names an unknown task scores
    ``Verdict(0.0, info={"error": ...})`` and is counted; nothing is raised for it.
    """
    if timeout_s <= 0 or max_workers < 1:
        raise ValueError(f"need timeout_s > 0 and max_workers >= 1, got {timeout_s}, {max_workers}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown dispatcher backend {backend!r}; registered: {sorted(BACKENDS)}")
    envs = dict(envs or {})
    for sample, _ in pairs:
        task = sample.get("task")
        if task not in envs and task in ENVIRONMENTS:
            envs[task] = ENVIRONMENTS[task]()
    loop = asyncio.get_running_loop()
    stats = DispatchStats(calls=len(pairs))
    sem = asyncio.Semaphore(max_workers)
    needs_pool = any(not _defines_averify(envs[s.get("task")]) for s, _ in pairs if s.get("task") in envs)
    runner = BACKENDS[backend](max_workers) if needs_pool else None
    t0 = time.perf_counter()

    def fail(kind: str, message: str) -> Verdict:
        if kind == "timeout":
            stats.timeouts += 1
        else:
            stats.errors += 1
        if len(stats.first_errors) < _KEEP_ERRORS:
            stats.first_errors.append(message)
        return Verdict(0.0, info={"error": kind, "message": message})

    async def one(i: int, sample, completion) -> Verdict:
        env = envs.get(sample.get("task"))
        if env is None:
            return fail("error", f"pair {i}: no environment for task {sample.get('task')!r}")
        async with sem:  # the timeout starts when the call does, not when it is queued
            try:
                if _defines_averify(env):
                    call = env.averify(sample, completion)
                else:
                    call = runner.submit(loop, _call_verify, env, sample, completion)
                verdict = _check(await asyncio.wait_for(call, timeout_s))
            except asyncio.TimeoutError:
                return fail("timeout", f"pair {i} ({env.name}): no verdict within {timeout_s}s")
            except Exception as e:  # noqa: BLE001 — an environment's failure scores 0, it does not stop training
                return fail("error", f"pair {i} ({env.name}): {type(e).__name__}: {e}")
        stats.ok += 1
        return verdict

    try:
        if runner is not None:
            await runner.start([e for e in envs.values() if not _defines_averify(e)])
        if any(_defines_averify(e) for e in envs.values()):
            await loop.run_in_executor(None, _prepare, [e for e in envs.values() if _defines_averify(e)])
        verdicts = await asyncio.gather(*(one(i, s, c) for i, (s, c) in enumerate(pairs)))
    finally:
        if runner is not None:
            runner.close(timed_out=stats.timeouts > 0)
    stats.seconds = time.perf_counter() - t0
    return list(verdicts), stats


def score_batch(pairs: Sequence[tuple[Mapping[str, Any], str]], **kwargs) -> tuple[list[Verdict], DispatchStats]:
    """Blocking :func:`ascore_batch` (from code without a running event loop, e.g. the training loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(ascore_batch(pairs, **kwargs))
    raise RuntimeError("score_batch called inside a running event loop; await ascore_batch(...) instead")
