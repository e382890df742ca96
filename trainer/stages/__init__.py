"""Stages plug into the shared loop by providing batches and a loss (see :class:`tandem.trainer.stages.base.Stage`)."""

from .base import LossOutput, Stage, token_cross_entropy
from .cpt import CPTStage
from .grpo import GRPOStage
from .pretrain import PretrainStage
from .rlhf import RLHFStage
from .sft import SFTStage

STAGES = {"pretrain": PretrainStage, "cpt": CPTStage, "sft": SFTStage, "grpo": GRPOStage, "rlhf": RLHFStage}

__all__ = ["STAGES", "CPTStage", "GRPOStage", "LossOutput", "PretrainStage", "RLHFStage", "SFTStage", "Stage", "token_cross_entropy"]
