"""What pretraining and long-context CPT share: next-token training on map-style token windows.

Both stages read rows of one map-style dataset (pretraining's blended ``GPTDataset`` phases, CPT's long/short
mixture) where step ``s`` trains on rows ``[s·B, (s+1)·B)`` (B = ``stage.global_batch``), so the data position
is the step: a resumed run rebuilds the dataset with the same schedule and reads from ``step · B``.
:class:`WindowStage` holds that step → rows mapping (the loader, its position and the time a step waits on
it) and the checks both make before building; the subclasses say what the rows are
(:meth:`WindowStage.train_rows`), which keys a batch carries (``batch_keys``) and how the data is planned.
"""

from __future__ import annotations

import abc
import time

import torch

from tandem.data_pipelines.blends import check_source
from tandem.data_pipelines.packing import build_dataloader
from tandem.data_pipelines.sources import is_byte_level

from ..data import DataError
from .base import Stage, split_step, wait_metrics

__all__ = ["WindowStage", "check_plan_sources"]


def check_plan_sources(plan, tokenizer, checked: set[str], skip_unused: bool = False) -> None:
    """Check every source of a blends plan exists and was made with ``tokenizer`` (``check_source``), without
    building anything; ``checked`` (updated) skips specs seen before, ``skip_unused`` those of weight ≤ 0.
    Errors name the config key of the entry (``data.path`` or ``<key>[i].path``)."""
    for phase, key in zip(plan.config.phases, plan.keys):
        for i, spec in enumerate(phase.blend):
            if spec in checked or (skip_unused and phase.blend[spec] <= 0):
                continue
            checked.add(spec)
            try:
                check_source(spec, plan.config, tokenizer)
            except (FileNotFoundError, ValueError) as e:
                raise DataError(f"{key if key == 'data.path' else f'{key}[{i}].path'}: {e}") from None


class WindowStage(Stage):
    """A stage training on rows ``[s·B, (s+1)·B)`` of a map-style dataset at step ``s``.

    Subclasses set ``self.data``, ``self.stage``, ``self.rank``, ``self.world_size``, ``self.tokenizer`` and
    ``self.sources`` in ``__init__`` and call :meth:`_init_position`; they implement :meth:`build`
    (collective) and :meth:`train_rows`.
    """

    #: the keys of every batch (``build_dataloader(keys=...)``)
    batch_keys: tuple[str, ...] = ()

    def _init_position(self) -> None:
        self.device = torch.device("cpu")
        self._iter = None
        self._next_step = 0  # steps whose batches were served: the data position saved in checkpoints
        self._wait, self._t_step = 0.0, time.perf_counter()

    # --- building ---------------------------------------------------------------------------------------
    def check_model(self, config) -> None:
        if config.vocab_size < self.tokenizer.vocab_size:
            raise DataError(f"model.vocab_size={config.vocab_size} is smaller than the data's tokenizer "
                            f"({self.tokenizer.vocab_size} ids, {self.tokenizer.source})")

    def bind(self, model, info, precision: str = "auto") -> None:
        self.device = info.device
        if self._next_step < self.stage.steps:  # a complete run builds nothing
            self.build()

    @abc.abstractmethod
    def build(self) -> None:
        """Build the run's datasets (once; later calls return). Collective: all ranks call it."""

    def _check_cache_dir(self, cache_dir) -> None:
        if cache_dir is None and not all(is_byte_level(s) for s in self.sources):
            raise DataError("data.cache_dir is not set: indexed sources need a cache directory for megatron's "
                            "indices (the trainer's run() sets <run.dir>/data_cache)")

    @abc.abstractmethod
    def train_rows(self):
        """The built map-style dataset of the whole run, row ``s·B + j`` being row j of step s."""

    # --- batches ----------------------------------------------------------------------------------------
    def _loader(self, step: int):
        """Batches of this rank's whole step (``global_batch / world_size`` rows: rank r takes the r-th
        contiguous slice of the step's samples), split into micro-batches here — one transfer per step
        from a worker, not one per micro-batch; workers keep two steps in flight."""
        gb, workers = self.stage.global_batch, self.data.num_workers
        return iter(build_dataloader(
            self.train_rows(), gb // self.world_size, eod=self.tokenizer.eod, consumed_samples=step * gb,
            dp_rank=self.rank, dp_size=self.world_size, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None, keys=self.batch_keys))

    def _on_step(self, step: int) -> None:
        """Called with each step before its rows are read (pretraining logs a phase switch)."""

    def batches_for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        self.build()
        if self._iter is None or step != self._next_step:  # first step, or a jump: read from step · B
            self._iter = self._loader(step)
        self._on_step(step)
        self._t_step = t0 = time.perf_counter()
        rows = next(self._iter)
        self._wait = time.perf_counter() - t0
        self._next_step = step + 1
        return split_step(rows, self.stage.micro_batch)

    def after_step(self, step: int, finite: bool) -> dict:
        """This rank's time blocked on the loader in this step, in seconds and as a share of the step
        (from its batches to the end of the optimizer step): near 0 while loading hides behind compute."""
        return wait_metrics(self._wait, self._t_step)
