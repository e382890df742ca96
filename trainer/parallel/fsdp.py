"""PyTorch FSDP2 (``fully_shard``) as a data-parallel engine of the shared loop, composed with expert parallelism.

What is sharded where (meshes from :func:`~tandem.trainer.parallel.distributed.device_meshes`):

- every hybrid block is one FSDP unit over the ``dp`` mesh (all ranks): its dense parameters, gradients and
  AdamW state are split ``world`` ways and all-gathered one block at a time in forward and backward;
- each MoE layer's routed experts (already cut to this rank's ``E / ep`` experts by expert parallelism) are
  a unit of their own over the ``edp`` mesh (the ``world / ep`` ranks holding the same experts), as
  torchtitan does for MoE; their gradients are reduce-scattered over that group only;
- each MoE router (``gate``) is a unit of its own so that it keeps fp32 parameters under a bf16 policy
  (the release stores it in fp32 and routing is sensitive to its precision);
- the root unit holds the rest: embeddings, ``backbone.norm_f`` and ``lm_head`` (a loss may read
  ``lm_head.weight`` inside ``HybridLM.forward``, where the root's parameters are unsharded).

Gradient scale: the loop multiplies each micro-batch loss by ``world / global target tokens``, so every
gradient must be divided by the *world* size. FSDP divides by its mesh size, which is the world for dense
units; expert units would divide by ``world / ep``, so they are told to divide by the world
(``set_gradient_divide_factor``): an expert shard's gradient already sums the tokens of its whole EP group.
The result is Σ token-loss gradients / global tokens, the single-process gradient.

Mixed precision: on CUDA ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (``parallel.
fsdp_param_dtype``); sharded parameters and the optimizer stay fp32. On CPU everything is fp32.

Checkpoints: :meth:`FSDPEngine.sharded_state_dict` is model + optimizer state for
``torch.distributed.checkpoint`` under global names and shapes: dense tensors are the FSDP ``DTensor``
shards; expert tensors are re-described as pieces of the whole ``[E, ...]`` tensor (``Shard(0)`` over
``ep``, then FSDP's placement over ``edp``) so a checkpoint written at one (world, EP) loads at any other.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from tandem.model.checkpoint_io import CheckpointError, LocalPiece
from tandem.model.hybrid import HybridBlock
from tandem.model.moe import GroupedExperts, MoE
from tandem.trainer.config import ConfigError, ParallelConfig

from .distributed import DistInfo, Meshes, all_reduce_sum, device_meshes
from .expert import is_expert_param
from .lockstep import RESHARD_ATTR

__all__ = ["FSDPEngine", "apply_fsdp", "expert_param_names", "fsdp_param_dtype", "is_sharded", "local_pieces", "shard_model"]


def fsdp_param_dtype(parallel: ParallelConfig, device: torch.device) -> torch.dtype | None:
    """The compute dtype FSDP casts parameters to (None = keep fp32): ``auto`` is bf16 on CUDA, fp32 on CPU."""
    choice = parallel.fsdp_param_dtype
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp32": None}[choice]


def expert_param_names(model: nn.Module) -> dict[str, GroupedExperts]:
    """Names of the expert-parallel (sliced) expert parameters → their module."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, GroupedExperts) and m.num_experts != m.total_experts:
            for proj in ("up_proj", "down_proj"):
                out[f"{name}.{proj}"] = m
    return out


def apply_fsdp(model: nn.Module, meshes: Meshes, *, world_size: int, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True) -> None:
    """``fully_shard`` the model in place: routers, experts, each block, then the root (see the module doc)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import Shard

    # GroupedExperts returns its output through an identity autograd Function (a view of the GEMM result);
    # FSDP warns that an in-place op on it would skip its hook. The MoE only reads it out of place
    # (index_copy into a new tensor), so the warning is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPGroupedExperts\) returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    fp32 = MixedPrecisionPolicy()
    edp_size = meshes.edp.size()

    def expert_placement(p: nn.Parameter):
        # Fewer local experts than expert-data-parallel ranks: shard each expert's rows instead, so every rank
        # holds a piece (dim 0 would leave some ranks empty and others padded).
        return Shard(0) if p.shape[0] >= edp_size else Shard(1)

    for block in model.backbone.layers:
        assert isinstance(block, HybridBlock), type(block)
        mixer = block.mixer
        if isinstance(mixer, MoE):
            fully_shard(mixer.gate, mesh=meshes.dp, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
            fully_shard(mixer.experts, mesh=meshes.edp, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=expert_placement)
            mixer.experts.set_gradient_divide_factor(float(world_size))
            # gloo has no PREMUL_SUM: scale around a plain SUM instead. Not on a one-rank mesh (world = EP): there
            # torch 2.13's FSDP2 divides twice under forced-sum reduction (once in its no-communication copy,
            # once after), halving the expert gradients (measured: grad norm 3e-4 off one process at world 2, EP 2)
            if meshes.edp.device_type == "cpu" and edp_size > 1:
                mixer.experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=meshes.dp, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        for m in (block, mixer.gate, mixer.experts) if isinstance(mixer, MoE) else (block,):
            setattr(m, RESHARD_ATTR, reshard_after_forward)  # restored after generation gathers everything
        register_fsdp_forward_method(block, "forward_cached")  # generation's cached step (GRPO rollouts)
    # The root keeps FSDP's own choice (reshard_after_forward unset): not resharded after forward, since backward
    # needs it at once — and so ``lm_head`` stays usable right after ``hidden_states`` (generation calls both).
    fully_shard(model, mesh=meshes.dp, mp_policy=mp)
    setattr(model, RESHARD_ATTR, False)  # the root: FSDP's default for it (see above)
    register_fsdp_forward_method(model, "hidden_states")  # what generation and chunked losses call


def shard_model(model: nn.Module, info: DistInfo, parallel: ParallelConfig) -> None:
    """``fully_shard`` a model that is still on ``meta`` (:func:`~.materialize.build_model` then allocates
    only each rank's shards): the run's meshes, mixed-precision policy and resharding choice, expert
    parameters marked again (``fully_shard`` replaced the Parameter objects)."""
    apply_fsdp(model, device_meshes(info), world_size=info.world_size, param_dtype=fsdp_param_dtype(parallel, info.device),
               reshard_after_forward=parallel.fsdp_reshard_after_forward)
    params = dict(model.named_parameters())
    for n in expert_param_names(model):
        params[n].expert_parallel = True


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local_pieces(model: nn.Module) -> dict[str, LocalPiece]:
    """For every sharded (DTensor) parameter of ``model``: the piece this rank holds of the whole tensor — its
    local shard and where that lies (FSDP2 cuts ``Shard(d)`` like ``torch.chunk``: ranks hold
    ``ceil(n / size)`` rows each, the last ones fewer or none). What :meth:`HybridLM.init_weights` and
    :func:`~tandem.model.checkpoint.load_checkpoint_into` write into (no collective). Empty for a model
    without DTensors. Call under ``torch.no_grad()`` when the pieces will be written."""
    from torch.distributed.tensor import DTensor, Shard

    out = {}
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            continue
        if p.device_mesh.ndim != 1 or len(p.placements) != 1 or not isinstance(p.placements[0], Shard):
            raise RuntimeError(f"{name}: expected one Shard placement on a 1-D mesh, got {p.placements}")
        dim = p.placements[0].dim
        n, size, rank = p.shape[dim], p.device_mesh.size(), p.device_mesh.get_local_rank()
        chunk = -(-n // size)
        start = min(rank * chunk, n)
        local = p.to_local()
        if local.shape[dim] != min(n, start + chunk) - start:
            raise RuntimeError(f"{name}: local shard {tuple(local.shape)} is not torch.chunk's piece {rank} of "
                               f"{tuple(p.shape)} over {size} ranks along dim {dim}")
        out[name] = LocalPiece(local, dim, start)
    return out


class FSDPEngine:
    """FSDP2 over the ``dp`` / ``edp`` meshes, same methods as :class:`~.data_parallel.DataParallelEngine`."""

    #: checkpoints of this engine are torch.distributed.checkpoint directories (see trainer/checkpoint)
    sharded_checkpoints = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, parallel: ParallelConfig):
        from torch.distributed.tensor import DTensor

        if optimizer.state:
            raise RuntimeError("build the FSDP engine before the optimizer has state (it re-binds the parameters)")
        self.model, self.optimizer, self.info = model, optimizer, info
        self.meshes = device_meshes(info)
        self.param_dtype = fsdp_param_dtype(parallel, info.device)
        names = {id(p): n for n, p in model.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        if not is_sharded(model):  # built whole (tests, or a caller of its own): share rank 0's weights, then cut
            self._broadcast_replicated()
            apply_fsdp(model, self.meshes, world_size=info.world_size, param_dtype=self.param_dtype,
                       reshard_after_forward=parallel.fsdp_reshard_after_forward)
        # else sharded on meta by shard_model (what `tandem` runs): each rank already holds only its shards
        # fully_shard replaced every parameter by a DTensor parameter: point the optimizer at the new ones, and
        # mark the expert ones again (attributes do not carry over).
        params = dict(model.named_parameters())
        for g, gn in zip(optimizer.param_groups, group_names):
            g["params"] = [params[n] for n in gn]
        self.experts = expert_param_names(model)
        for n in self.experts:
            params[n].expert_parallel = True

    @torch.no_grad()
    def _broadcast_replicated(self) -> None:
        """Rank 0's dense weights and persistent buffers everywhere before sharding (each rank keeps its chunk
        of its own copy; identical copies make the shards one model whatever each rank's RNG did)."""
        if not self.info.distributed:
            return
        for p in self.model.parameters():
            if not is_expert_param(p):
                dist.broadcast(p.data, src=0)
        persistent = set(self.model.state_dict())
        for name, b in self.model.named_buffers():
            if name in persistent:
                dist.broadcast(b, src=0)

    # -- the loop's interface ------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Accumulate one micro-batch; gradients are reduce-scattered only after the step's last one."""
        self.model.set_requires_gradient_sync(last)
        loss.backward()

    def finish_step(self, max_norm: float, loss_finite: bool = True) -> tuple[torch.Tensor, bool]:
        norm = self.grad_norm_and_clip(max_norm)
        stepped = loss_finite and bool(torch.isfinite(norm))
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    def grad_norm_and_clip(self, max_norm: float) -> torch.Tensor:
        """The true global gradient norm, then clip to ``max_norm``.

        Dense gradients are shards over all ranks (their norm is a partial sum over ``dp``); expert gradients
        are shards over ``edp`` of this EP slice's experts, so their squared norm is completed over ``edp`` by
        the DTensor and then summed over the EP group — every expert counted once.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        dense = [p.grad for p in params if not is_expert_param(p)]
        expert = [p.grad for p in params if is_expert_param(p)]
        sq = _squared_norm(dense, self.info.device)
        if expert:
            e_sq = _squared_norm(expert, self.info.device)
            if self.info.ep > 1:
                dist.all_reduce(e_sq, op=dist.ReduceOp.SUM, group=self.info.ep_group)
            sq = sq + e_sq
        norm = sq.sqrt()
        if max_norm > 0 and torch.isfinite(norm):
            # one call per mesh: a foreach kernel cannot mix DTensors of the dp and edp meshes
            for group in ([p for p in params if not is_expert_param(p)], [p for p in params if is_expert_param(p)]):
                if group:
                    torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
        return norm

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.info)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _global(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a parameter or optimizer tensor of ``name``) under its global shape (see the module doc)."""
        m = self.experts.get(name)
        if m is None or t.dim() == 0:
            return t
        from torch.distributed.tensor import DTensor

        from torch.distributed.tensor import Replicate

        local = t.to_local() if isinstance(t, DTensor) else t
        inner = t.placements[0] if isinstance(t, DTensor) else Replicate()
        shape = (m.total_experts, *t.shape[1:])
        return DTensor.from_local(local, self.meshes.experts, [_shard(0), inner], run_check=False,
                                  shape=torch.Size(shape), stride=_contiguous_stride(shape))

    def reshard(self) -> None:
        """Every unit back to its shards (the root stays gathered after a forward without backward, e.g. an
        evaluation); done before anything reads the parameters as state."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def sharded_state_dict(self) -> dict:
        """``{"model": ..., "optim": ...}`` for ``torch.distributed.checkpoint``: this rank's pieces under
        global, layout-independent names and shapes. Tensors share storage with the live ones, so
        ``dcp.load`` into this dict followed by :meth:`load_sharded_state_dict` restores the run."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        self.reshard()
        model_sd = get_model_state_dict(self.model)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer)  # creates zero AdamW state if none yet
        model_sd = {k: self._global(k, v) for k, v in model_sd.items()}
        state = {k: {s: self._global(k, v) if torch.is_tensor(v) else v for s, v in entry.items()}
                 for k, entry in optim_sd["state"].items()}
        return {"model": model_sd, "optim": {"state": state, "param_groups": optim_sd["param_groups"]}}

    @torch.no_grad()
    def load_sharded_state_dict(self, loaded: dict, source) -> None:
        """Apply a :meth:`sharded_state_dict` that ``dcp.load`` filled (from any layout)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        from torch.distributed.tensor import DTensor

        self.reshard()
        live = dict(self.model.state_dict())
        for k, v in loaded["model"].items():  # dcp.load wrote into storage shared with the live tensors
            dest, src = _local(live[k]), _local(v)
            if src.data_ptr() != dest.data_ptr():
                dest.copy_(src)
        optim = loaded["optim"]
        names = {n for g in optim["param_groups"] for n in g["params"]}
        mine = {n for n, _ in self.model.named_parameters()}
        if names != mine:
            raise CheckpointError(f"{source}: optimizer state is for other parameters than this model's "
                                  f"(missing {sorted(mine - names)[:3]}, unexpected {sorted(names - mine)[:3]})")
        params = dict(self.model.named_parameters())
        state = {}
        for k, entry in optim["state"].items():
            state[k] = {}
            for s, v in entry.items():
                if torch.is_tensor(v) and k in self.experts and v.dim() > 0:
                    v = v.to_local()
                    if isinstance(params[k], DTensor):
                        v = DTensor.from_local(v, params[k].device_mesh, params[k].placements, run_check=False,
                                               shape=params[k].shape, stride=params[k].stride())
                state[k][s] = v
        set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": optim["param_groups"]})

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model state dict on every rank (all-gathers every tensor; for tests and small models —
        checkpoints use :meth:`sharded_state_dict` and never gather)."""
        self.reshard()
        return {k: _full(self._global(k, v)) for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> dict:
        """AdamW state by parameter name with whole tensors (the gathered layout of the other engines; collective)."""
        sd = self.sharded_state_dict()["optim"]
        state = {k: {s: _full(v) for s, v in entry.items()} for k, entry in sd["state"].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "param_names": list(g["params"])}
                  for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, saved: dict, source) -> None:
        """Restore a by-name optimizer state with whole tensors (a checkpoint of the ddp or zero engine)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        self.reshard()
        if len(saved["param_groups"]) != len(self.optimizer.param_groups):
            raise CheckpointError(f"{source}: optimizer has {len(saved['param_groups'])} parameter groups, "
                                  f"expected {len(self.optimizer.param_groups)}")
        state = {}
        for name, entry in saved["state"].items():
            m = self.experts.get(name)
            state[name] = {k: (v[m.expert_offset: m.expert_offset + m.num_experts] if m is not None and torch.is_tensor(v)
                               and v.dim() > 0 else v) for k, v in entry.items()}
        groups = [{**{k: v for k, v in g.items() if k != "param_names"}, "params": list(g["param_names"])}
                  for g in saved["param_groups"]]
        set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))

    def local_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds of parameters and of optimizer state (local shards only)."""
        return {"params": sum(_local(p).numel() * p.element_size() for p in self.model.parameters()),
                "optimizer": sum(_local(v).numel() * v.element_size() for st in self.optimizer.state.values()
                                 for v in st.values() if torch.is_tensor(v))}


def _shard(dim: int):
    from torch.distributed.tensor import Shard

    return Shard(dim)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Σ g² over ``grads`` (DTensors of one mesh or plain tensors) as a plain fp32 scalar on ``device``."""
    if not grads:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm(grads)
    return _full(norm).float() ** 2
