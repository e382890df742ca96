"""tandem's data pipelines: tokenizers, indexed pretraining data, blends and phases, packing,
long-context synthetic data, chat templates and SFT datasets, RL prompt datasets."""
