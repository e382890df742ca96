"""Stages plug into the shared loop by providing batches and a loss (see :class:`trainer.stages.base.Stage`)."""

from .base import LossOutput, Stage, token_cross_entropy
from .pretrain import PretrainStage

STAGES = {"pretrain": PretrainStage}

__all__ = ["STAGES", "LossOutput", "PretrainStage", "Stage", "token_cross_entropy"]
