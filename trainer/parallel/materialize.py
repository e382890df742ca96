"""Build the model a rank trains: on the meta device first, then only what this rank holds is allocated.

``HybridLM(config)`` on a real device would allocate every parameter of the model on every rank (~126 GB
of fp32 for nano3) before expert parallelism throws most experts away. Instead the model is built on
``meta`` (no memory), cut to this rank's experts there (:func:`~.expert.shard_experts`), materialised on the
rank's device, and initialised tensor by tensor from seeded per-name streams
(:meth:`~tandem.model.hybrid.HybridLM.init_weights`): the same seed gives the same full state dict for
any world size and expert-parallel size. Peak memory while building is what the rank keeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from tandem.model import HybridConfig, HybridLM
from tandem.model.checkpoint import load_checkpoint_into, read_config
from tandem.trainer.config import ConfigError

from .distributed import DistInfo
from .context import apply_context_parallel
from .expert import apply_expert_parallel, shard_experts
from .fsdp import local_pieces

__all__ = ["build_model", "load_frozen"]

log = logging.getLogger(__name__)


def _check_ep(config: HybridConfig, ep: int, what: str = "the model") -> None:
    if "E" not in config.hybrid_override_pattern:
        raise ConfigError(f"parallel.ep={ep} but {what} has no MoE layer")
    if config.n_routed_experts % ep:
        raise ConfigError(f"parallel.ep={ep} must divide n_routed_experts ({config.n_routed_experts}) of {what}")


def build_model(config: HybridConfig, info: DistInfo, *, init_seed: int | None, cp_attention: str = "sdpa",
                prepare: Callable[[HybridLM], object] | None = None,
                shard: Callable[[HybridLM], None] | None = None) -> HybridLM:
    """The model this rank trains: its experts only under expert parallelism, initialised from ``init_seed``.

    ``prepare(model)``: what must happen before any engine wraps the model (activation checkpointing,
    precision recipes, compilation). ``shard(model)``: an engine that shards the model itself (FSDP2's
    ``fully_shard``, :attr:`~.engines.EngineSpec.shard_on_meta`) — then the model is prepared and sharded
    while still on ``meta``, and only this rank's shards are allocated and initialised (each tensor's value
    drawn whole, one at a time, and its piece kept: the same values as an unsharded build). ``init_seed=None``
    draws a seed on rank 0 and shares it; the recipes always give one.
    """
    model = HybridLM(config, device="meta")
    if info.ep > 1:
        _check_ep(config, info.ep)
        shard_experts(model, info.ep, dist.get_rank(info.ep_group))
    seed = _shared_seed(init_seed, info)
    if shard is None:
        model.to_empty(device=info.device)
        model.init_weights(seed=seed)
    if info.ep > 1:
        apply_expert_parallel(model, info.ep_group)  # marks expert parameters, installs the all-to-all
    if info.cp > 1:
        apply_context_parallel(model, info.cp_group, cp_attention)  # K/V gathers and Mamba state passing over the CP group
    if prepare is not None:
        prepare(model)
    if shard is not None:
        shard(model)
        model.to_empty(device=info.device)
        with torch.no_grad():
            model.init_weights(seed=seed, pieces=local_pieces(model))
    _zero_token_counts(model)
    return model


def _shared_seed(seed: int | None, info: DistInfo) -> int:
    if seed is not None:
        return seed
    drawn = torch.randint(0, 2**62, (1,))
    if info.distributed:
        drawn = drawn.to(info.device)
        dist.broadcast(drawn, src=0)
    return int(drawn.item())


def _zero_token_counts(model: HybridLM) -> None:
    """The one non-persistent buffer (not in checkpoints, not set by ``init_weights``): per-expert token counts."""
    for m in model.modules():
        if isinstance(getattr(m, "tokens_per_expert_acc", None), torch.Tensor):
            m.tokens_per_expert_acc.zero_()


def load_frozen(folder: str | Path, info: DistInfo, *, dtype: torch.dtype, what: str = "the model") -> HybridLM:
    """A frozen model read from a weights folder (``config.json`` + safetensors: tandem's or the released
    NemotronH layout), laid out like the trained model: under expert parallelism it is built on ``meta``, cut
    to this rank's experts, and only those are allocated and read from the files; its MoE layers then
    exchange tokens over the same EP group (so its forward is collective — its expert parameters are
    marked, :func:`~.expert.is_expert_param` — and must be generated from through
    :class:`~.lockstep.LockstepGeneration`). A model without MoE layers, or
    whose expert count the EP size does not divide, is read whole (no collective; logged). Dense weights are
    whole on every rank (a frozen model has no gradients or optimizer state to shard, and decoding from
    gathered weights is what FSDP would do anyway). Parameters in ``dtype`` (the MoE router stays fp32),
    eval mode, ``requires_grad`` off.

    Used for the RLHF judge (its own architecture, read from its folder; ``what`` names it in logs).
    """
    config = read_config(folder)
    model = HybridLM(config, device="meta")
    shard = info.ep > 1 and "E" in config.hybrid_override_pattern and config.n_routed_experts % info.ep == 0
    if info.ep > 1 and not shard:
        log.info("%s: no MoE layer or %d experts not divisible by parallel.ep=%d: read whole on every rank", what,
                 config.n_routed_experts, info.ep)
    if shard:
        shard_experts(model, info.ep, dist.get_rank(info.ep_group))
    model = model.to(dtype=dtype).to_empty(device=info.device)
    _zero_token_counts(model)
    load_checkpoint_into(model, folder)  # under EP: only this rank's experts are read
    if shard:
        apply_expert_parallel(model, info.ep_group)
    return model.eval().requires_grad_(False)

