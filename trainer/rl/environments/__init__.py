"""Reward environments: the interface and batched dispatcher (:mod:`.base`) and the built-in tasks
(:mod:`.math`, :mod:`.code` with its sandbox :mod:`.sandbox`, :mod:`.instructions`, :mod:`.structured`,
:mod:`.tools`, :mod:`.genrm` (the GenRM judge's verifiable reward), and :mod:`.gym`: a NeMo Gym resources
server as an environment; :mod:`.gym_server` serves environments the other way). Importing this package
registers the built-in environments in :data:`ENVIRONMENTS`."""

from .base import (
    ENVIRONMENTS, DispatchStats, Environment, Observation, Verdict, ascore_batch, check_tasks, get_environment,
    register_environment, score_batch,
)
from . import code, genrm, gym, instructions, math, structured, tools  # noqa: F401  (registers the built-in tasks)

__all__ = [
    "ENVIRONMENTS", "DispatchStats", "Environment", "Observation", "Verdict", "ascore_batch", "check_tasks",
    "get_environment", "register_environment", "score_batch",
]
