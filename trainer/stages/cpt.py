"""Long-context continued pretraining (CPT): next-token loss over a long/short mixture, then a long-context eval.

Every row has ``stage.cpt.long_length`` tokens. A ``long_fraction`` of the rows is one long sample of the
``stage.cpt.long`` sources; the others hold ``long_length / short_length`` short samples of the
``stage.cpt.short`` sources (or of ``data.*``, the pretraining blend or phases, when that list is empty),
each its own document (``seq_idx``), so neither attention nor the Mamba state crosses from one short sample
into the next (:class:`tandem.data_pipelines.long_context.LongShortMixture`). Both kinds come through the
pretraining data path — ``tandem-preprocess`` prefixes read as megatron-core ``GPTDataset`` s, blends by
megatron's interleave (:func:`~tandem.data_pipelines.blends.build_pretrain_datasets`) — and the two kinds are
interleaved by the same error-minimising blend schedule, so the long share holds over any window of steps.

The mixture is map-style: step ``s`` trains on rows ``[s·B, (s+1)·B)`` (B = ``stage.global_batch``), so
resuming is reading from ``step · B`` with the same schedule (the loop refuses a changed one; ``run.extend``
is refused here because the number of rows fixes each source's epoch order). Rows are whole megatron windows:
no padding, so every input token is a real one (tokens/s, MFU). Nothing here is specific to an engine:
DDP, ZeRO and FSDP2 see the same ``token_cross_entropy`` forward as pretraining.

The weights usually come from a pretraining run (``model.init_from``, as SFT). After the last step, rank 0
evaluates the final checkpoint — and the ``model.init_from`` weights, the baseline — with
:mod:`tandem.trainer.inference.long_eval` (synthetic retrieval, multi-hop, aggregation by length and depth,
lengths past the trained one included, through chunked prefill) and writes ``<run.dir>/long_eval.json``.
It reads the saved ``model/`` weights, which every checkpoint has in the released layout (sharded ones
too), so the evaluation needs neither the training engine nor the other ranks.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tandem.data_pipelines.blends import sources_of
from tandem.data_pipelines.long_context import build_long_short_mixture

from ..config import DataConfig, StageConfig
from ..data import DataError, pretrain_plan
from .lm_data import WindowStage, check_plan_sources
from .base import LossOutput, check_batch_split, token_cross_entropy

log = logging.getLogger(__name__)

_BATCH_KEYS = ("input_ids", "labels", "loss_mask", "loss_weight", "seq_idx", "is_long")


def _plan(data: DataConfig, entries, seq_len: int, key: str | None):
    """The blends plan of ``entries`` (one blend under config key ``key``) at ``seq_len`` tokens per sample,
    or of ``data.*`` itself when ``key`` is None; errors name ``key``."""
    fields = ("path", "blend", "phase1", "phase2", "phase2_start", "tokenizer", "valid_fraction", "seed",
              "cache_dir", "eod_mask_loss")
    view = SimpleNamespace(**{f: getattr(data, f) for f in fields}, seq_len=seq_len)
    if key is not None:
        view.path, view.blend, view.phase1, view.phase2 = None, list(entries), [], []
    try:
        plan = pretrain_plan(view)
    except DataError as e:
        raise DataError(str(e).replace("data.blend", key) if key else str(e)) from None
    if key is not None:
        plan.keys = [key]
    return plan


class CPTStage(WindowStage):
    name = "cpt"
    batch_keys = _BATCH_KEYS

    def __init__(self, data: DataConfig, stage: StageConfig, rank: int = 0, world_size: int = 1):
        check_batch_split(stage, world_size)
        self.data, self.stage, self.c = data, stage, stage.cpt
        self.rank, self.world_size = rank, world_size
        c = self.c
        self.long_plan = _plan(data, c.long, c.long_length, "stage.cpt.long") if c.long_fraction > 0 else None
        self.short_plan = None
        if c.long_fraction < 1:
            self.short_plan = _plan(data, c.short, c.short_length, "stage.cpt.short" if c.short else None)
        plans = [p for p in (self.long_plan, self.short_plan) if p is not None]
        self.tokenizer = plans[0].tokenizer
        if any(p.tokenizer.unique_identifiers != self.tokenizer.unique_identifiers for p in plans):
            raise DataError("stage.cpt.long and the short sources (stage.cpt.short, or data.*) were made with different "
                            "tokenizers; CPT trains one vocabulary")
        for plan in plans:  # per plan: check_source reads the plan's config (its window length)
            check_plan_sources(plan, self.tokenizer, set())
        self.sources = [s for p in plans for s in sources_of(p.config)]
        self.mixture = None
        self._init_position()
        log.info("cpt: rows of %d tokens, %.0f%% long (%s), the rest %d × %d-token short samples (%s)", c.long_length,
                 100 * c.long_fraction, [dict(p.blend) for p in self.long_plan.config.phases] if self.long_plan else "-",
                 c.long_length // c.short_length, c.short_length,
                 [dict(p.blend) for p in self.short_plan.config.phases] if self.short_plan else "-")

    # --- the schedule and its state -------------------------------------------------------------------
    def schedule(self) -> dict:
        c = self.c
        out = {"stage.cpt.long_length": c.long_length, "stage.cpt.short_length": c.short_length,
               "stage.cpt.long_fraction": float(c.long_fraction), "data.seed": self.data.seed,
               "data.valid_fraction": float(self.data.valid_fraction), "data.eod_mask_loss": self.data.eod_mask_loss,
               "data.tokenizer": self.tokenizer.unique_identifiers}
        for name, plan in (("long", self.long_plan), ("short", self.short_plan)):
            if plan is not None:
                out[f"stage.cpt.{name}"] = [[p.name, [[s, w] for s, w in p.blend.items()], p.fraction]
                                            for p in plan.config.phases]
        if c.long_loss != "all":  # (absent for the whole loss, so runs from before the key resume as they were)
            out["stage.cpt.long_loss"], out["stage.cpt.answer_marker"] = c.long_loss, c.answer_marker
        return out

    def state_dict(self) -> dict:
        return {"steps": self.stage.steps, "steps_done": self._next_step}

    def load_state_dict(self, state: dict) -> None:
        if int(state["steps"]) != self.stage.steps:
            raise DataError(f"stage.steps={self.stage.steps} but the checkpoint's cpt run has {state['steps']}: the "
                            f"number of rows fixes every source's epoch order, so a cpt run cannot be extended; "
                            f"start a new cpt stage from it with model.init_from=<checkpoint>")
        self._next_step = int(state["steps_done"])

    # --- building ---------------------------------------------------------------------------------------
    def build(self) -> None:
        """The mixture of the whole run (``stage.steps × global_batch`` rows). Collective: all ranks call it."""
        if self.mixture is not None:
            return
        self._check_cache_dir(self.data.cache_dir)
        c, t0 = self.c, time.perf_counter()
        # A kind with no rows is never built, so give the builder any config for it (it reads seq_length only).
        long_cfg = (self.long_plan or self.short_plan).config
        short_cfg = (self.short_plan or self.long_plan).config
        if self.long_plan is None:
            long_cfg = SimpleNamespace(seq_length=c.long_length)
        if self.short_plan is None:
            short_cfg = SimpleNamespace(seq_length=c.short_length)
        marker = None
        if c.long_loss == "answers":
            marker = self.tokenizer.encode(c.answer_marker)
            if not marker:
                raise DataError(f"stage.cpt.answer_marker={c.answer_marker!r} encodes to no token")
        try:
            self.mixture = build_long_short_mixture(long_cfg, short_cfg, self.tokenizer,
                                                    num_rows=self.stage.steps * self.stage.global_batch,
                                                    long_fraction=float(c.long_fraction), answer_marker=marker)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"stage.cpt: {e}") from None
        m = self.mixture
        if marker is not None:
            self._check_answers(m, c)
        log.info("cpt data: %d rows of %d tokens (%d long, %d short × %d), built in %.1f s", len(m), m.long_length,
                 m.num_long, m.num_short, m.pieces, time.perf_counter() - t0)

    #: long rows read at the start to check that ``long_loss=answers`` finds answers to train
    ANSWER_CHECK_ROWS = 16

    @classmethod
    def _check_answers(cls, mixture, c) -> None:
        """``long_loss=answers``: the first long rows must hold answers (a marker the long documents do not
        contain as tokens — e.g. a tokenizer that merges it with the text before — would train nothing on
        long rows, silently). Reads up to :attr:`ANSWER_CHECK_ROWS` long rows."""
        long_rows = np.flatnonzero(mixture.kind == 0)[: cls.ANSWER_CHECK_ROWS].tolist()
        if long_rows and not any(float(mixture[i]["loss_mask"].sum()) > 0 for i in long_rows):
            raise DataError(f"stage.cpt.long_loss=answers: none of the first {len(long_rows)} long rows holds an "
                            f"answer after stage.cpt.answer_marker={c.answer_marker!r} (as its tokens) within a "
                            f"document that fits the row; check the marker against the long documents' text, and "
                            f"that they are shorter than stage.cpt.long_length={c.long_length}")

    # --- batches ----------------------------------------------------------------------------------------
    def train_rows(self):
        return self.mixture

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Token cross-entropy; ``cpt/long_share``: the share of the step's target tokens in long rows; with
        ``long_loss=answers`` also ``cpt/answer_share``: the share that are answers of task documents (their
        tokens weigh more than 1)."""
        out = token_cross_entropy(model, batch)
        if "is_long" in batch:
            mask = batch["loss_mask"]
            out.metrics["cpt/long_share"] = (mask.sum(dim=1) * batch["is_long"].to(mask.dtype)).sum()
        if "loss_weight" in batch:
            out.metrics["cpt/answer_share"] = (batch["loss_mask"] * (batch["loss_weight"] != 1)).sum()
        return out

    # --- the long-context evaluation ------------------------------------------------------------------
    def eval_settings(self):
        from ..inference.long_eval import LongEvalSettings

        c = self.c
        lengths = list(c.eval_lengths) or sorted({c.short_length, c.long_length, 2 * c.long_length})
        return LongEvalSettings(tasks=list(c.eval_tasks), lengths=lengths, depths=list(c.eval_depths),
                                per_cell=c.eval_per_cell, max_new_tokens=c.eval_max_new_tokens,
                                prefill_chunk=c.eval_prefill_chunk, seed=self.stage.seed + 1234,
                                options={k: dict(v) for k, v in c.eval_task_options.items()})

    def after_fit(self, run_dir: Path, checkpoint: Path | None, info, init_from: str | None = None) -> dict | None:
        """Rank 0: the long-context eval of ``checkpoint`` (and of ``init_from``), written to
        ``run_dir/long_eval.json`` and summarised in the log. None on other ranks or when turned off."""
        if not info.is_main or self.c.eval_per_cell == 0 or checkpoint is None:
            return None
        from ..inference.long_eval import RESULT_FILE, evaluate_checkpoint, summary_lines

        settings = self.eval_settings()
        device = str(info.device)
        doc = {"trained_length": self.c.long_length, "short_length": self.c.short_length}
        if init_from and self.c.eval_baseline:
            doc["baseline"] = evaluate_checkpoint(init_from, settings, device=device)
            log.info("\n".join(summary_lines(doc["baseline"], f"long-context eval before CPT ({init_from}):")))
        doc["final"] = evaluate_checkpoint(checkpoint, settings, device=device)
        log.info("\n".join(summary_lines(doc["final"], f"long-context eval after CPT ({checkpoint}), trained at "
                                                         f"{self.c.long_length} tokens:")))
        path = Path(run_dir) / RESULT_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
        log.info("long-context eval: %s", path)
        return doc
