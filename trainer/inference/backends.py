"""Rollout back-ends: what an RL stage generates its rollouts with, behind one small interface.

    >>> backend = build_backend("engine", model, max_batch=8, max_len=4096, grpo=cfg.stage.grpo, seed=0)
    >>> backend.refit(model)  # before each rollout batch: the back-end generates from these weights
    >>> results = backend.generate(prompt_id_lists, params, think_ids=None)
    >>> backend.offload()  # generation over until the next refit: free what the back-end holds on the device

Registered back-ends (``stage.grpo.rollout_backend``):

- ``engine`` (default): the in-process :class:`~tandem.trainer.inference.engine.GenerationEngine` on the
  training model itself (CPU and GPU; the reference semantics of docs/GENERATION.md). It reads the live
  parameters, so ``refit`` and ``offload`` do nothing.
- ``vllm``: a colocated vLLM engine on the same GPU, refitted from the training model before each rollout
  batch (:mod:`.vllm_backend`; GPU only, an optional extra ``pip install 'tandem[vllm]'``, imported lazily).

A back-end registers a builder with :func:`register_backend`, like the data-parallel engines
(``trainer/parallel/engines.py``) and the RL environments do; ``check`` is its start-time test of the
machine (importable, device present), run before the run directory is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from .engine import GenerationEngine, GenerationResult, SamplingParams, ThinkTokens

__all__ = ["DEFAULT_BACKEND", "ROLLOUT_BACKENDS", "ROLLOUT_ENGINES", "BackendSpec", "EngineBackend", "RolloutBackend",
           "build_backend", "check_backend", "engine_for", "register_backend"]


class RolloutBackend(Protocol):
    """What an RL stage calls to generate rollouts."""

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 think_ids: ThinkTokens | None = None) -> list[GenerationResult]:
        """One :class:`GenerationResult` per prompt, in order, with the fields and semantics of the engine's."""

    def refit(self, model: nn.Module) -> None:
        """Generate from ``model``'s current weights from now on (called after each optimizer step, before a
        rollout batch or an evaluation)."""

    def offload(self) -> None:
        """Generation is over until the next :meth:`refit`: release device memory for training."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    build: Callable  # (model, *, max_batch, max_len, grpo, seed) -> RolloutBackend
    check: Callable | None = None  # (grpo, world_size) -> None; raises ValueError when this machine cannot run it


#: registered back-ends by name; :data:`DEFAULT_BACKEND` is ``stage.grpo.rollout_backend``'s default
ROLLOUT_BACKENDS: dict[str, BackendSpec] = {}
DEFAULT_BACKEND = "engine"


def register_backend(name: str, *, check: Callable | None = None):
    """Decorator: register ``build(model, *, max_batch, max_len, grpo, seed)`` under ``name``; ``check(grpo,
    world_size)`` (optional) refuses a machine or layout the back-end cannot run on."""

    def deco(build):
        if name in ROLLOUT_BACKENDS:
            raise ValueError(f"rollout back-end {name!r} is already registered")
        ROLLOUT_BACKENDS[name] = BackendSpec(name, build, check)
        return build

    return deco


def check_backend(name: str, grpo: Any, world_size: int) -> None:
    """The back-end's start-time checks of this machine: ValueError naming ``stage.grpo.rollout_backend`` (the
    stage raises it as a ConfigError; this module does not import the config, which imports it)."""
    spec = ROLLOUT_BACKENDS[name]
    if spec.check is not None:
        spec.check(grpo, world_size)


def build_backend(name: str, model: nn.Module, *, max_batch: int, max_len: int, grpo: Any = None,
                  seed: int = 0) -> RolloutBackend:
    """The back-end ``name`` generating from ``model``: ``max_batch`` rows at once (the engine's waves),
    ``max_len`` prompt + completion tokens at most (vLLM's ``max_model_len``), ``grpo`` the stage.grpo
    section (back-end options such as ``vllm_gpu_memory_utilization``)."""
    return ROLLOUT_BACKENDS[name].build(model, max_batch=max_batch, max_len=max_len, grpo=grpo, seed=seed)


class EngineBackend:
    """The in-process :class:`GenerationEngine` as a rollout back-end. ``model`` is what the engine runs: the
    training model, or under several ranks the stage's lock-step wrapper of it."""

    def __init__(self, model: nn.Module, max_batch: int, mode: str = "eager"):
        self.engine = engine_for(model, max_batch, mode)

    def generate(self, prompts, params, think_ids=None):
        return self.engine.generate(prompts, params, think_ids=think_ids)

    def refit(self, model) -> None:
        """Nothing to copy: the engine runs the training parameters themselves."""

    def offload(self) -> None:
        """Nothing held between generations (each wave allocates and drops its own cache)."""


#: ``stage.grpo.rollout_engine`` choices: how the in-process engine decodes
ROLLOUT_ENGINES = ("eager", "static", "compiled")


def engine_for(model: nn.Module, max_batch: int, mode: str = "eager") -> GenerationEngine:
    """The in-process engine decoding as ``stage.grpo.rollout_engine`` says: ``eager``, ``static`` (fixed
    shapes, bookkeeping on the device) or ``compiled`` (static + ``torch.compile`` of the step)."""
    if mode not in ROLLOUT_ENGINES:
        raise ValueError(f"stage.grpo.rollout_engine must be one of {list(ROLLOUT_ENGINES)}, got {mode!r}")
    return GenerationEngine(model, max_batch=max_batch, static=mode != "eager", compile=mode == "compiled")


def _check_engine(grpo, world_size):
    if grpo is not None and getattr(grpo, "rollout_engine", "eager") == "compiled" and world_size > 1:
        raise ValueError(f"stage.grpo.rollout_engine=compiled runs on one process (here {world_size} data-parallel "
                         f"ranks): under expert parallelism the MoE all-to-all sizes its exchange on the host (a "
                         f"graph break) and FSDP2 swaps the weights it gathers; use rollout_engine=static")


@register_backend("engine", check=_check_engine)
def _build_engine(model, *, max_batch, max_len, grpo=None, seed=0):
    return EngineBackend(model, max_batch, getattr(grpo, "rollout_engine", "eager") if grpo is not None else "eager")


def _check_vllm(grpo, world_size):
    from .vllm_backend import check_available

    check_available(grpo, world_size)


@register_backend("vllm", check=_check_vllm)
def _build_vllm(model, *, max_batch, max_len, grpo=None, seed=0):
    from .vllm_backend import VLLMBackend

    return VLLMBackend(model, max_len=max_len, seed=seed,
                       gpu_memory_utilization=grpo.vllm_gpu_memory_utilization if grpo is not None else 0.5,
                       temperature=grpo.temperature if grpo is not None else 1.0,
                       top_p=grpo.top_p if grpo is not None else 1.0)
