"""Inference on the hybrid cache: the batched :class:`GenerationEngine` (sampling, logprobs, stop tokens,
thinking budget), ``tandem generate`` (:mod:`.cli`) and the reasoning-mode chat evaluation
(:mod:`.chat_eval`). RL rollouts generate through the same engine.
"""

from .engine import GenerationEngine, SamplingParams, ThinkTokens

__all__ = ["GenerationEngine", "SamplingParams", "ThinkTokens"]
