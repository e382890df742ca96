"""The stage interface of the shared loop.

A stage supplies, for every optimizer step, this rank's micro-batches, and a loss that returns a *sum*
over target tokens plus the number of target tokens. The loop normalises by the global token count of
the whole step (all micro-batches, all ranks), so the gradient does not depend on how the global batch
is split. SFT, GRPO and RLHF are further stages: GRPO's ``batches_for_step`` generates rollouts between
optimizer steps and its ``loss`` applies the clipped policy objective to per-token advantages.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..data import DataError


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar, Σ over target tokens (differentiable)
    num_tokens: torch.Tensor | int  # target tokens in this micro-batch
    metrics: dict[str, float] = field(default_factory=dict)  # extra sums, reduced like loss_sum


def loss_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each token's weight in the loss: ``loss_mask`` times ``loss_weight`` where the batch has one (CPT's
    completion-only task documents), else ``loss_mask``."""
    w = batch["loss_mask"]
    return w * batch["loss_weight"] if "loss_weight" in batch else w


def token_cross_entropy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Σ next-token cross-entropy weighted by :func:`loss_weights` (fp32), plus the MoE auxiliary losses.

    The model computes the per-token cross-entropy in its forward (``labels=``), in chunks of tokens, so
    the [B, T, V] logits never exist; a negative label counts 0, like ``F.cross_entropy``'s ignore index.
    The aux losses are per-micro-batch means; they enter the sum weighted by the micro-batch's target
    tokens, so after the loop's global normalisation they are a token-weighted mean like the CE. Under
    context parallelism each rank's aux loss is its share of the micro-batch's and the weight is the whole
    micro-batch's target tokens (``aux_weight_tokens``, set when the batch was split), so the shares add up
    to the one-rank term.
    """
    per_token = model(batch["input_ids"], seq_idx=batch.get("seq_idx"), labels=batch["labels"]).flatten()
    mask = loss_weights(batch).flatten().to(per_token.dtype)
    loss_sum, num_tokens = (per_token * mask).sum(), mask.sum()
    aux = getattr(getattr(model, "module", model), "aux_loss", lambda: None)()
    if aux is not None:
        loss_sum = loss_sum + aux * batch.get("aux_weight_tokens", num_tokens)
    return LossOutput(loss_sum=loss_sum, num_tokens=num_tokens)


def split_step(batch: dict[str, torch.Tensor], micro_batch: int) -> list[dict[str, torch.Tensor]]:
    """A rank's whole-step batch (one loader item) as its micro-batches of ``micro_batch`` rows."""
    return [dict(zip(batch, parts)) for parts in zip(*(v.split(micro_batch) for v in batch.values()))]


def wait_metrics(wait_s: float, step_start: float) -> dict[str, float]:
    """The time a step waited for its rows (from ``step_start``, a ``time.perf_counter()``, to now): seconds
    and share of the step — near 0 while loading hides behind compute."""
    elapsed = time.perf_counter() - step_start
    return {"data/wait_s": wait_s, "data/wait_fraction": wait_s / max(elapsed, 1e-9)}


def check_batch_split(stage, world_size: int) -> None:
    """``stage.global_batch`` must split evenly into ranks × micro-batches (raises the trainer's DataError)."""
    if stage.global_batch % (world_size * stage.micro_batch):
        raise DataError(
            f"stage.global_batch ({stage.global_batch}) must be a multiple of data-parallel size ({world_size}) "
            f"× stage.micro_batch ({stage.micro_batch})"
        )


class Stage(abc.ABC):
    """What a stage provides to :class:`tandem.trainer.loop.Trainer`.

    Life cycle: ``Stage(data, stage, rank, world_size)`` (data loaded and checked, before the model is
    built) → ``bind(model, info)`` once the model has its final weights (after resume / ``init_from``),
    before the first step → per step ``batches_for_step`` → ``loss`` per micro-batch → ``after_step``.
    """

    name: str = "stage"
    #: ``LossOutput.metrics`` names the loop reduces with max over micro-batches and ranks (others: token sums)
    max_metrics: frozenset = frozenset()
    #: the record keys the end-of-run line reports, first recorded value → last (``tandem`` prints it)
    headline: tuple[str, ...] = ("loss", "val_loss")

    def bind(self, model: torch.nn.Module, info, precision: str = "auto") -> None:
        """Called by ``run`` once with the built model (final weights), its ``DistInfo`` and
        ``precision.name`` (for forwards the stage runs itself, under ``trainer.autocast``). Stages that run
        the model themselves (GRPO generates rollouts with it) keep it here; the default ignores it."""

    def after_step(self, step: int, finite: bool) -> dict:
        """Called on every rank after optimizer step ``step``; returns namespaced metrics (``"grpo/..."``)
        merged into the step's record. Runs every step, so it may use collectives (all ranks call it)."""
        return {}

    def evaluate(self, model: torch.nn.Module) -> dict | None:
        """A stage's own evaluation, run when the loop evaluates (``stage.eval_every``, and at the end);
        returns metrics for the record. None (default): the loop's loss over :meth:`eval_batches`."""
        return None

    @abc.abstractmethod
    def batches_for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step ``step`` (0-based). Called once per step, in order."""

    def check_model(self, config) -> None:
        """Refuse (DataError) a model config this stage's data cannot feed, e.g. a too-small vocabulary."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        return token_cross_entropy(model, batch)

    def target_tokens(self, batch: dict[str, torch.Tensor]) -> float:
        """Target tokens in ``batch`` (the count logged) — known before the forward."""
        return float(batch["loss_mask"].sum())

    def eval_batches(self) -> Iterable[dict[str, torch.Tensor]]:
        return ()

    def step_info(self, step: int) -> dict:
        """Extra fields for this step's metrics record (e.g. the data phase)."""
        return {}

    def input_tokens(self, batch: dict[str, torch.Tensor]) -> float:
        """Real input tokens in ``batch``: padding (``valid`` false) is not counted (throughput, MFU)."""
        if "valid" in batch:
            return float(batch["valid"].sum())
        return float(batch["input_ids"].numel())

    def schedule(self) -> dict:
        """The stage's part of the run's schedule (``{config key: value}``, JSON-serialisable): what its
        data order depends on. Stored in checkpoints by the loop and compared on resume: a difference is
        refused (``Trainer.restore``). Default: nothing beyond the loop's steps, batch and LR curve."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state(self) -> dict | None:
        """Per-rank state (tensors allowed) the checkpoint keeps in ``stage/rank_NNNNN.pt``, e.g. GRPO's rollout
        batch in flight; None (default): nothing to keep."""
        return None

    def load_rank_state(self, state: dict | None, source=None) -> None:
        """Restore :meth:`rank_state` (None when the checkpoint holds none for this rank)."""
