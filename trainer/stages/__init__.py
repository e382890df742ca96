"""Stages plug into the shared loop by providing batches and a loss (see :class:`tandem.trainer.stages.base.Stage`)."""

from .base import LossOutput, Stage, token_cross_entropy
from .grpo import GRPOStage
from .pretrain import PretrainStage
from .sft import SFTStage

STAGES = {"pretrain": PretrainStage, "sft": SFTStage, "grpo": GRPOStage}

__all__ = ["STAGES", "GRPOStage", "LossOutput", "PretrainStage", "SFTStage", "Stage", "token_cross_entropy"]
