"""Indexed datasets behind the trainer's ``TokenSource`` protocol (``trainer/data.py``).

The trainer's blend schedule asks each source for fixed windows by index::

    source.name                          # "indexed:<prefix>"
    source.num_samples(split)            # samples in one epoch of that split
    source.sample(split, index, seq_len) # [seq_len + 1] int64: tokens of one window (inputs + last label)

``IndexedTokenSource`` serves them from a ``tandem-preprocess`` output through megatron's ``GPTDataset``
(its document split, seed-shuffled order and index cache), one epoch per (split, seq_len), built by
:meth:`IndexedTokenSource.prepare` — collectively, at the trainer's start, for every source on every rank. Index ``i`` past the epoch wraps to ``i mod epoch``: the same shuffled order repeats, which
keeps every index's window fixed however far a run goes (megatron re-shuffles across epochs only when it
knows the total up front — ``blends.build_pretrain_datasets`` is that path). Documents end in EOD (2
with the shipped tokenizer, the trainer's ``EOD`` too), so the trainer's ``seq_idx`` recovery holds.

The trainer wires it with one branch in its ``build_source``::

    if kind == "indexed":
        return IndexedTokenSource.from_spec(spec, seed, valid_fraction, key)
"""

from __future__ import annotations

import os
from typing import Any

import torch


class IndexedTokenSource:
    def __init__(self, prefix: str, *, seed: int = 1234, valid_fraction: float = 0.01, tokenizer: Any = None,
                 cache_dir: str | None = None):
        from tandem.data_pipelines.blends import check_prefix

        if not 0 <= valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        check_prefix(prefix)
        if tokenizer is None:
            from tandem.data_pipelines.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.prefix, self.seed, self.valid_fraction = prefix, seed, valid_fraction
        self.tokenizer, self.cache_dir = tokenizer, cache_dir
        self._datasets: dict[tuple[str, int], Any] = {}

    @classmethod
    def from_spec(cls, spec: str, seed: int, valid_fraction: float, key: str = "source", **kwargs) -> "IndexedTokenSource":
        """``indexed:<prefix>`` → a source; errors name ``key`` (the config path of the spec)."""
        kind, _, prefix = spec.partition(":")
        if kind != "indexed" or not prefix:
            raise ValueError(f"{key}: expected 'indexed:<prefix of .bin/.idx>', got {spec!r}")
        try:
            return cls(os.path.expanduser(prefix), seed=seed, valid_fraction=valid_fraction, **kwargs)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{key}: {e}") from None

    @property
    def name(self) -> str:
        return f"indexed:{self.prefix}"

    def prepare(self, seq_len: int) -> None:
        """Build both splits at ``seq_len`` now. **Collective** under torch.distributed: megatron builds the
        index cache on rank 0 and the other ranks wait at a barrier, so every rank must call this for the
        same sources in the same order — the trainer does it for every source of every phase at start.
        Built lazily instead (on a rank's first sample), a rank that reaches a rare source first would wait
        at that barrier alone: the two-rank 0.9 / 0.1 blend hung after step 1 that way."""
        if ("train", seq_len) in self._datasets:
            return
        from tandem.data_pipelines.blends import Phase, PretrainDataConfig, build_source_dataset

        vf = 100 * self.valid_fraction
        cfg = PretrainDataConfig([Phase("source", {self.prefix: 1.0})], seq_length=seq_len, seed=self.seed,
                                 split=f"{100 - vf:g},{vf:g},0", cache_dir=self.cache_dir)
        train, valid = build_source_dataset(self.prefix, cfg, self.tokenizer, None, None)
        self._datasets[("train", seq_len)], self._datasets[("valid", seq_len)] = train, valid

    def _dataset(self, split: str, seq_len: int):
        if split not in ("train", "valid"):
            raise ValueError(f"{self.name}: split must be 'train' or 'valid', got {split!r}")
        self.prepare(seq_len)  # a no-op after the trainer's collective start; standalone use builds here
        ds = self._datasets[(split, seq_len)]
        if ds is None or len(ds) == 0:
            raise ValueError(f"{self.name}: no {split} samples of {seq_len} tokens (valid_fraction="
                             f"{self.valid_fraction}); use more data or another valid_fraction")
        return ds

    def num_samples(self, split: str, seq_len: int | None = None) -> int | None:
        """Samples in one epoch of ``split`` at ``seq_len`` (None without a length: windows wrap)."""
        return None if seq_len is None else len(self._dataset(split, seq_len))

    def sample(self, split: str, index: int, seq_len: int) -> torch.Tensor:
        if index < 0:
            raise IndexError(f"{self.name}: negative sample index {index}")
        ds = self._dataset(split, seq_len)
        s = ds[index % len(ds)]
        # megatron splits one (seq_len + 1)-token window into tokens and shifted labels; rejoin it
        return torch.cat([s["tokens"], s["labels"][-1:]]).long()
