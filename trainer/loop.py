"""The one training loop every stage runs.

Per optimizer step: the stage's micro-batches for this rank → forward/backward of each loss *sum*
scaled by ``world_size / global target tokens`` → gradient all-reduce (engine) → clip → NaN/inf guard →
optimizer step with the scheduled learning rate. Around it: periodic evaluation, logging sinks,
checkpoints, and preemption (SIGTERM/SIGUSR1/SIGINT → finish the step, checkpoint, exit with
:data:`PREEMPTED_EXIT_CODE`).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field

import torch

from .autocast import LOW_PRECISION, autocast_context  # noqa: F401  (re-exported)
from .checkpoint import CheckpointManager
from .config import ConfigError, RunConfig
from .metrics import memory_peak_bytes
from .optim import lr_at
from .parallel import DistInfo, Engine
from .stages.base import Stage, loss_weights

log = logging.getLogger(__name__)

#: exit status after a checkpoint-and-exit on SIGTERM/SIGUSR1/SIGINT (EX_TEMPFAIL); Slurm scripts requeue on it
PREEMPTED_EXIT_CODE = 75


class TrainingDiverged(RuntimeError):
    pass


class Preempted(SystemExit):
    def __init__(self, checkpoint):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.checkpoint = checkpoint


def check_stage_name(saved: str | None, stage: str) -> None:
    """A run resumes only a checkpoint of its own stage (ConfigError otherwise); ``saved`` None: unknown."""
    if saved is not None and saved != stage:
        raise ConfigError(f"checkpoint is from stage {saved!r}, this run is {stage!r}; "
                          f"start the new stage from its weights with model.init_from=<checkpoint> instead")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (including skipped non-finite ones)
    tokens: int = 0  # real (non-padding) input tokens trained on, summed over all ranks
    target_tokens: int = 0  # tokens that carried loss, summed over all ranks
    nan_skipped: int = 0
    nan_consecutive: int = 0
    extra: dict = field(default_factory=dict)  # e.g. the wandb run id


class Trainer:
    def __init__(self, cfg: RunConfig, model, stage: Stage, engine: Engine | None, info: DistInfo,
                 checkpoints: CheckpointManager, sinks=(), flops_per_token: float | None = None,
                 peak_flops: float | None = None, state: TrainerState | None = None):
        self.cfg, self.model, self.stage, self.engine, self.info = cfg, model, stage, engine, info
        self.checkpoints = checkpoints
        self.sinks = list(sinks)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.state = state or TrainerState()
        self._signal: int | None = None
        # Called after every step with ``finite``; each returns metrics merged into the step's record
        # (e.g. tandem.trainer.parallel.expert_balance.ExpertBalancer: expert-bias update and load metrics).
        self.step_hooks: list = []
        self.memory_base = 0  # bytes in use before the model was built (set by run); logged with the peak

    # ------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        total = cfg.stage.steps
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        record: dict = {}
        try:
            self.model.train()
            t_last, tokens_last = time.perf_counter(), self.state.tokens
            start = self.state.step
            while self.state.step < total:
                step = self.state.step
                out = self._train_step(step, total)
                self.state.step += 1
                self.state.tokens += int(out["input_tokens"])
                self.state.target_tokens += int(out["target_tokens"])
                is_last = self.state.step == total
                do_eval = cfg.stage.eval_batches > 0 and (
                    (cfg.stage.eval_every and self.state.step % cfg.stage.eval_every == 0) or is_last
                )
                if do_eval:
                    out.update(self.evaluate())
                # the first step of every start is logged too: early feedback, and the stage's start-up metrics
                # (e.g. GRPO's held-out reward of the starting weights) are in it
                first = self.state.step == start + 1
                if first or self.state.step % cfg.logger.log_every == 0 or is_last or do_eval or not out["finite"]:
                    now = time.perf_counter()
                    tok_s = (self.state.tokens - tokens_last) / max(now - t_last, 1e-9)
                    t_last, tokens_last = now, self.state.tokens
                    record = self._record(step, total, out, tok_s)
                    for sink in self.sinks:
                        sink.log(record)
                if cfg.stage.save_every and self.state.step % cfg.stage.save_every == 0 and not is_last:
                    self.save(blocking=False)  # (in the background with stage.async_save and a sharded engine)
                if self._stop_requested():
                    path = self.save()
                    log.warning("signal %s: checkpoint written to %s; exiting with %d", self._signal, path, PREEMPTED_EXIT_CODE)
                    raise Preempted(path)
            self.save()
            return record
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------------------------------------
    def _train_step(self, step: int, total: int) -> dict:
        cfg, engine = self.cfg, self.engine
        lr = lr_at(step, total, cfg.optim)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        batches = self.stage.batches_for_step(step)
        # the counts are read on the host copies, before the move: no device sync for them
        local_targets = sum(float(self.stage.target_tokens(b)) for b in batches)
        local_inputs = sum(float(self.stage.input_tokens(b)) for b in batches)
        # what the summed loss is divided by: the target tokens, or their weights where a batch weighs them
        local_weight = (sum(float(loss_weights(b).sum()) for b in batches)
                        if any("loss_weight" in b for b in batches) else local_targets)
        batches = [{k: v.to(self.info.device) for k, v in b.items()} for b in batches]
        global_targets, global_inputs, global_weight = engine.all_reduce_sum([local_targets, local_inputs, local_weight])
        if global_targets <= 0 or global_weight <= 0:
            raise TrainingDiverged(f"step {step}: the batch has no target tokens (every loss_mask is 0)")
        # the loss is the weighted mean over all ranks' target tokens (weights 1 but for CPT's task documents)
        scale = self.info.world_size / global_weight
        # loss and stage metrics accumulate on the device (float64) and come to the host once per step
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.info.device)
        metric_acc: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with autocast_context(cfg.precision.name, self.info.device):
                out = self.stage.loss(self.model, batch)
            engine.backward(out.loss_sum * scale, last=i == len(batches) - 1)
            loss_acc = loss_acc + out.loss_sum.detach().double()
            for k, v in out.metrics.items():
                v = torch.as_tensor(v).detach().to(device=loss_acc.device, dtype=torch.float64).reshape(())
                prev = metric_acc.get(k)
                metric_acc[k] = v if prev is None else torch.maximum(prev, v) if k in self.stage.max_metrics else prev + v
        names = sorted(metric_acc)
        loss_sum, *values = torch.stack([loss_acc, *(metric_acc[n] for n in names)]).tolist()
        metric_sums = dict(zip(names, values))
        (global_loss,) = engine.all_reduce_sum([loss_sum])
        loss = global_loss / global_weight
        metrics = self._reduce_metrics(metric_sums, global_targets)
        # reduce gradients, clip, and step only if the loss and the gradient norm are finite
        grad_norm, finite = engine.finish_step(cfg.optim.clip_grad, loss_finite=math.isfinite(loss))
        if finite:
            self.state.nan_consecutive = 0
        else:
            self.state.nan_skipped += 1
            self.state.nan_consecutive += 1
            log.warning("step %d: non-finite loss %s / grad norm %s: update skipped (%d in a row)",
                        step, loss, grad_norm.item(), self.state.nan_consecutive)
            if self.state.nan_consecutive >= cfg.stage.nan_tolerance:
                raise TrainingDiverged(self._diagnose(step, loss))
        out = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "finite": finite, "target_tokens": global_targets,
               "input_tokens": global_inputs, **metrics}
        out.update(self.stage.after_step(step, finite))
        for hook in self.step_hooks:
            out.update(hook(finite))
        return out

    def _reduce_metrics(self, local: dict[str, float], global_targets: float) -> dict[str, float]:
        """The stage's ``LossOutput.metrics`` of this step over all ranks: token sums → sum / global target
        tokens; names in ``stage.max_metrics`` → the maximum. Every rank must report the same names."""
        names = sorted(local)
        if not names:
            return {}
        sums = [n for n in names if n not in self.stage.max_metrics]
        maxes = [n for n in names if n in self.stage.max_metrics]
        world, rank = self.info.world_size, self.info.rank
        # the maximum through the engine's only collective: each rank fills its own slot of a zero vector
        slots = [0.0] * (len(maxes) * world)
        for j, n in enumerate(maxes):
            slots[j * world + rank] = local[n]
        reduced = self.engine.all_reduce_sum([local[n] for n in sums] + slots)
        out = {n: v / global_targets for n, v in zip(sums, reduced)}
        rest = reduced[len(sums):]
        for j, n in enumerate(maxes):
            out[n] = max(rest[j * world: (j + 1) * world])
        return out

    def _diagnose(self, step: int, loss: float) -> str:
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        return (
            f"training diverged: {self.state.nan_consecutive} consecutive steps with non-finite loss/gradients "
            f"(last at step {step}, loss {loss}); {self.state.nan_skipped} skipped in total. "
            + (f"Non-finite parameters: {bad[:5]}. " if bad else "Parameters are still finite. ")
            + "Lower optim.lr, check the data around this step, or resume from an earlier checkpoint."
        )

    def evaluate(self) -> dict:
        """``{"val_loss": ...}`` over the stage's eval batches, or the stage's own evaluation
        (:meth:`Stage.evaluate`, e.g. GRPO's held-out reward); {} when there is nothing to evaluate."""
        custom = self.stage.evaluate(self.model)
        if custom is not None:
            return custom
        loss = self.eval_loss()
        return {} if loss is None else {"val_loss": loss}

    @torch.no_grad()
    def eval_loss(self) -> float | None:
        """Mean loss over the stage's held-out batches (all ranks), or None when they hold no target token."""
        self.model.eval()
        loss_sum = tokens = 0.0
        for batch in self.stage.eval_batches():
            batch = {k: v.to(self.info.device) for k, v in batch.items()}
            with autocast_context(self.cfg.precision.name, self.info.device):
                out = self.stage.loss(self.model, batch)
            loss_sum += out.loss_sum.double().item()
            tokens += float(out.num_tokens)
        loss_sum, tokens = self.engine.all_reduce_sum([loss_sum, tokens])
        self.model.train()
        return loss_sum / tokens if tokens > 0 else None

    def _record(self, step: int, total: int, out: dict, tok_s: float) -> dict:
        record = {
            "stage": self.stage.name, "step": step + 1, "total_steps": total, "loss": out["loss"], "lr": out["lr"],
            "grad_norm": out["grad_norm"], "tokens": self.state.tokens, "target_tokens": self.state.target_tokens,
            "tokens_per_s": tok_s,
            "nan_skipped": self.state.nan_skipped, **self.stage.step_info(step),
        }
        if "val_loss" in out:
            record["val_loss"] = out["val_loss"]
        # namespaced metrics: step hooks (moe/...), the stage's loss metrics and after_step (grpo/...)
        record.update({k: v for k, v in out.items() if "/" in k})
        # memory: the largest rank's peak so far, and its memory before the model was built (the runtime)
        peak = memory_peak_bytes(self.info.device)
        slots = [0.0] * (2 * self.info.world_size)
        slots[self.info.rank], slots[self.info.world_size + self.info.rank] = float(peak), float(self.memory_base)
        reduced = self.engine.all_reduce_sum(slots)
        worst = max(range(self.info.world_size), key=lambda r: reduced[r])
        record["mem_peak_gb"] = reduced[worst] / 1e9
        record["mem_base_gb"] = reduced[self.info.world_size + worst] / 1e9
        if self.flops_per_token and self.peak_flops:
            record["mfu"] = tok_s * self.flops_per_token / (self.peak_flops * self.info.world_size)
        return record

    # ------------------------------------------------------------------------------------------------
    def schedule(self) -> dict:
        """What the step order and the LR curve depend on, as ``{config key: value}``: stored in every
        checkpoint's trainer state and compared on resume (:meth:`restore`). The stage adds its data
        schedule (:meth:`Stage.schedule`). ``optim.lr``/``min_lr`` are not in it: the curve's shape is fixed,
        its height may be changed on a resume."""
        c = self.cfg
        out = {"stage.steps": c.stage.steps, "stage.global_batch": c.stage.global_batch,
               **{f"optim.{k}": getattr(c.optim, k) for k in ("schedule", "warmup_steps", "decay_fraction", "decay_style")}}
        out.update(self.stage.schedule())
        return json.loads(json.dumps(out))  # the JSON form the checkpoint holds (tuples → lists)

    def trainer_state(self) -> dict:
        return {
            "step": self.state.step, "tokens": self.state.tokens, "target_tokens": self.state.target_tokens,
            "nan_skipped": self.state.nan_skipped,
            "nan_consecutive": self.state.nan_consecutive, "stage": self.stage.name,
            "stage_state": self.stage.state_dict(), "schedule": self.schedule(), "extra": self.state.extra,
        }

    def save(self, blocking: bool = True):
        return self.checkpoints.save(self.state.step, self.engine, self.model.config, self.trainer_state(),
                                     blocking=blocking, rank_state=self.stage.rank_state())

    def restore(self, trainer_state: dict, source=None) -> None:
        """Continue from a checkpoint's trainer state (``source``: its path, for messages). Refuses
        (ConfigError) a run whose :meth:`schedule` differs from the checkpoint's, naming every difference,
        unless ``run.extend`` allows a changed ``stage.steps``; runs before anything is written."""
        check_stage_name(trainer_state["stage"], self.stage.name)
        self.state = TrainerState(
            step=trainer_state["step"], tokens=trainer_state["tokens"], target_tokens=trainer_state.get("target_tokens", 0),
            nan_skipped=trainer_state["nan_skipped"],
            nan_consecutive=trainer_state["nan_consecutive"], extra=trainer_state.get("extra", {}),
        )
        self.stage.load_state_dict(trainer_state["stage_state"])
        self._check_schedule(trainer_state.get("schedule"), source)

    def _check_schedule(self, stored: dict | None, source) -> None:
        where = f"checkpoint {source}" if source is not None else "the checkpoint"
        if stored is None:  # written before schedules were recorded
            log.warning("%s records no schedule: cannot check that this run continues it unchanged", where)
            return
        current = self.schedule()
        missing = object()
        changed = [k for k in sorted(set(stored) | set(current)) if stored.get(k, missing) != current.get(k, missing)]
        extendable = {"stage.steps"} if self.cfg.run.extend else set()
        refused = [k for k in changed if k not in extendable]
        if refused:
            show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"
            diffs = "; ".join(f"{k}: {show(stored, k)} -> {show(current, k)}" for k in refused)
            hint = (" To train it for a different number of steps, add run.extend=true." if refused == ["stage.steps"]
                    else " Keep the checkpoint's values, or start a new stage from its weights with model.init_from=<checkpoint> and a new run.dir.")
            raise ConfigError(f"{where} was trained with another schedule, so resuming would not continue it exactly: {diffs}.{hint}")
        if "stage.steps" in changed:
            old_total, step = stored["stage.steps"], self.state.step
            log.warning("run.extend: %s ran to step %d of %d; continuing to %d steps. LR at step %d: %.3g (old plan) -> %.3g",
                        where, step, old_total, self.cfg.stage.steps, step, lr_at(step, old_total, self.cfg.optim),
                        lr_at(step, self.cfg.stage.steps, self.cfg.optim))

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: finishing this step, then a checkpoint and exit (Ctrl-C again to abort without it)")
        self._signal = signum

    def _stop_requested(self) -> bool:
        (flag,) = self.engine.all_reduce_sum([1.0 if self._signal is not None else 0.0])
        return flag > 0
