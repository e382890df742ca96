"""tandem's trainer: the ``tandem`` CLI (Hydra, recipes under ``recipes/``), the one training loop every
stage runs (:mod:`trainer.loop`), stages (:mod:`trainer.stages`), data-parallel engine, run checkpoints and
metrics sinks. See docs/RECIPES.md.
"""
