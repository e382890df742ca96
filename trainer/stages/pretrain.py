"""Pretraining (also long-context CPT): next-token prediction on blended token windows, in phases.

The data path is :mod:`tandem.data_pipelines` end to end (docs/DATA.md): ``data.*`` →
``blends.PretrainDataConfig`` (:func:`tandem.trainer.data.pretrain_plan`) → ``build_pretrain_datasets``
(one megatron ``GPTDataset`` per source, megatron's blend interleave per phase, offsets carried across the
switch) → ``packing.build_dataloader`` (a ``DataLoader`` with ``data.num_workers`` workers keeping two
steps in flight, :class:`~tandem.data_pipelines.packing.ResumableBatchSampler` from the consumed samples).
Step ``s`` trains on samples ``[s·B, (s+1)·B)`` of that map-style dataset (B = ``stage.global_batch``), so
the data position is a function of the step: resume is rebuilding with the same schedule (the loop
refuses a changed one) and reading from ``step · B``. That step → rows part (loader, position, wait
time) is shared with long-context CPT: :class:`tandem.trainer.stages.lm_data.WindowStage`.

The datasets are built in :meth:`bind` — after the loop has checked a resumed run's schedule, so a refused
resume writes nothing, not even index caches — on every rank, collectively: megatron builds an index on
rank 0 behind a barrier, and a rank building lazily on its first sample of a rare source would wait there
alone (two ranks on a 0.9 / 0.1 blend hung after step 1 that way). Everything that can be checked without
building (keys, weights, files, document counts, splits, the tokenizer the data was made with) is checked
in ``__init__``, before the model is built.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from tandem.data_pipelines.blends import build_pretrain_datasets, phase_boundaries, sources_of
from tandem.data_pipelines.packing import Collator
from tandem.data_pipelines.sources import parse_spec

from ..config import DataConfig, StageConfig
from ..data import DataError, pretrain_plan
from .lm_data import WindowStage, check_plan_sources
from .base import LossOutput, check_batch_split, token_cross_entropy

log = logging.getLogger(__name__)

_BATCH_KEYS = ("input_ids", "labels", "loss_mask", "seq_idx", "source")


def _labels(specs: list[str]) -> list[str]:
    """Short, unique metric names of the sources (``data/share/<label>``)."""
    out: list[str] = []
    for spec in specs:
        kind, arg = parse_spec(spec)
        label = arg if kind == "synthetic" else os.path.basename(arg.rstrip("/")) or arg
        out.append(label if label not in out else f"{label}#{len(out)}")
    return out


class PretrainStage(WindowStage):
    name = "pretrain"
    batch_keys = _BATCH_KEYS

    def __init__(self, data: DataConfig, stage: StageConfig, rank: int = 0, world_size: int = 1):
        check_batch_split(stage, world_size)
        self.data, self.stage = data, stage
        self.rank, self.world_size = rank, world_size
        self.plan = pretrain_plan(data)
        cfg, self.tokenizer = self.plan.config, self.plan.tokenizer
        check_plan_sources(self.plan, self.tokenizer, set(), skip_unused=True)
        self.sources = sources_of(cfg)
        self.labels = _labels(self.sources)
        self.phase_numbers = [int(p.name[-1]) for p in cfg.phases]  # "phase1"/"phase2" → metrics' "phase"
        self.extensions: list[tuple[int, int]] = []  # (resume step, previous stage.steps): run.extend
        self.datasets = None
        self.collate = Collator(self.tokenizer.eod)
        self._init_position()
        gb = stage.global_batch
        bounds = phase_boundaries(cfg, stage.steps * gb, gb)
        for p, key, a, b in zip(cfg.phases, self.plan.keys, bounds[:-1], bounds[1:]):
            log.info("data %s (%s, steps %d-%d, %.1f%% of tokens): %s", p.name, key, a // gb, b // gb - 1,
                     100 * p.fraction, dict(p.blend))

    # --- the schedule and its state -------------------------------------------------------------------
    def schedule(self) -> dict:
        cfg = self.plan.config
        out = {f"data.{p.name}": [[spec, w] for spec, w in p.blend.items()] for p in cfg.phases}
        names = [p.name for p in cfg.phases]
        out["data.phase2_start"] = (0.0 if names == ["phase2"] else cfg.phases[0].fraction if "phase2" in names else 1.0)
        out.update({"data.seq_len": cfg.seq_length, "data.seed": cfg.seed, "data.valid_fraction": float(self.data.valid_fraction),
                    "data.eod_mask_loss": cfg.eod_mask_loss, "data.tokenizer": self.tokenizer.unique_identifiers})
        return out

    def state_dict(self) -> dict:
        return {"steps": self.stage.steps, "steps_done": self._next_step,
                "extensions": [list(e) for e in self.extensions]}

    def load_state_dict(self, state: dict) -> None:
        if "steps_done" not in state:
            raise DataError("the checkpoint's data position is from tandem's former pretraining data path (its own "
                            "blend schedule), which this version cannot continue exactly; start a new stage from its "
                            "weights with model.init_from=<checkpoint>")
        self.extensions = [tuple(e) for e in state.get("extensions", [])]
        self._next_step = int(state["steps_done"])
        if state["steps"] != self.stage.steps:  # trained only if run.extend allows it (Trainer.restore checks)
            self.extensions.append((self._next_step, int(state["steps"])))

    # --- building ---------------------------------------------------------------------------------------
    def build(self) -> None:
        """Build every dataset of every phase (train and validation). Collective: all ranks call it."""
        if self.datasets is not None:
            return
        cfg, gb = self.plan.config, self.stage.global_batch
        self._check_cache_dir(cfg.cache_dir)
        valid = self.stage.eval_batches * self.stage.micro_batch if self.data.valid_fraction > 0 else 0
        t0 = time.perf_counter()
        try:
            self.datasets = build_pretrain_datasets(cfg, self.tokenizer, self.stage.steps * gb, valid, align=gb,
                                                    extensions=[(s * gb, n * gb) for s, n in self.extensions],
                                                    allow_empty_phases=True)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"data: {e}") from None
        train = self.datasets.train
        log.info("data: %d sources, %d train samples of %d tokens, phases start at steps %s; built in %.1f s",
                 len(self.sources), len(train), cfg.seq_length, [b // gb for b in train.bounds[:-1]],
                 time.perf_counter() - t0)

    # --- batches ----------------------------------------------------------------------------------------
    def phase_index(self, step: int) -> int:
        self.build()
        return self.datasets.train.phase_of(min(step, self.stage.steps - 1) * self.stage.global_batch)

    def train_rows(self):
        return self.datasets.train

    def _on_step(self, step: int) -> None:
        if step and self.phase_index(step) != self.phase_index(step - 1):
            log.info("step %d: switching to data %s", step, self.datasets.train.phase_names[self.phase_index(step)])

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Token cross-entropy, plus each source's share of the step's target tokens (``data/share/<source>``,
        over all ranks: the blend as trained, per step)."""
        out = token_cross_entropy(model, batch)
        if "source" in batch:
            mask = batch["loss_mask"]
            per_source = torch.zeros(len(self.sources), dtype=mask.dtype, device=mask.device)
            per_source.index_add_(0, batch["source"], mask.sum(dim=1))
            out.metrics.update({f"data/share/{label}": per_source[i] for i, label in enumerate(self.labels)})
        return out

    def eval_batches(self):
        self.build()
        # the validation mixture of the phase the last step trained in
        valid = self.datasets.valid.get(self.datasets.train.phase_names[self.phase_index(max(self._next_step - 1, 0))])
        if valid is None:
            return
        # A fixed held-out set of eval_batches × micro_batch samples, the same at every evaluation and for
        # any number of ranks (rank r takes every world_size-th). Every rank yields the same number of
        # batches — sharded engines (ZeRO-3) need every rank in every forward — so ranks short of samples
        # pad with a sample whose loss_mask is zero.
        total, mb = len(valid), self.stage.micro_batch
        mine = list(range(self.rank, total, self.world_size))
        per_rank = -(-total // self.world_size)
        slots = mine + [None] * (per_rank - len(mine))
        for start in range(0, per_rank, mb):
            idx = slots[start: start + mb]
            batch = self.collate([valid[i or 0] for i in idx])
            batch["loss_mask"][torch.tensor([i is None for i in idx])] = 0.0
            yield {k: batch[k] for k in _BATCH_KEYS}

    def step_info(self, step: int) -> dict:
        return {"phase": self.phase_numbers[self.phase_index(step)]}
