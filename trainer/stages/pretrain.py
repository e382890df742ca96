"""Pretraining (also long-context CPT): next-token prediction on blended, packed token windows, in two
phases — phase-1 blend for the first ``data.phase2_start`` fraction of tokens, then the phase-2 blend.
"""

from __future__ import annotations

import logging
import math

import torch

from ..config import DataConfig, StageConfig
from ..data import BlendSchedule, DataError, build_source, make_batch
from .base import Stage, check_batch_split

log = logging.getLogger(__name__)


class PretrainStage(Stage):
    name = "pretrain"

    def __init__(self, data: DataConfig, stage: StageConfig, rank: int = 0, world_size: int = 1):
        check_batch_split(stage, world_size)
        if not data.phase1:
            raise DataError("data.phase1: the phase-1 blend is empty; give at least one {path, weight}")
        if not 0.0 <= data.phase2_start <= 1.0:
            raise DataError(f"data.phase2_start must be a token fraction in [0, 1], got {data.phase2_start}")
        if data.phase2_start < 1.0 and not data.phase2:
            raise DataError(f"data.phase2_start={data.phase2_start} but data.phase2 (the phase-2 blend) is empty")
        self.data, self.stage = data, stage
        self.rank, self.world_size = rank, world_size
        phases, sources = [], {}
        for p, entries in enumerate((data.phase1, data.phase2)):
            blend = []
            for i, e in enumerate(entries):
                key = f"data.phase{p + 1}[{i}]"
                if e.weight < 0:
                    raise DataError(f"{key}.weight must be >= 0, got {e.weight}")
                if e.path not in sources:
                    sources[e.path] = build_source(e.path, data.seed, data.valid_fraction, f"{key}.path")
                blend.append((e.path, float(e.weight)))
            if entries and sum(w for _, w in blend) <= 0:
                raise DataError(f"data.phase{p + 1}: all blend weights are zero")
            phases.append(blend)
        # Sources whose datasets are built collectively (megatron's indexed datasets) are built now, all of
        # them, in config order on every rank — not on a rank's first sample, which would leave a rank that
        # draws a rare source first waiting alone at megatron's barrier.
        for path, source in sources.items():
            prepare = getattr(source, "prepare", None)
            if prepare is not None:
                try:
                    prepare(data.seq_len)
                except (FileNotFoundError, ValueError) as e:
                    raise DataError(f"{path}: {e}") from None
        self.blend = BlendSchedule(phases, sources)
        # Every step has the same token count, so the token-fraction switch is a step index.
        self.phase2_step = math.ceil(data.phase2_start * stage.steps) if data.phase2 else stage.steps + 1
        log.info("data phase 1 blend: %s", phases[0])
        if data.phase2:
            log.info("data phase 2 blend: %s (from step %d = %.1f%% of tokens)", phases[1], self.phase2_step, 100 * data.phase2_start)

    def check_model(self, config) -> None:
        byte_level = any(e.path.startswith(("synthetic:", "text:")) for e in (*self.data.phase1, *self.data.phase2))
        if byte_level and config.vocab_size < 259:
            raise DataError(f"model.vocab_size={config.vocab_size}: the byte-level data sources need at least 259 token ids")

    def phase_for_step(self, step: int) -> int:
        # never back to phase 1 once phase 2 has started (a run extended after its switch: run.extend)
        return 1 if step >= self.phase2_step or self.blend.phase == 1 else 0

    def batches_for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        if self.blend.set_phase(self.phase_for_step(step)):
            log.info("step %d: switching to data phase %d", step, self.blend.phase + 1)
        drawn = self.blend.advance(self.stage.global_batch)  # every rank advances over the whole step
        per_rank = self.stage.global_batch // self.world_size
        mine = drawn[self.rank * per_rank: (self.rank + 1) * per_rank]
        samples = [self.blend.sources[name].sample("train", idx, self.data.seq_len) for name, idx in mine]
        mb = self.stage.micro_batch
        return [make_batch(samples[i: i + mb]) for i in range(0, len(samples), mb)]

    def eval_batches(self):
        sources = [name for name, w in self.blend.phases[self.blend.phase] if w > 0]
        # A fixed held-out set of eval_batches × micro_batch windows, the same at every evaluation and for
        # any number of ranks (rank r takes every world_size-th window). Every rank yields the same number
        # of batches — sharded engines (ZeRO-3) need every rank in every forward — so ranks short of
        # windows pad with a window whose loss_mask is zero.
        total = self.stage.eval_batches * self.stage.micro_batch
        mine = list(range(self.rank, total, self.world_size))
        per_rank = -(-total // self.world_size)
        mb = self.stage.micro_batch
        windows = mine + [None] * (per_rank - len(mine))
        for start in range(0, per_rank, mb):
            idx = windows[start: start + mb]
            batch = make_batch([self.blend.sources[sources[(i or 0) % len(sources)]].sample("valid", i or 0, self.data.seq_len) for i in idx])
            batch["loss_mask"][torch.tensor([i is None for i in idx])] = 0.0
            yield batch

    def schedule(self) -> dict:
        d = self.data
        blend = lambda entries: [[e.path, float(e.weight)] for e in entries]
        return {"data.phase1": blend(d.phase1), "data.phase2": blend(d.phase2),
                "data.phase2_start": float(d.phase2_start) if d.phase2 else 1.0,
                "data.seq_len": d.seq_len, "data.seed": d.seed, "data.valid_fraction": float(d.valid_fraction)}

    def step_info(self, step: int) -> dict:
        return {"phase": self.phase_for_step(step) + 1}

    def state_dict(self) -> dict:
        return {"blend": self.blend.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.blend.load_state_dict(state["blend"])
