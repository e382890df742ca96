"""Generation on a model whose forward has collectives (expert parallelism, FSDP2): ranks in lockstep.

GRPO generates on the training model, on every rank, each rank its own prompts. When the forward itself
communicates — the MoE all-to-all under ``parallel.ep > 1``, the per-block weight all-gather of FSDP2 —
every rank must run as many forwards as the busiest one; :class:`LockstepGeneration` does that.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["RESHARD_ATTR", "LockstepGeneration"]


class LockstepGeneration(nn.Module):
    """The model as a generation engine sees it when its forward communicates: every rank of ``group`` runs
    the same number of forwards, whatever its own prompts need.

    Under expert parallelism each MoE layer's all-to-all needs every rank of the EP group; under FSDP2 every
    block all-gathers its weights over the data-parallel mesh. But ranks generate different prompts: their
    prompts differ in length (prefill chunks), their rows stop at different steps, a rank may make more
    ``generate`` calls than another. So every forward through this wrapper is one *round*: the rank first
    adds 1 to an all-reduced count of working ranks, then runs its real forward. A rank that has finished
    calls :meth:`drain`, which adds 0 and, while the count says someone is still working, runs a one-token
    forward (no cache) so the others' all-to-alls have a partner; when a round counts 0 working ranks,
    every rank leaves. Use it as a context manager around a stretch of generation that has no other
    collective inside it (``with lockstep: ...`` drains on exit)::

        with LockstepGeneration(model, dist.group.WORLD) as m:
            results = GenerationEngine(m).generate(my_prompts, params)

    Under FSDP2 the region gathers the sharded weights once on entry and reshards them on exit (memory: the
    unsharded dense weights and this rank's experts, in the FSDP compute dtype, for the region's length), so
    the forwards themselves gather nothing. Cost: one all-reduce of one integer per forward; a working rank never reads it (no host sync for it on
    the device), a draining rank does (it has nothing else to do). The tokens a rank generates are the ones
    it would generate alone with all experts and whole weights (the collectives only move data; tested).
    Exposes what the engines use: ``forward``, ``hidden_states``, ``decode_step`` (the static engine),
    ``lm_head``, ``config``.
    """

    def __init__(self, model: nn.Module, group):
        super().__init__()
        self.inner = model
        self.group = group
        self._device = next(model.parameters()).device
        self._gathered: list[nn.Module] = []

    @property
    def config(self):
        return self.inner.config

    @property
    def lm_head(self):
        return self.inner.lm_head

    def _round(self, working: int) -> torch.Tensor:
        count = torch.tensor([working], dtype=torch.int64, device=self._device)
        dist.all_reduce(count, group=self.group)
        return count

    def forward(self, input_ids, **kwargs):
        """Logits, as ``HybridLM.forward`` without labels gives them — composed here from ``hidden_states``
        and ``lm_head`` instead of calling the model: under FSDP2 its forward nests the hooked
        ``hidden_states``, and the outer hook reshards the root's weights after every call (an all-gather
        per decoded token, and one that a rank running ``hidden_states`` alone would not join)."""
        self._round(1)
        return self.inner.lm_head(self.inner.hidden_states(input_ids, **kwargs))

    def hidden_states(self, *args, **kwargs):
        self._round(1)
        return self.inner.hidden_states(*args, **kwargs)

    def decode_step(self, tokens, cache, advance=None):
        """The static engine's step (``HybridLM.decode_step``) as one round. Its collectives are those of
        a one-token forward (the MoE all-to-all per MoE layer; under FSDP2 none: the region holds the
        weights gathered), so a draining rank's dummy forward partners it."""
        self._round(1)
        return self.inner.decode_step(tokens, cache, advance)

    @torch.no_grad()  # not inference_mode: FSDP2 unsharding needs version counters
    def drain(self) -> int:
        """Partner the other ranks' forwards until none is left; returns how many dummy forwards ran."""
        dummy = torch.zeros(1, 1, dtype=torch.long, device=self._device)
        was_training = self.inner.training
        self.inner.eval()
        n = 0
        try:
            while int(self._round(0)) > 0:
                self.inner.hidden_states(dummy)
                n += 1
        finally:
            self.inner.train(was_training)
        return n

    def __enter__(self) -> "LockstepGeneration":
        """Collective: FSDP2-sharded weights are gathered here once for the whole region (then no forward
        gathers any), instead of every block all-gathering its weights again at every decoded token."""
        self._gathered = _fsdp_modules(self.inner)
        for m in self._gathered:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self._gathered:
            m.unshard()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # after an error the other ranks cannot be partnered reliably; let it propagate
            return
        self.drain()
        for m in self._gathered:  # back to the training layout (sharded; each module's own reshard policy)
            m.reshard()
            m.set_reshard_after_forward(getattr(m, RESHARD_ATTR, True), recurse=False)
        self._gathered = []


#: set by the FSDP engine on every module it shards: that module's ``reshard_after_forward`` for training
RESHARD_ATTR = "tandem_reshard_after_forward"


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
