"""tandem's trainer: CLI, the shared training loop, parallel topology, checkpoint/resume and the stages.

Until the trainer lands, :mod:`trainer.demo` (``make smoke``) trains the tiny model for a few steps.
"""
