"""tandem's trainer: the ``tandem`` CLI (:mod:`.cli`, Hydra recipes from :mod:`tandem.recipes`), the one
training loop every stage runs (:mod:`.loop`), its typed config (:mod:`.config`), optimizer and schedules
(:mod:`.optim`) and metrics sinks (:mod:`.metrics`) at the top; by responsibility below:

- :mod:`.stages`: what a stage feeds the loop (batches) and the loss it applies (pretrain, sft);
- :mod:`.parallel`: topology, data-parallel engines (plain, DeepSpeed ZeRO), expert parallelism;
- :mod:`.checkpoint`: run checkpoints and exact resume;
- :mod:`.inference`: the generation engine, ``tandem generate``, chat evaluation.

See docs/ARCHITECTURE.md for the layers and docs/RECIPES.md for running.
"""
