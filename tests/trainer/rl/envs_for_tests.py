"""Environments for the dispatcher tests, in an importable module so the process backend can unpickle
them (they are passed to the dispatcher through ``envs=``, never registered globally)."""

import asyncio
import time

from tandem.trainer.rl.environments.base import Environment, Verdict


class EchoEnv(Environment):
    """Reward = float(completion); ``"sleep <s>"`` sleeps, ``"raise"`` raises, ``"bad"`` returns no Verdict."""

    name = "echo"

    def verify(self, sample, completion):
        if completion.startswith("sleep"):
            time.sleep(float(completion.split()[1]))
            return Verdict(1.0)
        if completion == "raise":
            raise RuntimeError("verifier crashed")
        if completion == "bad":
            return None
        if completion == "nan":
            return Verdict(float("nan"))
        return Verdict(float(completion), {"len": float(len(completion))})


class AsyncEnv(Environment):
    name = "async_echo"

    async def averify(self, sample, completion):
        if completion.startswith("sleep"):
            await asyncio.sleep(float(completion.split()[1]))
        return Verdict(2.0, info={"async": True})


class SlowPrepareEnv(Environment):
    """Takes 1 s to prepare (like importing a parser), then verifies instantly."""

    name = "slow_prepare"

    def prepare(self):
        time.sleep(1.0)
        self.ready = True

    def verify(self, sample, completion):
        return Verdict(1.0 if getattr(self, "ready", False) else 0.5)


class UnpicklableEnv(EchoEnv):
    """Holds a lambda: cannot be sent to a process worker."""

    def __init__(self):
        self.fn = lambda x: x
