"""DeepSpeed ZeRO (stages 1, 2, 3) as the data-parallel engine of the shared loop.

Same interface as :class:`trainer.distributed.DataParallelEngine` (``backward`` per micro-batch,
``finish_step``, ``full_state_dict``, ``optimizer_state`` / ``load_optimizer_state``), so the loop does not
know which engine runs it. DeepSpeed owns gradient reduction (reduce-scatter into partitions), clipping
(``gradient_clipping``) and the partitioned optimizer; its JSON config is generated from the Hydra config
by :func:`deepspeed_config`. Runs on DeepSpeed's CPU accelerator over gloo here and on CUDA on clusters.

Checkpoints stay in the trainer's parallelism-independent layout: weights gathered (ZeRO-3:
``GatheredParameters``) into the HF layout, optimizer state gathered per parameter name with DeepSpeed's
``safe_get_full_optimizer_state`` and scattered back with ``safe_set_full_optimizer_state`` — so a ZeRO-2
run resumes without ZeRO, or at another world size, and vice versa.

All DeepSpeed glue (its private pieces included) lives in this one module; the DeepSpeed version is pinned
and the ZeRO-vs-single-process equivalence test fails loudly if an upgrade breaks it.
"""

from __future__ import annotations

import torch

from model.checkpoint import CheckpointError

from .config import OptimConfig, ParallelConfig, StageConfig
from .distributed import ConfigError, DistInfo, all_reduce_sum

__all__ = ["DeepSpeedEngine", "deepspeed_config"]


def deepspeed_config(parallel: ParallelConfig, optim: OptimConfig, stage: StageConfig, world_size: int) -> dict:
    """DeepSpeed's JSON config from the run config (fp32 master weights; autocast is the loop's)."""
    if parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3 for DeepSpeed, got {parallel.zero_stage}")
    gas, rem = divmod(stage.global_batch, stage.micro_batch * world_size)
    if rem or gas < 1:
        raise ConfigError(
            f"stage.global_batch ({stage.global_batch}) must be a multiple of stage.micro_batch ({stage.micro_batch}) "
            f"× data-parallel size ({world_size})"
        )
    zero = {"stage": parallel.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if parallel.zero_stage == 3:
        # Partition every parameter, however small (the default keeps small ones whole, which would
        # leave a tiny test model unpartitioned).
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": stage.global_batch,
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": optim.clip_grad,
        "zero_optimization": zero,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _skip_cpu_shm_op() -> None:
    """On DeepSpeed's CPU accelerator, skip JIT-compiling its shared-memory all-reduce op.

    That op (~90 s of C++ compilation on first start) only speeds up CPU all-reduce within a node; gloo
    already does the collectives here, and GPU runs never build it.
    """
    import deepspeed.comm.torch as ds_comm_torch
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        ds_comm_torch.build_shm_op = lambda: None


class DeepSpeedEngine:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo,
                 parallel: ParallelConfig, optim: OptimConfig, stage: StageConfig):
        if info.ep > 1:
            raise ConfigError("parallel.zero_stage > 0 with parallel.ep > 1 is not supported yet; use ZeRO with ep=1 "
                              "or expert parallelism with zero_stage=0")
        _skip_cpu_shm_op()
        import deepspeed

        self.model, self.info = model, info
        self.zero_stage = parallel.zero_stage
        self.config = deepspeed_config(parallel, optim, stage, info.world_size)
        if self.zero_stage == 3 and self.config["gradient_accumulation_steps"] > 1:
            # Measured with deepspeed 0.19.8 on the CPU accelerator: ZeRO-3 keeps only the last
            # micro-batch's gradient when accumulating (global norm 1/√2 of the reference with two
            # micro-batches), so it would silently train on part of each batch.
            raise ConfigError(
                f"parallel.zero_stage=3 needs one micro-batch per rank per step (gradient accumulation under "
                f"ZeRO-3 loses gradients with this DeepSpeed): set stage.micro_batch="
                f"{stage.global_batch // info.world_size} (= global_batch / {info.world_size} ranks)"
            )
        names = {id(p): n for n, p in model.named_parameters()}
        self._group_param_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, dist_init_required=False,
        )

    # -- the loop's interface ------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """DeepSpeed's own accumulation pattern: backward then ``step`` for every micro-batch; the engine
        applies the optimizer only at its accumulation boundary (``gradient_accumulation_steps`` =
        micro-batches per rank per step, so its boundary is our last micro-batch)."""
        if self.engine.is_gradient_accumulation_boundary() != last:
            raise RuntimeError("DeepSpeed's accumulation boundary is out of step with the loop's micro-batches")
        # We normalise by global tokens ourselves: no division by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def finish_step(self, max_norm: float, loss_finite: bool = True) -> tuple[torch.Tensor, bool]:
        """The step already happened at the boundary (clipped by DeepSpeed's ``gradient_clipping``).

        DeepSpeed skips the update itself when the global gradient norm is not finite (its overflow
        check), which is what a non-finite loss produces; we report that as a skipped step.
        """
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float(norm) if norm is not None else float("nan"))
        return norm, loss_finite and bool(torch.isfinite(norm))

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.info)

    # -- checkpoints ---------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict on every rank (collective under ZeRO-3)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.model.state_dict()

    def optimizer_state(self) -> dict:
        """AdamW state by parameter name, gathered from the ZeRO partitions (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._ensure_optimizer_state()
        step = self._inner_step()
        state = {}
        for name, p in self.model.named_parameters():
            entry = {}
            for k in ("exp_avg", "exp_avg_sq"):
                v = safe_get_full_optimizer_state(p, k)
                if v is not None:
                    entry[k] = v.detach().clone().cpu()
            if entry:
                entry["step"] = torch.tensor(float(step))
            state[name] = entry
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "param_names": names}
                  for g, names in zip(self.optimizer.optimizer.param_groups, self._group_param_names)]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, saved: dict, source) -> None:
        """Scatter a by-name optimizer state (from any engine or topology) into the ZeRO partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        self._ensure_optimizer_state()
        params = dict(self.model.named_parameters())
        step = None
        for name, entry in saved["state"].items():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in entry:
                    safe_set_full_optimizer_state(params[name], entry[k].to(params[name].device), k)
            if "step" in entry:
                step = entry["step"]
        inner = self.optimizer.optimizer
        for names, sg in zip(self._group_param_names, saved["param_groups"]):
            if sorted(sg.get("param_names", [])) != sorted(names):
                raise CheckpointError(f"{source}: optimizer parameter group {sg.get('name')!r} holds other parameters than this model's")
        for g, sg in zip(inner.param_groups, saved["param_groups"]):
            g.update({k: v for k, v in sg.items() if k in ("lr", "betas", "eps", "weight_decay", "amsgrad")})
        if step is not None:
            for st in inner.state.values():
                if "step" in st:
                    st["step"] = step.clone() if torch.is_tensor(st["step"]) else float(step)

    def _ensure_optimizer_state(self) -> None:
        """Make every partition's AdamW state exist and be visible to DeepSpeed's per-parameter views.

        torch's AdamW creates its state lazily at the first step, and DeepSpeed (ZeRO-1/2) links each
        parameter's view of it once, after the step of the *first* parameter group — so with several
        groups (decay / no-decay) the other groups' views stay empty, and before any step nothing exists.
        Creating the state (zeros, step 0: what AdamW's lazy init does) and re-linking fixes both.
        """
        inner = self.optimizer.optimizer
        if self.zero_stage == 3:  # stage 3 keeps its fp32 partitions outside the groups between steps
            flat = list(self.optimizer.fp32_partitioned_groups_flat)
        else:
            flat = [p for group in inner.param_groups for p in group["params"]]
        for p in flat:
            st = inner.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _inner_step(self) -> int:
        for st in self.optimizer.optimizer.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

