"""Supervised fine-tuning on conversations: the chat template's token-level renderer (per-token loss mask
on assistant tokens), several conversations packed per row with ``seq_idx`` (first-fit-decreasing), and
the loop's usual normalisation by the global count of target tokens.

**Built once.** With ``data.cache_dir`` (the run does set it: ``<run dir>/data_cache``) the packed rows are
tokenised by one process per node (local rank 0) into ``<cache_dir>/sft/<part>-<key>/`` — the key digests
the files (path, size, mtime), the tokenizer and every option that shapes the rows — and every rank then
memory-maps that copy: nothing is tokenised twice, a resume reuses it, and a node's ranks share one copy in
the page cache instead of each holding its own. A bad row found by the builder stops every rank with the
same error (the verdict is exchanged before anyone reads the copy).

The packed rows are a fixed, deterministic list (:class:`tandem.data_pipelines.sft.SFTPackedDataset`); the
order of each epoch is a seeded permutation, and step ``s`` takes rows ``[s·B, (s+1)·B)`` of the
concatenated epochs (rank ``r`` its slice). The position is a function of the step alone, so resume is
exact without any data state beyond a fingerprint that detects changed data on resume.

**Loaded ahead.** A step's rows are read from the memory-mapped copy and collated by a
``torch.utils.data.DataLoader`` over steps (:class:`_StepRows`: item ``i`` = this rank's rows of step
``start + i``, collated once) with ``data.num_workers`` worker processes, each two steps ahead
(``prefetch_factor=2``; 0: in the training process, as the CPU smoke recipe runs it); the time a step waits for its rows is logged as
``data/wait_s`` and ``data/wait_fraction``, as for pretraining. Same rows in the same order either way.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tandem.data_pipelines.chat import TRAIN_ON
from tandem.data_pipelines.packing import Collator
from tandem.data_pipelines.sft import OVERLONG, SFTPackedDataset, sft_cache_key
from tandem.data_pipelines.tokenizer import load_tokenizer

from ..config import DataConfig, StageConfig
from ..data import DataError
from ..data import build_once_per_node
from .base import Stage, check_batch_split, split_step, wait_metrics

log = logging.getLogger(__name__)


def shared_sft_dataset(cache_dir, name: str, paths, **kwargs) -> SFTPackedDataset:
    """``SFTPackedDataset(paths, **kwargs)`` built once per node and memory-mapped by every rank (module doc);
    without ``cache_dir`` built here, in memory. Errors (``ValueError``/``OSError``) are raised on every rank
    alike, as ``ValueError`` with the builder's message."""
    if cache_dir is None:
        return SFTPackedDataset(paths, **kwargs)
    opts = {k: v for k, v in kwargs.items() if k != "tokenizer"}
    where = Path(cache_dir) / "sft" / f"{name}-{sft_cache_key(paths, kwargs.get('tokenizer'), **opts)}"
    build_once_per_node(where, lambda root: SFTPackedDataset(paths, **kwargs).save(root), marker="meta.json")
    return SFTPackedDataset.load(where)


#: a step that holds each packed row this many times or more is warned about
REPEAT_WARNING = 2.0


class _StepRows(torch.utils.data.Dataset):
    """Item ``i``: the collated rows of step ``start + i`` for this rank (a DataLoader over steps, so a
    worker prepares a whole step and the transfer is one per step)."""

    def __init__(self, stage: "SFTStage", start: int):
        self.stage, self.start = stage, start

    def __len__(self) -> int:
        return max(self.stage.stage.steps - self.start, 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.stage._batch(self.stage.rank_rows(self.start + i))


class SFTStage(Stage):
    name = "sft"

    def __init__(self, data: DataConfig, stage: StageConfig, rank: int = 0, world_size: int = 1):
        chat = data.chat
        check_batch_split(stage, world_size)
        if not chat.train:
            raise DataError("data.chat.train: no SFT conversation files given (JSONL / Parquet / HF dataset folders)")
        if chat.train_on not in TRAIN_ON:
            raise DataError(f"data.chat.train_on must be one of {TRAIN_ON}, got {chat.train_on!r}")
        if chat.overlong not in OVERLONG:
            raise DataError(f"data.chat.overlong must be one of {OVERLONG}, got {chat.overlong!r}")
        self.data, self.stage = data, stage
        self.rank, self.world_size = rank, world_size
        try:
            self.tokenizer = load_tokenizer(chat.tokenizer)
        except (OSError, ValueError) as e:
            raise DataError(f"data.chat.tokenizer: {e}") from None
        common = dict(
            tokenizer=self.tokenizer, seq_len=data.seq_len, train_on=chat.train_on,
            truncate_history_thinking=chat.truncate_history_thinking, overlong=chat.overlong,
            enable_thinking=chat.enable_thinking, seed=data.seed,
        )
        holdout = not chat.valid and data.valid_fraction > 0
        cache = data.cache_dir
        try:  # schema errors name file:line
            part = "train" if holdout else "all"
            self.train_set = shared_sft_dataset(cache, part, list(chat.train), part=part,
                                                valid_fraction=data.valid_fraction if holdout else 0.0, **common)
        except (OSError, ValueError) as e:  # a missing file, a bad row
            raise DataError(f"data.chat.train: {e}") from None
        self.valid_set = None
        if chat.valid or holdout:
            try:
                self.valid_set = (shared_sft_dataset(cache, "valid", list(chat.valid), **common) if chat.valid else
                                  shared_sft_dataset(cache, "heldout", list(chat.train), part="valid",
                                                     valid_fraction=data.valid_fraction, **common))
            except (OSError, ValueError) as e:
                if chat.valid or "no SFT samples" not in str(e):
                    raise DataError(f"data.chat.valid: {e}") from None
                log.warning("data.valid_fraction=%s held out no conversation: no evaluation", data.valid_fraction)
        self.collate = Collator(self.tokenizer.eod)
        self.device = torch.device("cpu")
        self._iter, self._next_step, self._wait, self._t_step = None, 0, 0.0, time.perf_counter()  # the step loader
        log.info("SFT data: %d train rows, %d valid rows of %d tokens; train %s", len(self.train_set),
                 len(self.valid_set or ()), data.seq_len, self.train_set.stats.as_dict())
        repeats = stage.global_batch / len(self.train_set)
        if repeats >= REPEAT_WARNING:  # few conversations packed into few long rows: every step is the same data
            log.warning("each step trains on every one of the %d packed rows about %.0f times (stage.global_batch=%d, "
                        "data.seq_len=%d): lower stage.global_batch or data.seq_len, or give more conversations",
                        len(self.train_set), repeats, stage.global_batch, data.seq_len)

    # ------------------------------------------------------------------------------------------------
    def check_model(self, config) -> None:
        if config.vocab_size < self.tokenizer.vocab_size:
            raise DataError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's "
                            f"({self.tokenizer.vocab_size}, {self.tokenizer.source})")

    def _order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s permutation of the packed rows, drawn once per epoch: the two most recent are
        kept (a step may straddle an epoch boundary), so a step costs O(batch) and an epoch one O(rows)
        draw — not one per step."""
        cache = self.__dict__.setdefault("_orders", {})
        if epoch not in cache:
            g = torch.Generator().manual_seed(self.data.seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(len(self.train_set), generator=g)
            for old in sorted(cache)[:-2]:
                del cache[old]
        return cache[epoch]

    def rows_for_step(self, step: int) -> list[int]:
        """Global row indices of step ``step`` (every rank computes the same list)."""
        n, gb = len(self.train_set), self.stage.global_batch
        start, rows = step * gb, []
        for epoch in range(start // n, (start + gb - 1) // n + 1):
            lo, hi = max(start, epoch * n) - epoch * n, min(start + gb, (epoch + 1) * n) - epoch * n
            rows += self._order(epoch)[lo:hi].tolist()
        return rows

    def rank_rows(self, step: int) -> list[int]:
        """This rank's slice of step ``step``'s rows."""
        per_rank = self.stage.global_batch // self.world_size
        return self.rows_for_step(step)[self.rank * per_rank: (self.rank + 1) * per_rank]

    def _loader(self, step: int):
        workers = self.data.num_workers
        return iter(torch.utils.data.DataLoader(
            _StepRows(self, step), batch_size=None, shuffle=False, num_workers=workers,
            prefetch_factor=2 if workers else None, persistent_workers=False,
            pin_memory=self.device.type == "cuda"))

    def batches_for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        if step >= self.stage.steps:  # past the schedule (the loader covers steps < stage.steps): read directly
            mb, mine = self.stage.micro_batch, self.rank_rows(step)
            return [self._batch(mine[i: i + mb]) for i in range(0, len(mine), mb)]
        if self._iter is None or step != self._next_step:  # first step, or a jump
            self._iter = self._loader(step)
        self._t_step = t0 = time.perf_counter()
        batch = next(self._iter)
        self._wait = time.perf_counter() - t0
        self._next_step = step + 1
        return split_step(batch, self.stage.micro_batch)

    def bind(self, model, info, precision: str = "auto") -> None:
        self.device = info.device

    def after_step(self, step: int, finite: bool) -> dict:
        """This rank's time blocked on its rows in this step (seconds and share of the step)."""
        return wait_metrics(self._wait, self._t_step)

    def _batch(self, rows: list[int], dataset=None) -> dict[str, torch.Tensor]:
        dataset = dataset if dataset is not None else self.train_set
        batch = self.collate([dataset[i] for i in rows])
        return {k: batch[k] for k in ("input_ids", "labels", "loss_mask", "seq_idx", "valid")}

    def eval_batches(self):
        # The same fixed rows at every evaluation; every rank yields the same number of batches (sharded
        # engines need every rank in every forward): ranks short of rows repeat row 0 with loss_mask 0.
        n = min(len(self.valid_set or ()), self.stage.eval_batches * self.stage.micro_batch)
        if n == 0:
            return
        mine = list(range(self.rank, n, self.world_size))
        per_rank = -(-n // self.world_size)
        slots = mine + [None] * (per_rank - len(mine))
        mb = self.stage.micro_batch
        for start in range(0, per_rank, mb):
            idx = slots[start: start + mb]
            batch = self._batch([i or 0 for i in idx], self.valid_set)
            batch["loss_mask"][torch.tensor([i is None for i in idx])] = 0.0
            yield batch

    def step_info(self, step: int) -> dict:
        return {"epoch": (step * self.stage.global_batch) // len(self.train_set)}

    def state_dict(self) -> dict:
        return {"train_rows": len(self.train_set), "fingerprint": self.train_set.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.train_set.fingerprint:
            raise DataError(
                f"the SFT data differ from the checkpoint's (packed rows {state.get('train_rows')} → "
                f"{len(self.train_set)}, fingerprint {state.get('fingerprint')} → {self.train_set.fingerprint}): "
                f"resuming would not continue the same data order. Start a new run from its weights with "
                f"model.init_from=<checkpoint> instead"
            )
