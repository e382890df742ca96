"""Stages plug into the shared loop by providing batches and a loss (see :class:`tandem.trainer.stages.base.Stage`)."""

from .base import LossOutput, Stage, token_cross_entropy
from .pretrain import PretrainStage
from .sft import SFTStage

STAGES = {"pretrain": PretrainStage, "sft": SFTStage}

__all__ = ["STAGES", "LossOutput", "PretrainStage", "SFTStage", "Stage", "token_cross_entropy"]
