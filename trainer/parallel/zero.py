"""DeepSpeed ZeRO (stages 1, 2, 3) as the data-parallel engine of the shared loop.

Same interface as :class:`~tandem.trainer.parallel.data_parallel.DataParallelEngine` (``backward`` per micro-batch,
``finish_step``, ``full_state_dict``, ``optimizer_state`` / ``load_optimizer_state``), so the loop does not
know which engine runs it. DeepSpeed owns gradient reduction (reduce-scatter into partitions), clipping
(``gradient_clipping``) and the partitioned optimizer; its JSON config is generated from the Hydra config
by :func:`deepspeed_config`. Runs on DeepSpeed's CPU accelerator over gloo here and on CUDA on clusters.

Checkpoints stay in the trainer's parallelism-independent layout: weights gathered (ZeRO-3:
``GatheredParameters``) into the HF layout, optimizer state gathered per parameter name with DeepSpeed's
``safe_get_full_optimizer_state`` and scattered back with ``safe_set_full_optimizer_state`` — so a ZeRO-2
run resumes without ZeRO, or at another world size, and vice versa.

With expert parallelism (``parallel.ep > 1``) DeepSpeed is told which parameters are experts
and which groups reduce them, reusing the megatron-core groups built by ``init_distributed``
(:func:`_register_expert_groups`): the expert-parallel and expert-data-parallel groups go into
``deepspeed.utils.groups`` under DeepSpeed's name ``ep_size_<EP>``; expert parameters get
``allreduce = False`` and ``group_name``; the optimizer's groups are split into dense and expert (``moe``)
groups; a parameterless marker subclassing ``deepspeed.moe.layer.MoE`` switches on DeepSpeed's MoE paths
(ZeRO-1/2). ZeRO-3 refuses that marker; there each expert parameter carries its partition group and
DeepSpeed's AutoEP placement family instead (:func:`_place_experts_for_zero3`).
DeepSpeed then divides every gradient by the data-parallel size and sums dense gradients over the
data-parallel group, expert gradients over the expert-data-parallel group — the same reduction as
:class:`~tandem.trainer.parallel.data_parallel.DataParallelEngine`, which the loop's ``world / global tokens`` loss scale
expects — and partitions each expert group's optimizer state (ZeRO-3: also its weights) over the
expert-data-parallel group; the global gradient norm counts each expert shard once.

All DeepSpeed glue (its private pieces included) lives in this one module; the DeepSpeed version is pinned
and the ZeRO-vs-single-process equivalence tests (with and without EP) fail loudly if an upgrade breaks it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tandem.model.checkpoint_io import CheckpointError
from tandem.model.moe import MoE

from tandem.trainer.checkpoint.optimizer_state import expert_slices
from tandem.trainer.config import ConfigError, OptimConfig, ParallelConfig, StageConfig

from .distributed import DistInfo, all_reduce_sum
from .expert import gather_full_state_dict, is_expert_param

__all__ = ["DeepSpeedEngine", "deepspeed_config"]



def deepspeed_config(parallel: ParallelConfig, optim: OptimConfig, stage: StageConfig, world_size: int,
                     cp: int = 1) -> dict:
    """DeepSpeed's JSON config from the run config (fp32 master weights; autocast is the loop's).

    ``cp`` > 1 (context parallelism): DeepSpeed treats every rank as data-parallel, so each CP slice of a
    row counts as one of its samples — micro-batches per step follow the data-parallel size
    ``world / cp`` and its ``train_batch_size`` is ``global_batch · cp``."""
    if parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3 for DeepSpeed, got {parallel.zero_stage}")
    world_size //= cp
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
        "train_batch_size": stage.global_batch * cp,
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
    import importlib

    from deepspeed.accelerator import get_accelerator

    # importlib, not ``import deepspeed.comm.torch as m``: that form binds ``deepspeed.comm``'s attribute
    # ``torch`` — the torch package itself, which deepspeed.comm imports — and the patch would miss (measured:
    # the op was still built, 90–150 s on the first ZeRO start of a fresh machine)
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

    if get_accelerator().device_name() == "cpu":
        ds_comm_torch.build_shm_op = lambda: None


# -- expert parallelism: DeepSpeed's view of our experts -------------------------------------------------
def _register_expert_groups(info: DistInfo) -> str:
    """Register the megatron-core expert-parallel / expert-data-parallel groups with DeepSpeed.

    DeepSpeed looks expert groups up by name (``ep_size_<EP>``) in private dicts of
    ``deepspeed.utils.groups``; filling them with the groups ``init_distributed`` already built keeps one
    topology (DeepSpeed would otherwise build its own when a ``MoE`` layer asks). Returns the name.
    """
    from deepspeed.utils import groups

    name = f"ep_size_{info.ep}"
    for table, ranks_table, group in (
        (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, info.ep_group),
        (groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, info.expert_dp_group),
    ):
        ranks = dist.get_process_group_ranks(group)
        if name in ranks_table and list(ranks_table[name]) != ranks:
            raise RuntimeError(f"DeepSpeed already has an expert group {name} over ranks {ranks_table[name]}, not {ranks}")
        table[name], ranks_table[name] = group, ranks
    return name


def _mark_expert_params(model: nn.Module, group_name: str) -> list[str]:
    """DeepSpeed's expert-parameter marks (``deepspeed.moe.utils.is_moe_param``); returns their names."""
    names = []
    for n, p in model.named_parameters():
        if is_expert_param(p):
            p.allreduce, p.group_name = False, group_name
            names.append(n)
    return names


def _attach_moe_marker(model: nn.Module, group_name: str, ep: int) -> None:
    """Add a parameterless ``deepspeed.moe.layer.MoE`` submodule so DeepSpeed turns on its MoE handling.

    ZeRO-1/2 route expert gradients and partitions only when ``engine.has_moe_layers``, which DeepSpeed sets
    from ``isinstance(module, deepspeed.moe.layer.MoE)``. Our MoE layers stay single-device modules
    (model/ knows nothing of DeepSpeed); this marker carries what DeepSpeed reads (``num_experts``,
    ``num_local_experts``, ``expert_group_name``) and nothing else: no parameters or buffers, so the state
    dict is unchanged, and it is never called.
    """
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    num_experts = max(m.num_experts for m in model.modules() if isinstance(m, MoE))

    class ExpertParallelMarker(DeepSpeedMoE):
        def __init__(self):
            nn.Module.__init__(self)  # not DeepSpeedMoE.__init__: no gate/experts of its own
            self.ep_size, self.num_experts, self.num_local_experts = ep, num_experts, num_experts // ep
            self.expert_group_name = group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups are megatron-core's, registered by _register_expert_groups

        def forward(self, *args, **kwargs):
            raise RuntimeError("the DeepSpeed MoE marker is not a layer")

    model.add_module("deepspeed_moe_marker", ExpertParallelMarker())


def _place_experts_for_zero3(model: nn.Module, group_name: str, expert_dp_group) -> None:
    """ZeRO-3: partition each expert parameter over the expert-data-parallel group, as an expert.

    ZeRO-3 rejects models containing ``deepspeed.moe.layer.MoE`` (so no marker here) but reads per-parameter
    placement when it converts parameters: ``ds_zero_partition_process_group`` picks the partition group,
    and the ``autoep_expert`` placement family (what DeepSpeed's AutoEP sets on its experts) makes stage 3
    divide expert gradients by the data-parallel size (not the partition size) and add the expert-parallel
    group's norm terms to the global gradient norm.
    """
    for p in model.parameters():
        if is_expert_param(p):
            p.ds_zero_partition_process_group = expert_dp_group
            p.ds_zero_placement_family = "autoep_expert"
            p.ds_zero_partition_group_name = group_name


def _split_expert_param_groups(optimizer: torch.optim.Optimizer) -> None:
    """Split each optimizer group into its dense part and an expert part (``moe: True``), in place.

    DeepSpeed's ZeRO-1/2 partition a ``moe`` group over the expert-data-parallel group named by its
    ``name``. Every split group remembers its original group in ``origin`` so checkpoints can merge them
    back into the engine-independent layout. Called before any optimizer state exists.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    assert not optimizer.state, "split the optimizer's groups before it has state"
    named = []
    for i, g in enumerate(optimizer.param_groups):
        origin = g.get("name", f"group{i}")
        named.append({**g, "params": list(g["params"]), "name": origin, "origin": origin})
    split = split_params_into_different_moe_groups_for_optimizer(named)
    optimizer.param_groups[:] = [g for g in split if g["params"]]


class DeepSpeedEngine:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo,
                 parallel: ParallelConfig, optim: OptimConfig, stage: StageConfig):
        _skip_cpu_shm_op()
        import deepspeed

        self.model, self.info = model, info
        self.zero_stage = parallel.zero_stage
        self.config = deepspeed_config(parallel, optim, stage, info.world_size, info.cp)
        if self.zero_stage == 3 and self.config["gradient_accumulation_steps"] > 1:
            # Measured with deepspeed 0.19.8 on the CPU accelerator: ZeRO-3 keeps only the last
            # micro-batch's gradient when accumulating (global norm 1/√2 of the reference with two
            # micro-batches), so it would silently train on part of each batch.
            raise ConfigError(
                f"parallel.zero_stage=3 needs one micro-batch per rank per step (gradient accumulation under "
                f"ZeRO-3 loses gradients with this DeepSpeed): set stage.micro_batch="
                f"{stage.global_batch // info.world_size} (= global_batch / {info.world_size} ranks)"
            )
        # The engine-independent groups (checkpoints are saved and checked in this layout).
        names = {id(p): n for n, p in model.named_parameters()}
        self._origin_groups = [(g.get("name", f"group{i}"), [names[id(p)] for p in g["params"]])
                               for i, g in enumerate(optimizer.param_groups)]
        self._expert_slices: dict[str, tuple[int, int]] = {}
        if info.ep > 1:
            group_name = _register_expert_groups(info)
            _mark_expert_params(model, group_name)
            if self.zero_stage == 3:
                _place_experts_for_zero3(model, group_name, info.expert_dp_group)
            else:
                _attach_moe_marker(model, group_name, info.ep)
                _split_expert_param_groups(optimizer)
            self._expert_slices = expert_slices(model)
        self._group_param_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        self._group_origins = [g.get("origin", g.get("name", f"group{i}")) for i, g in enumerate(optimizer.param_groups)]
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
        """The full model state dict on every rank (collective under ZeRO-3 and under EP)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in self._state_dict().items()}
        return self._state_dict()

    def _state_dict(self) -> dict[str, torch.Tensor]:
        if self.info.ep > 1:
            return gather_full_state_dict(self.model, self.info.ep_group)
        return self.model.state_dict()

    def optimizer_state(self) -> dict:
        """AdamW state by parameter name, gathered from the ZeRO partitions (collective).

        Expert tensors are also all-gathered over the expert-parallel group (all experts, global order), and
        the groups are saved as the model's own (dense and expert parts merged), so the file is the same
        whatever engine, ZeRO stage or EP size wrote it.
        """
        from deepspeed.utils import safe_get_full_optimizer_state

        self._ensure_optimizer_state()
        step = self._inner_step()
        state = {}
        for name, p in self.model.named_parameters():
            entry = {}
            for k in ("exp_avg", "exp_avg_sq"):
                v = safe_get_full_optimizer_state(p, k)
                if v is None:
                    continue
                v = v.detach().clone()
                if name in self._expert_slices:
                    parts = [torch.empty_like(v) for _ in range(self.info.ep)]
                    dist.all_gather(parts, v.contiguous(), group=self.info.ep_group)
                    v = torch.cat(parts)
                entry[k] = v.cpu()
            if entry:
                entry["step"] = torch.tensor(float(step))
            state[name] = entry
        inner = self.optimizer.optimizer
        groups = []
        for origin, names in self._origin_groups:
            parts = [g for g, o in zip(inner.param_groups, self._group_origins) if o == origin]
            hyper = {k: v for k, v in parts[0].items() if k not in ("params", "moe", "origin")} if parts else {}
            groups.append({**hyper, "name": origin, "param_names": names})
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, saved: dict, source) -> None:
        """Scatter a by-name optimizer state (from any engine or topology) into the ZeRO partitions.

        Saved groups are the model's own groups; this engine's groups may be their dense and expert parts
        (EP), so parameter names are checked per original group and hyper-parameters copied to every part.
        """
        from deepspeed.utils import safe_set_full_optimizer_state

        self._ensure_optimizer_state()
        params = dict(self.model.named_parameters())
        step = None
        for name, entry in saved["state"].items():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in entry:
                    v = entry[k]
                    if name in self._expert_slices:  # this rank's experts of the full tensor
                        lo, n = self._expert_slices[name]
                        v = v[lo: lo + n]
                    safe_set_full_optimizer_state(params[name], v.to(params[name].device), k)
            if "step" in entry:
                step = entry["step"]
        saved_groups = [(sg.get("name", f"group{i}"), sg) for i, sg in enumerate(saved["param_groups"])]
        if len(saved_groups) != len(self._origin_groups):
            raise CheckpointError(f"{source}: optimizer has {len(saved_groups)} parameter groups, expected {len(self._origin_groups)}")
        inner = self.optimizer.optimizer
        for (origin, names), (_, sg) in zip(self._origin_groups, saved_groups):
            if sorted(sg.get("param_names", [])) != sorted(names):
                raise CheckpointError(f"{source}: optimizer parameter group {sg.get('name')!r} holds other parameters than this model's")
            for g, o in zip(inner.param_groups, self._group_origins):
                if o == origin:
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

