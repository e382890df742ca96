"""The hybrid stack: embeddings → blocks ``x + mixer(rmsnorm(x))`` → ``norm_f`` → untied ``lm_head``.

Module names follow the released NemotronH checkpoints (``backbone.embeddings``, ``backbone.layers.{i}
.norm``/``.mixer``, ``backbone.norm_f``, ``lm_head``), so a state dict maps onto the safetensors layout
key for key except that routed experts are stored stacked (``experts.up_proj [E, I, H]``) here and per
expert in files; :mod:`model.checkpoint` does that mapping.

Training memory (docs/LONG_CONTEXT.md): ``model(ids, seq_idx, labels=labels)`` returns per-token losses
computed in chunks by :class:`~tandem.model.loss.LMHead` (no [B, T, V] logits); packed attention never
builds a [T, T] mask (:mod:`model.attention`); :meth:`HybridLM.set_activation_checkpointing` recomputes
the blocks of chosen layer kinds in the backward instead of keeping their activations.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, PackedDocuments
from .cache import HybridCache
from .checkpoint_io import LocalPiece
from .config import LAYER_KINDS, HybridConfig
from .loss import LMHead
from .mamba2 import Mamba2Mixer
from .mlp import MLP
from .moe import GroupedExperts, MoE, TopKRouter
from .norms import GatedRMSNorm, RMSNorm


def _dense_mlp(config: HybridConfig, layer_idx: int) -> MLP:
    return MLP(config.hidden_size, config.intermediate_size, config.mlp_bias, config.mlp_hidden_act)


MIXERS = {"M": Mamba2Mixer, "*": Attention, "-": _dense_mlp, "E": MoE}


def _generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator for one tensor: seeded by (``seed``, ``key``) through a stable hash, not Python's
    salted ``hash``, so every process and every run draws the same stream for the same name."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def activation_checkpointing_kinds(spec) -> frozenset[str]:
    """``"all"``, ``"none"`` / None / ``[]``, one layer kind or a list of them → the set of kinds
    (``mamba``, ``attention``, ``mlp``, ``moe``). Raises ``ValueError`` naming what was expected."""
    kinds = frozenset(LAYER_KINDS.values())
    if spec is None:
        return frozenset()
    if isinstance(spec, str):
        if spec == "all":
            return kinds
        spec = [] if spec == "none" else [spec]
    try:
        chosen = frozenset(spec)
    except TypeError:
        chosen = None
    if chosen is None or not all(isinstance(k, str) for k in chosen):
        raise ValueError(f"expected 'all', 'none' or a list of layer kinds {sorted(kinds)}, got {spec!r}")
    unknown = chosen - kinds
    if unknown:
        raise ValueError(f"unknown layer kind(s) {sorted(unknown)}; expected 'all', 'none' or a list of {sorted(kinds)}")
    return chosen


class HybridBlock(nn.Module):
    """``x + mixer(norm(x))``. With ``activation_checkpointing`` (set per layer kind by
    :meth:`HybridLM.set_activation_checkpointing`) the block keeps only its input for the backward and
    recomputes the rest there (``torch.utils.checkpoint``, non-reentrant, RNG state restored so attention
    dropout repeats). The checkpoint sits inside ``forward``, so hooks a wrapper puts on the block (FSDP
    units) stay outside the recomputed region, and the mixer's modules run again on recompute, so
    parameter-gathering hooks inside (ZeRO-3) fire again.

    MoE blocks: the recompute runs the router, the dispatch and its collectives again (under expert
    parallelism: every rank recomputes the same layers in the same order in its backward, so the
    all-to-alls pair up; early stopping is off so each recompute runs the whole forward on every rank).
    It must not record routing twice: :attr:`MoE.record_routing` is off while it runs, so token counts
    and the aux loss (already added to the loss from the original forward) are left as they were.
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.hybrid_override_pattern[layer_idx]
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = MIXERS[self.kind](config, layer_idx)
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None,
                docs: PackedDocuments | None = None) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, seq_idx, docs, use_reentrant=False, context_fn=self._contexts,
                              early_stop=self.kind != "E")
        return self._forward(x, seq_idx, docs)

    def _forward(self, x, seq_idx, docs):
        if self.kind in "*M":
            return x + self.mixer(self.norm(x), seq_idx, docs)
        return x + self.mixer(self.norm(x), seq_idx)

    def _contexts(self):
        """(original forward, recompute) contexts of the checkpoint."""
        if self.kind == "E":
            return contextlib.nullcontext(), _not_recording(self.mixer)
        return contextlib.nullcontext(), contextlib.nullcontext()

    def forward_cached(self, x: torch.Tensor, cache: HybridCache, new_lengths: torch.Tensor | None) -> torch.Tensor:
        """Inference step with a cache; MLP/MoE layers are per token and need none."""
        h = self.norm(x)
        if self.kind == "M":
            if x.shape[1] == 1 and new_lengths is None:
                return x + self.mixer.decode(h, cache)
            return x + self.mixer.prefill(h, cache, new_lengths)
        if self.kind == "*":
            return x + self.mixer.forward_cached(h, cache)
        return x + self.mixer(h)

    def decode_static(self, x: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """One token per row at fixed shapes (see :meth:`HybridLM.decode_step`)."""
        h = self.norm(x)
        if self.kind == "M":
            return x + self.mixer.decode(h, cache)
        if self.kind == "*":
            return x + self.mixer.decode_static(h, cache)
        return x + self.mixer(h)

    def extra_repr(self) -> str:
        ac = ", activation_checkpointing" if self.activation_checkpointing else ""
        return f"layer={self.layer_idx}, kind={self.kind!r}{ac}"


@contextlib.contextmanager
def _not_recording(moe: MoE):
    moe.record_routing = False
    try:
        yield
    finally:
        moe.record_routing = True


class HybridBackbone(nn.Module):
    #: context parallelism: set by the trainer (``trainer/parallel/context.py``); None = single rank.
    #: Under it ``input_ids``/``seq_idx`` are this rank's load-balanced slice and ``seq_idx`` holds global
    #: document ids; the layout (global ``seq_idx``, one gather) is built once per forward.
    cp = None

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None,
                cache: HybridCache | None = None, new_lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embeddings(input_ids)
        if cache is None:
            # one document layout per forward, shared by every attention layer (and their recomputes)
            if self.cp is not None:
                if seq_idx is None:  # one document per row
                    seq_idx = torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)
                docs = PackedDocuments(seq_idx, context=self.cp)
            else:
                docs = PackedDocuments(seq_idx) if seq_idx is not None else None
            for layer in self.layers:
                h = layer(h, seq_idx, docs)
        else:
            if self.cp is not None:
                raise ValueError("a cache (generation) cannot run under context parallelism; remove it first "
                                 "(trainer.parallel.context.remove_context_parallel)")
            for layer in self.layers:
                h = layer.forward_cached(h, cache, new_lengths)
            cache.advance(new_lengths, input_ids.shape[1])
        return self.norm_f(h)


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int  # parameters a token touches: everything but the routed experts it is not sent to
    embedding: int  # input embedding table (counted in total and active)

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


class HybridLM(nn.Module):
    """Hybrid Mamba-2 / attention / MoE causal LM.

    >>> from model import HybridConfig, HybridLM
    >>> model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    >>> logits = model(torch.randint(0, 512, (2, 24)))          # [2, 24, 512]

    ``seq_idx`` [B, T] (document index per token, non-decreasing) packs several documents in one row:
    Mamba conv/SSM state resets and attention stays within each document (no [T, T] mask is built).

    Training: ``model(ids, seq_idx, labels=labels)`` → per-token cross-entropy [B, T] computed in chunks
    (``loss_chunk_tokens``), never the [B, T, V] logits; ``set_activation_checkpointing(kinds)`` trades
    recompute for activation memory per layer kind. See ``docs/LONG_CONTEXT.md``.

    Inference: pass a :class:`~model.cache.HybridCache` (``model.allocate_cache(batch, max_len)``) as
    ``cache=``; the input continues each row from its cached state and the cache is updated in place.
    ``lengths`` [B] gives each row's number of real tokens in a right-padded input (prefill of prompts
    of different lengths); a ``[B, 1]`` input without ``lengths`` takes the single-token decode path
    (conv update + SSM recurrence). See ``docs/GENERATION.md``.
    Build on the meta device with ``HybridLM(cfg, device="meta")`` or inside ``with torch.device("meta")``
    (no memory, no init); ``init_seed`` makes the initialisation reproducible.
    """

    def __init__(self, config: HybridConfig, *, init_seed: int | None = None, device: torch.device | str | None = None):
        super().__init__()
        config.validate()
        self.config = config
        device = torch.device(device) if device is not None else torch.get_default_device()
        # Modules are built on meta and materialised once: no memory or time spent on PyTorch's default
        # init (which init_weights replaces), and the global RNG is left untouched.
        with torch.device("meta"):
            self.backbone = HybridBackbone(config)
            self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights(seed=init_seed)

    def to_empty(self, *, device, recurse: bool = True):
        super().to_empty(device=device, recurse=recurse)
        for m in self.modules():  # runtime counters are not weights: start them at zero
            if isinstance(m, MoE):
                m.tokens_per_expert_acc.zero_()
        return self

    # ------------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None, *,
                      cache: HybridCache | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] (what ``lm_head`` reads; chunked losses start here)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seqlen], got shape {tuple(input_ids.shape)}")
        if seq_idx is not None and seq_idx.shape != input_ids.shape:
            raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if cache is None:
            if lengths is not None:
                raise ValueError("lengths is only meaningful with a cache; without one, pack documents with seq_idx")
            return self.backbone(input_ids, seq_idx)
        if seq_idx is not None:
            raise ValueError("seq_idx cannot be combined with a cache: give right-padded rows and their lengths instead")
        b, t = input_ids.shape
        if b != cache.batch:
            raise ValueError(f"input batch {b} does not match the cache's batch {cache.batch}")
        cache.check_room(t)
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long, device=input_ids.device)
            if lengths.shape != (b,):
                raise ValueError(f"lengths must be [batch] = ({b},), got {tuple(lengths.shape)}")
        return self.backbone(input_ids, cache=cache, new_lengths=lengths)

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None, *,
                cache: HybridCache | None = None, lengths: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, temperature: float = 1.0, entropy: bool = False):
        """``input_ids`` [B, T] → logits [B, T, V] (with ``cache``: continuing from it; see the class doc).

        With ``labels`` [B, T] (next-token ids; negative = ignored): per-token cross-entropy [B, T] fp32 of
        ``softmax(logits / temperature)`` instead, computed in chunks without ever holding [B, T, V]
        (:class:`~tandem.model.loss.LMHead`); 0 at ignored positions. ``entropy=True`` returns
        ``(cross-entropy, entropy)``, the entropy without gradient. The loss is computed here, in the
        model's forward, so DDP / FSDP2 / DeepSpeed wrappers see one forward as usual.
        """
        if labels is None:
            if entropy:
                raise ValueError("entropy=True needs labels")
            return self.lm_head(self.hidden_states(input_ids, seq_idx, cache=cache, lengths=lengths))
        if cache is not None:
            raise ValueError("labels (a training loss) cannot be combined with a cache")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        return self.lm_head(self.hidden_states(input_ids, seq_idx), labels, temperature=temperature, entropy=entropy)

    def decode_step(self, tokens: torch.Tensor, cache: HybridCache, advance: torch.Tensor | None = None) -> torch.Tensor:
        """The static-shape decode step: ``tokens`` [B] (row ``b``'s token goes to position
        ``cache.lengths[b]``) → logits [B, V]; then ``cache.lengths += advance`` ([B] of 0/1, None: all 1).

        Every shape is fixed by the cache (batch, ``max_len``), nothing reads a tensor on the host and
        nothing depends on Python-side counters, so ``torch.compile`` traces it once for a whole generation:
        attention writes its key/value by index and attends over the whole ``max_len`` under a position
        mask (:meth:`Attention.decode_static <tandem.model.attention.Attention.decode_static>`); Mamba's
        conv window and SSM state are updated in place at their fixed sizes; MoE routing is per token with
        static-size counts. A finished row stays in the batch with ``advance = 0``: it keeps rewriting its
        own next slot and never outgrows ``max_len``, so the step never changes shape. No checks here (they
        would cost host work every token); the engine validates once per wave. ``cache.seen`` is not
        touched (the static path never slices by it).
        """
        h = self.backbone.embeddings(tokens[:, None])
        for layer in self.backbone.layers:
            h = layer.decode_static(h, cache)
        cache.lengths.add_(1 if advance is None else advance)
        return self.lm_head(self.backbone.norm_f(h))[:, 0]

    # ------------------------------------------------------------------------------------------------
    def set_activation_checkpointing(self, kinds) -> frozenset[str]:
        """Recompute the blocks of these layer kinds in the backward (``"all"``, ``"none"``, or a list of
        ``mamba`` / ``attention`` / ``mlp`` / ``moe``); returns the set. Gradients are unchanged; only
        what is kept between forward and backward is. See :class:`HybridBlock`."""
        chosen = activation_checkpointing_kinds(kinds)
        for layer in self.backbone.layers:
            layer.activation_checkpointing = LAYER_KINDS[layer.kind] in chosen
        return chosen

    @property
    def loss_chunk_tokens(self) -> int | None:
        """Tokens per chunk of the label path's logits (None: 256 MiB of fp32 logits per chunk)."""
        return self.lm_head.chunk_tokens

    @loss_chunk_tokens.setter
    def loss_chunk_tokens(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"loss_chunk_tokens must be a positive integer or None, got {value!r}")
        self.lm_head.chunk_tokens = value

    def allocate_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> HybridCache:
        """An empty :class:`HybridCache` for this model (its device; KV in ``dtype``, default the model's)."""
        p = self.lm_head.weight
        return HybridCache.allocate(self.config, batch, max_len, device=p.device, dtype=dtype or p.dtype)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' auxiliary losses from the last training forward (None if there are none)."""
        losses = [m.aux_loss() for m in self.modules() if isinstance(m, MoE)]
        losses = [x for x in losses if x is not None]
        return torch.stack(losses).sum() if losses else None

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, *, pieces: Mapping[str, LocalPiece] | None = None) -> None:
        """Initialise for pretraining from scratch (a no-op on the meta device).

        Linear/embedding/router/expert weights ~ N(0, initializer_range); biases 0; norms 1; conv1d
        PyTorch's default. Mamba-2: ``dt_bias`` = softplus⁻¹(dt) with dt log-uniform in
        [time_step_min, time_step_max] floored at time_step_floor, ``A_log = log(U[1, 16])``, ``D = 1``.
        With ``rescale_prenorm_residual`` every projection that writes into the residual stream
        (Mamba ``out_proj``, attention ``o_proj``, MLP/expert ``down_proj``) is divided by √num_layers
        (GPT-2 / Megatron scaled init). ``seed`` makes it reproducible without touching the global RNG.

        Every tensor — every routed expert separately — draws from its own stream, seeded by ``seed`` and
        its name (the expert's *global* id), so the values do not depend on what else this process holds:
        a model whose experts were cut to a slice (:meth:`GroupedExperts.keep_experts`, expert
        parallelism) gets the same values as the unsharded model, whatever the layout.

        ``pieces`` (parameter name → :class:`~.checkpoint_io.LocalPiece`): parameters cut across processes
        (a sharded data-parallel model) get only their piece of the same values — each tensor's whole value
        is drawn (one tensor at a time) and its piece kept; experts another piece holds are not drawn.
        """
        if any(p.is_meta for p in self.parameters()):
            return
        cfg = self.config
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        std = cfg.initializer_range
        rescale = 1.0 / math.sqrt(cfg.num_hidden_layers) if cfg.rescale_prenorm_residual else 1.0
        pieces = pieces or {}

        def put(name: str, t: torch.Tensor, value) -> None:
            """Write ``value()`` (the whole tensor's fp32 value) into ``t`` or into its piece."""
            piece = pieces.get(name)
            if piece is None:
                t.copy_(value().to(t.dtype))
            elif piece.length:
                piece.tensor.copy_(piece.take(value()).to(piece.tensor.dtype))

        def put_expert(name: str, t: torch.Tensor, i: int, value) -> None:
            """Expert ``i`` (local index) of a stacked expert tensor."""
            piece = pieces.get(name)
            if piece is None:
                t[i].copy_(value().to(t.dtype))
            elif piece.dim == 0:
                if piece.start <= i < piece.start + piece.length:
                    piece.tensor[i - piece.start].copy_(value().to(piece.tensor.dtype))
            elif piece.length:
                piece.tensor[i].copy_(piece.take(value(), dim_offset=1).to(piece.tensor.dtype))

        def normal(shape, key: str, s: float = std):
            return lambda: torch.randn(shape, generator=_generator(seed, key), dtype=torch.float32).mul_(s)

        def uniform(shape, key: str, lo: float, hi: float):
            return lambda: torch.rand(shape, generator=_generator(seed, key), dtype=torch.float32) * (hi - lo) + lo

        def const(shape, v: float):
            return lambda: torch.full(shape, v, dtype=torch.float32)

        for name, module in self.named_modules():
            pre = f"{name}." if name else ""
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual_out = name.endswith(("out_proj", "o_proj", "down_proj"))
                w = module.weight
                put(pre + "weight", w, normal(w.shape, f"{name}.weight", std * (rescale if residual_out else 1.0)))
                if getattr(module, "bias", None) is not None:
                    put(pre + "bias", module.bias, const(module.bias.shape, 0.0))
            elif isinstance(module, nn.Conv1d):
                fan_in = module.weight.shape[1] * module.weight.shape[2]
                bound = 1.0 / math.sqrt(fan_in)  # = PyTorch's default kaiming_uniform(a=√5) bound
                put(pre + "weight", module.weight, uniform(module.weight.shape, f"{name}.weight", -bound, bound))
                if module.bias is not None:
                    put(pre + "bias", module.bias, uniform(module.bias.shape, f"{name}.bias", -bound, bound))
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                put(pre + "weight", module.weight, const(module.weight.shape, 1.0))
            elif isinstance(module, TopKRouter):
                put(pre + "weight", module.weight, normal(module.weight.shape, f"{name}.weight"))
                module.e_score_correction_bias.zero_()  # a buffer: never cut
            elif isinstance(module, GroupedExperts):
                # one stream per *global* expert: a shard holding experts [offset, offset + n) gets exactly
                # the slices an unsharded model would
                up, down = module.up_proj, module.down_proj
                for i in range(module.num_experts):
                    e = module.expert_offset + i
                    put_expert(pre + "up_proj", up, i, normal(up.shape[1:], f"{name}.up_proj.{e}"))
                    put_expert(pre + "down_proj", down, i, normal(down.shape[1:], f"{name}.down_proj.{e}", std * rescale))
            elif isinstance(module, Mamba2Mixer):
                lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)

                def dt_bias(module=module, name=name):
                    u = torch.rand(module.num_heads, generator=_generator(seed, f"{name}.dt_bias"))
                    dt = torch.exp(u * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
                    return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)

                def a_log(module=module, name=name):
                    return torch.log(torch.rand(module.num_heads, generator=_generator(seed, f"{name}.A_log")) * 15.0 + 1.0)

                put(pre + "dt_bias", module.dt_bias, dt_bias)
                put(pre + "A_log", module.A_log, a_log)
                put(pre + "D", module.D, const(module.D.shape, 1.0))

    # ------------------------------------------------------------------------------------------------
    def parameter_count(self) -> ParameterCount:
        """Total and per-token-active parameters of the whole model (works on the meta device).

        Counts every routed expert of every layer even when this process holds only a slice of them
        (expert parallelism): the figure is the model's, not one rank's share.
        """
        total = 0
        inactive = 0
        for module in self.modules():
            total += sum(p.numel() for p in module.parameters(recurse=False))
            if isinstance(module, GroupedExperts):
                per_expert = (module.up_proj.numel() + module.down_proj.numel()) // max(module.num_experts, 1)
                total += (module.total_experts - module.num_experts) * per_expert
            if isinstance(module, MoE):
                experts = module.experts
                per_expert = (experts.up_proj.numel() + experts.down_proj.numel()) // max(experts.num_experts, 1)
                inactive += (experts.total_experts - module.gate.top_k) * per_expert
        return ParameterCount(total=total, active=total - inactive, embedding=self.backbone.embeddings.weight.numel())

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        config_overrides: dict | None = None,
        strict: bool = True,
    ) -> "HybridLM":
        """Load a NemotronH checkpoint directory (released "backbone" layout, safetensors only).

        See :func:`model.checkpoint.load_pretrained`.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, config_overrides=config_overrides, strict=strict)

    def save_pretrained(self, path: str | Path, *, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` + safetensors in the released layout; see :func:`model.checkpoint.save_pretrained`."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)
