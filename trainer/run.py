"""Build a run from a composed config and train: the body of the ``tandem`` command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tandem.model.checkpoint_io import CheckpointError
from tandem.model.precision import PrecisionError, apply_precision

from .checkpoint import CheckpointManager, load_weights, resolve_checkpoint, weights_dir
from .checkpoint.tokenizer_files import saved_tokenizer
from .config import ConfigError, build_hybrid_config, configure_compile, configure_memory, row_length, validate_config
from .data import DataError
from .loop import Trainer, check_stage_name
from .metrics import (ConsoleSink, JsonlSink, WandbSink, configure_logging, memory_now_bytes, model_flops_per_token,
                      peak_flops_per_device)
from .parallel import ENGINES, ExpertBalancer, build_model, engine_name, init_distributed
from .parallel.context import ContextParallel, check_context_parallel, shard_stage_batches
from .parallel.fsdp import local_pieces
from .optim import build_optimizer, validate_optim
from .stages import STAGES

log = logging.getLogger("tandem")

#: errors that are the user's to fix: printed as one clear line, exit status 2
USER_ERRORS = (ConfigError, DataError, CheckpointError)


def validate(cfg: DictConfig) -> None:
    """Every check of the config alone (schema keys, counts, choice fields), before anything is built."""
    validate_config(cfg)
    validate_optim(cfg.optim)
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage.name must be one of {sorted(STAGES)}, got {cfg.stage.name!r}")


def _tokenizer_from_init(cfg: DictConfig) -> None:
    """SFT and GRPO started from ``model.init_from`` read the tokenizer saved with those weights unless
    ``data.chat.tokenizer`` / ``data.rl.tokenizer`` names one (pretraining's is the one its data was made
    with, checked against each source's manifest)."""
    key = {"sft": "chat", "grpo": "rl", "rlhf": "rl"}.get(cfg.stage.name)
    if not key or not cfg.model.init_from or cfg.data[key].tokenizer is not None:
        return
    try:
        folder = weights_dir(cfg.model.init_from)
    except CheckpointError:
        return  # reported, naming the path, when the weights are loaded
    if saved_tokenizer(folder) is not None:
        cfg.data[key].tokenizer = str(folder)


def run(cfg: DictConfig) -> dict:
    """Validate, build (model, stage, optimizer, engine), resume or initialise, then train.

    Everything that can fail on bad input (config, data paths, checkpoint shapes) is checked before the
    run directory is written to, so a failed start never touches an existing run.
    """
    configure_logging(int(os.environ.get("RANK", "0")), cfg.logger.verbose)  # rank 0 only, libraries quiet
    validate(cfg)
    run_dir = Path(cfg.run.dir)
    # whether this start creates the run dir: decided before the process group forms (a rendezvous every
    # rank reaches before any writes anything), so no rank sees another's data caches here
    fresh = not run_dir.exists()
    info = init_distributed(cfg.parallel)
    try:
        model_cfg = build_hybrid_config(cfg.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if cfg.data.cache_dir is None:  # megatron's index caches: in the run, never beside the (maybe read-only) data
        cfg.data.cache_dir = str(run_dir / "data_cache")
    _tokenizer_from_init(cfg)
    check_context_parallel(cfg, model_cfg)
    # which checkpoint this run continues, and that it is one of this stage's: decided before any data is
    # built (building writes caches under the run dir) — a refused start leaves the run dir as it was
    checkpoints = CheckpointManager(run_dir, cfg.stage.keep_last, info.rank, info.world_size, async_save=cfg.stage.async_save)
    resume_from = None
    if cfg.run.resume == "auto":
        resume_from = checkpoints.latest()
    elif cfg.run.resume == "never":
        if checkpoints.latest_file.exists():
            raise ConfigError(f"run.resume=never but {run_dir} already has checkpoints; choose a new run.dir or run.resume=auto")
    else:
        resume_from = resolve_checkpoint(cfg.run.resume)
    if resume_from is not None:
        check_stage_name(_saved_stage(resume_from), cfg.stage.name)
    # Building the stage writes its data caches (the SFT token cache, the RL prompt store) into the run dir:
    # a start that fails from here to the first step removes a run dir it created (nothing else was in it)
    with _removed_on_failure(run_dir, fresh and info.is_main):
        # data-parallel replicas read different rows; the CP ranks of one replica read the same rows and each
        # trains on its load-balanced slice of them (trainer/parallel/context.py)
        stage = STAGES[cfg.stage.name](cfg.data, cfg.stage, info.dp_rank, info.dp_size)
        stage.check_model(model_cfg)
        if info.cp > 1:
            shard_stage_batches(stage, ContextParallel(info.cp_group))

        torch.manual_seed(cfg.stage.seed + info.rank)
        memory_base = memory_now_bytes(info.device)  # the runtime alone: what the planner's figures come on top of
        engine_spec = ENGINES[engine_name(cfg.parallel, info, cfg.stage)]

        def prepare(m) -> None:  # before any engine wraps the model (FSDP2: while it is still on meta)
            configure_memory(m, cfg.model)  # activation checkpointing per layer kind, loss chunk size
            try:
                apply_precision(m, cfg.precision, device=info.device)  # low-precision recipes; state dict unchanged
            except PrecisionError as e:
                raise ConfigError(str(e)) from None
            configure_compile(m, cfg.model)  # model.compile: each block's training body through torch.compile

        shard = engine_spec.shard_on_meta
        # only this rank's experts are allocated — and under FSDP2 only its shards of everything
        model = build_model(model_cfg, info, init_seed=cfg.model.init_seed, cp_attention=cfg.parallel.cp_attention,
                            prepare=prepare, shard=None if shard is None else (lambda m: shard(m, info, cfg.parallel)))
        optimizer = build_optimizer(model, cfg.optim)
        checkpoints.tokenizer = getattr(stage, "tokenizer", None)  # saved in every checkpoint's model/

        trainer = Trainer(cfg, model, stage, None, info, checkpoints)
        trainer.memory_base = memory_base
        optimizer_state = None
        with torch.no_grad():  # an FSDP2-sharded model reads only its pieces of each tensor
            pieces = local_pieces(model)
        if resume_from is not None:
            trainer_state, optimizer_state = checkpoints.load(resume_from, model, sharded_engine=engine_spec.sharded_checkpoints,
                                                              pieces=pieces)
            try:
                trainer.restore(trainer_state, source=resume_from)
            except (KeyError, TypeError) as e:  # a trainer_state.json that parses but lacks fields
                raise CheckpointError(f"{resume_from / 'trainer_state.json'}: not a tandem trainer state "
                                      f"(missing or malformed {e})") from None
            stage.load_rank_state(checkpoints.load_rank_state(resume_from), source=resume_from)
            log.info("resumed from %s at step %d", resume_from, trainer.state.step)
        elif cfg.model.init_from:
            src = load_weights(model, cfg.model.init_from, pieces=pieces)
            log.info("initial weights from %s", src)
        stage.bind(model, info, precision=cfg.precision.name)  # the final weights: stages that generate (GRPO) keep the model
        # The engine is built after the weights are final: DeepSpeed copies them into its partitions.
        trainer.engine = engine_spec.build(model, optimizer, info, cfg.parallel, cfg.optim, cfg.stage)
        if optimizer_state is not None:
            trainer.engine.load_optimizer_state(optimizer_state, resume_from)
        elif resume_from is not None:  # a sharded checkpoint into a sharded engine: weights and optimizer now
            checkpoints.load_sharded(resume_from, trainer.engine)
    if trainer.state.step >= cfg.stage.steps:
        log.info("run already complete (%d/%d steps)", trainer.state.step, cfg.stage.steps)
        return {}

    # From here on the run directory is written.
    sinks = []
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
        sinks.append(ConsoleSink(cfg.stage.steps, trainer.state.step, cfg.logger.progress_bar))
        if cfg.logger.kind == "wandb":
            wb = WandbSink(run_dir, cfg.logger.project, cfg.logger.entity, OmegaConf.to_container(cfg, resolve=True),
                           trainer.state.extra.get("wandb_id"))
            trainer.state.extra["wandb_id"] = wb.run_id
            sinks.append(wb)
    trainer.sinks = sinks
    balancer = ExpertBalancer(model, cfg.optim.expert_bias_update_rate, distributed=info.distributed)
    if balancer.layers:
        trainer.step_hooks.append(balancer)
    seq_len, _ = row_length(cfg)  # tokens per row
    trainer.flops_per_token = model_flops_per_token(model_cfg, seq_len)
    plan = getattr(model, "precision_plan", None)
    trainer.peak_flops = peak_flops_per_device(cfg.logger.peak_flops, cfg.precision.name,
                                               plan.backend if plan is not None else "emulate")
    count = model.parameter_count()
    log.info("model %s: %.3gM parameters (%.3gM active); %d ranks on %s; %s precision; run dir %s",
             model_cfg.hybrid_override_pattern if len(model_cfg.hybrid_override_pattern) < 16 else cfg.model.preset,
             count.total / 1e6, count.active / 1e6, info.world_size, info.device.type, cfg.precision.name, run_dir)
    try:
        record = trainer.fit()
    finally:
        for sink in sinks:
            sink.close()
    if info.is_main:
        summary = headline_summary(run_dir / "metrics.jsonl", stage.headline)
        print(f"done: {trainer.state.step} steps; {summary}\n  metrics:    {run_dir / 'metrics.jsonl'}\n"
              f"  checkpoint: {checkpoints.latest()}", flush=True)
    after_fit = getattr(stage, "after_fit", None)  # e.g. the cpt stage's long-context evaluation (rank 0)
    if after_fit is not None:
        after_fit(run_dir, checkpoints.latest(), info, init_from=cfg.model.init_from)
    return record


@contextlib.contextmanager
def _removed_on_failure(run_dir: Path, remove: bool):
    """Remove ``run_dir`` if the body raises (``remove``: this start created it, on the main rank)."""
    try:
        yield
    except BaseException:
        if remove and run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _saved_stage(checkpoint: Path) -> str | None:
    """The stage name in a checkpoint's trainer state (None where it cannot be read: the full load reports it)."""
    try:
        return json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None


def headline_summary(metrics_path: Path, keys) -> str:
    """``key first (step s) → last (step t)`` for each of ``keys`` recorded in ``metrics_path`` (a resumed run
    reports from the first record of the whole run, not of this start)."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    parts = []
    for key in keys:
        seen = [r for r in records if isinstance(r.get(key), (int, float))]
        if seen:
            a, b = seen[0], seen[-1]
            parts.append(f"{key} {a[key]:.3f} (step {a['step']}) → {b[key]:.3f} (step {b['step']})")
    return ", ".join(parts) or "no metrics recorded"


__all__ = ["run", "validate", "headline_summary", "USER_ERRORS"]
