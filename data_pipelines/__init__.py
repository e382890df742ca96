"""tandem's data pipelines: tokenizers, indexed pretraining data, blends and phases, packing,
long-context synthetic data, chat templates and SFT datasets, RL prompt datasets.

Modules (imported on demand: ``blends``/``preprocess`` pull in megatron-core, which takes seconds):
``tokenizer`` (load_tokenizer), ``readers`` (iter_records), ``preprocess`` (tandem-preprocess),
``blends`` (build_pretrain_datasets), ``packing`` (build_dataloader, Collator, pack_documents),
``long_context`` (long/short mixture, synthetic tasks, evaluate_needle), ``smoke_data``, ``chat`` (chat
template renderer), ``sft`` (SFTPackedDataset), ``sft_synthetic``. See docs/DATA.md and docs/SFT.md.
"""
