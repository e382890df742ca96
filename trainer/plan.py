"""Memory planner: the bytes one rank holds for a recipe on a cluster shape, per parallel layout
(``tandem plan``).

What each figure is made of:

- **Parameters** are counted exactly from the model built on the ``meta`` device (no memory): the dense
  part (replicated, or sharded over every data-parallel rank) and the routed experts (cut ``ep`` ways,
  then sharded over the expert-data-parallel ranks).
- **Weights, gradients, optimizer state, master copies and communication buffers** follow from what the
  chosen engine keeps (:data:`ENGINES`): torch AdamW holds two fp32 moments per parameter; DeepSpeed
  ZeRO 1–2 add an fp32 master copy of the partition they update; every engine keeps fp32 weights.
- **Activations are measured, not modelled**: one block of each layer kind, at the recipe's real widths
  and micro-batch shape (and the experts one rank holds), runs forward and backward on *fake* tensors
  (:class:`torch._subclasses.fake_tensor.FakeTensorMode`: shapes and dtypes, no memory, no arithmetic)
  under :class:`torch.distributed._tools.mem_tracker.MemTracker`, which records every tensor the autograd
  graph keeps and the backward's peak. So a 30B model at 8k tokens is measured in seconds on a laptop, and
  a change to the model's code (activation checkpointing, a fused loss, another attention path) changes
  the plan by itself. The output layer and loss are measured the same way at the real vocabulary.
  Two stand-ins make the fake run possible, each with the real footprint: the MoE token dispatcher gives
  every expert an equal share (the real one counts tokens per expert, a data-dependent size), and on CUDA
  the Mamba scan keeps exactly the Triton autograd function's saved set (:class:`_TritonScanFootprint`).
  Numerics: bf16 autocast on CUDA (the probe autocasts on the CPU; op coverage is close, not identical).

Peak per rank = weights + gradients + optimizer + master + max(activations kept at the end of the forward
+ the largest backward transient (+ autocast's bf16 weight copies on CUDA), communication buffers,
the optimizer step's temporaries). Gradients are counted whole from the first micro-batch on, since with
gradient accumulation they coexist with the next micro-batch's activations.

**Generating stages** (``grpo``, ``rlhf``) also hold, while they generate (never during the training
forward/backward, so the peak takes the larger): the policy's weights gathered in the compute dtype under
FSDP2 (the lockstep region unshards every block once), the rollouts' KV + SSM cache
(:meth:`~tandem.model.cache.HybridCache.bytes_for`: ``generations_per_prompt`` rows of up to
``data.seq_len`` tokens) and a prefill forward's live tensors (bounded by one block's training activations
at ``rows × prefill chunk`` tokens, or an attention layer's K/V over the cache with its heads expanded, if
larger). With ``kl_beta > 0`` the frozen reference copy of the policy is counted (fp32, the rank's share);
with ``rollout_backend=vllm`` the rollouts are vLLM's GPU share instead (it sleeps during training). ``rlhf`` adds its frozen judge: its weights for the whole run (in
``stage.rlhf.judge_dtype``: dense whole, experts cut ``ep`` ways) and, while it judges, its own cache and
forward; its architecture is read from ``stage.rlhf.judge`` when that folder is there, else assumed to be
the policy's (said in the output).

Validated against measured peaks (``mem_peak_gb − mem_base_gb`` of real runs, VmHWM on CPU) in
``tests/trainer/test_plan.py``; the tables in docs/PARALLELISM.md and docs/CLUSTER.md are printed by it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import types
from dataclasses import dataclass, field

import torch

from tandem.model.config import HybridConfig

__all__ = ["Cluster", "Generation", "Layout", "ParamInventory", "Plan", "generation_from_config", "inventory", "plan",
           "plan_main", "probe_block", "probe_head"]

GB = 1e9

#: elements in DeepSpeed's default reduce / all-gather buckets (``reduce_bucket_size``, ``allgather_bucket_size``)
_DS_BUCKET = 500_000_000
# Packed documents: attention runs per document (varlen on CPU, a FlexAttention block mask on CUDA) with
# O(T) memory, like the unpacked causal rows the probe runs; no [T, T] mask exists to add.


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_mem_gb: float = 80.0
    device: str = "cuda"  # cuda | cpu: which kernels and numerics the activations are measured for

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ParamInventory:
    dense: int  # every parameter that is not a routed expert
    expert: int  # routed experts, all of them
    largest_block: int  # parameters of the largest hybrid block (what a sharded engine gathers at once)
    largest_tensor: int
    blocks: tuple[tuple[int, int], ...] = ()  # (dense, expert) parameters of each hybrid block

    def largest_block_local(self, ep: int) -> float:
        """Parameters of the largest block one rank holds with experts cut ``ep`` ways."""
        return max((d + e / ep for d, e in self.blocks), default=0.0)


@dataclass(frozen=True)
class Layout:
    engine: str  # ddp | zero1 | zero2 | zero3 | fsdp
    ep: int = 1
    activation_checkpointing: frozenset = frozenset()  # layer kinds: mamba attention moe mlp
    cp: int = 1  # context parallelism: each rank holds seq_len / cp tokens of every row


@dataclass(frozen=True)
class Generation:
    """What a generating stage holds while it generates (see the module doc)."""

    rows: int  # rows of one generate call (GRPO: generations_per_prompt)
    max_len: int  # prompt + new tokens per row, at most
    prefill_chunk: int = 2048  # prompt positions per prefill forward (the engine's default)
    judge: HybridConfig | None = None  # rlhf: the frozen judge's architecture
    judge_rows: int = 0  # stage.rlhf.judge_batch
    judge_max_len: int = 0  # judge prompt + verdict tokens, at most
    judge_bytes: int = 2  # bytes per judge parameter (stage.rlhf.judge_dtype)
    reference: bool = False  # kl_beta > 0: a frozen fp32 copy of the policy (the rank's share, as bound)
    vllm_bytes: float = 0.0  # rollout_backend=vllm: its share of the GPU while generating (it sleeps in training)


@dataclass
class Plan:
    cluster: Cluster
    layout: Layout
    tokens: int  # per micro-batch on one rank
    rows: dict[str, float] = field(default_factory=dict)  # bytes per rank
    activations_by_kind: dict[str, float] = field(default_factory=dict)  # bytes kept, summed over layers of a kind
    peak: float = 0.0

    @property
    def fits(self) -> bool:
        return self.peak <= self.cluster.gpu_mem_gb * GB

    def table(self) -> str:
        lines = [f"layout {describe(self.layout)} on {self.cluster.nodes}×{self.cluster.gpus_per_node} "
                 f"{self.cluster.device} ({self.cluster.gpu_mem_gb:g} GB each), {self.tokens} tokens per micro-batch:"]
        for name, b in self.rows.items():
            lines.append(f"  {name:<36} {b / GB:8.2f} GB")
            if name.startswith("activations"):
                for kind, kb in self.activations_by_kind.items():
                    lines.append(f"    {'kept, ' + kind:<34} {kb / GB:8.2f} GB")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {'peak per rank':<36} {self.peak / GB:8.2f} GB  → {verdict}")
        return "\n".join(lines)


from tandem.model.config import LAYER_KINDS as KINDS  # noqa: E402  (pattern character → kind)


def describe(layout: Layout) -> str:
    ac = ",".join(sorted(layout.activation_checkpointing)) or "none"
    cp = f" cp={layout.cp}" if layout.cp > 1 else ""
    return f"{layout.engine} ep={layout.ep}{cp} ac={ac}"


# ---------------------------------------------------------------------------------------------------
def inventory(config: HybridConfig) -> ParamInventory:
    """Exact parameter counts of ``config`` from a ``meta`` build (no memory is allocated)."""
    from tandem.model.hybrid import HybridLM

    model = HybridLM(config, device="meta")
    dense = expert = largest_tensor = 0
    for name, p in model.named_parameters():
        largest_tensor = max(largest_tensor, p.numel())
        if ".experts." in name:
            expert += p.numel()
        else:
            dense += p.numel()
    blocks = tuple((sum(p.numel() for n, p in b.named_parameters() if ".experts." not in f".{n}"),
                    sum(p.numel() for n, p in b.named_parameters() if ".experts." in f".{n}"))
                   for b in model.backbone.layers)
    return ParamInventory(dense, expert, max(d + e for d, e in blocks), largest_tensor, blocks)


# ---------------------------------------------------------------------------------------------------
# activations: measured per layer kind


class _TritonScanFootprint(torch.autograd.Function):
    """Stand-in for the Triton SSD scan in the probe: the reference forward without autograd, and exactly
    the tensors ``kernels.ssd.ssd_triton._SSDChunkScan`` saves for backward — its inputs plus ``dtp`` and
    ``cs`` ([b, h, chunks, chunk] fp32) and the chunk-start states ``S_in`` ([b, chunks, h, p, n] fp32).
    Its backward returns zero gradients of the inputs' shapes (the Triton backward's outputs); the values
    are irrelevant to a memory probe."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, chunk_size, kwargs):
        from tandem.kernels.ssd import ssd_chunk_scan_ref

        with torch.no_grad():
            y = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, **kwargs)
        b, l, h, p = x.shape
        n, chunks = B.shape[-1], -(-l // chunk_size)
        dtp = x.new_empty(b, h, chunks, chunk_size, dtype=torch.float32)
        cs = torch.empty_like(dtp)
        s_in = x.new_empty(b, chunks, h, p, n, dtype=torch.float32)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, dtp, cs, s_in)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, A, B, C, D, dt_bias, *_ = ctx.saved_tensors
        return (torch.zeros_like(x), torch.zeros_like(dt), torch.zeros_like(A), torch.zeros_like(B),
                torch.zeros_like(C), torch.zeros_like(D) if D is not None else None,
                torch.zeros_like(dt_bias) if dt_bias is not None else None, None, None)


def _triton_footprint_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, **kwargs):
    kwargs.pop("impl", None)
    return _TritonScanFootprint.apply(x, dt, A, B, C, D, dt_bias, chunk_size, kwargs)


def _cached(fn):
    """Memoise a probe per (config, arguments): a plan of several layouts measures each shape once."""
    cache: dict = {}

    @functools.wraps(fn)
    def wrapper(config: HybridConfig, *args):
        key = (json.dumps(dataclasses.asdict(config), sort_keys=True, default=str), args)
        if key not in cache:
            cache[key] = fn(config, *args)
        return cache[key]

    return wrapper


class _UniformDispatcher:
    """Probe stand-in for the token dispatcher: the same rows, copies and gathers as the real one, with
    every expert receiving an equal share — the real permutation counts tokens per expert
    (``torch.bincount``), whose output size depends on the data, which fake tensors cannot run."""

    def dispatch(self, x, topk_idx, num_experts):
        n, k = topk_idx.shape
        order = torch.arange(n * k, device=x.device)
        tokens = torch.full((num_experts,), (n * k) // num_experts, dtype=torch.long, device=x.device)
        return x.index_select(0, order // k), tokens, order

    def combine(self, y_sorted, order, topk_weights, num_tokens):
        from tandem.model.moe import unpermute_tokens

        return unpermute_tokens(y_sorted, order, topk_weights, num_tokens)


def _uniform_experts_forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Probe stand-in for :meth:`GroupedExperts.forward`: the same activations kept for backward
    (``x``, ``up(x)``, ``act(up(x))``, the output: [rows, I] and [rows, H]) through one expert's
    weights, since the fake grouped GEMM accepts only bf16 and the per-expert loop reads counts on the host."""
    h = torch.nn.functional.linear(x_sorted, self.up_proj[0])
    return torch.nn.functional.linear(self.act_fn(h), self.down_proj[0])


def _fake_parameters(module: torch.nn.Module) -> None:
    """Give a ``meta``-built module fake parameters and buffers on the CPU (inside a FakeTensorMode):
    shapes and dtypes without memory. (``Module.to_empty`` cannot swap a parameter for a fake tensor.)"""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)


def _snapshot_bytes(snapshot, *kinds: str) -> int:
    dev = torch.device("cpu")
    return sum(v for k, v in snapshot.get(dev, {}).items() if str(getattr(k, "value", k)) in kinds)


def _run_tracked(module, inputs_fn, loss_fn, dtype, checkpoint: bool) -> tuple[int, int]:
    """(bytes left alive by the forward, extra bytes at the backward's peak beyond parameter gradients)
    of one fake forward + backward of ``module``."""
    from torch.distributed._tools.mem_tracker import MemTracker

    args = inputs_fn()
    tracker = MemTracker()
    tracker.track_external(module, *[a for a in args if isinstance(a, torch.Tensor)])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    with tracker:
        with autocast:
            if checkpoint:
                out = torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
            else:
                out = module(*args)
            loss = loss_fn(out)
        after = tracker.get_tracker_snapshot()
        loss.backward()
        peak = tracker.get_tracker_snapshot("peak")
    # Everything the forward left alive: what it saved for backward and its output (which the next block's
    # norm keeps in the full model); its input is the previous block's output, counted there.
    kept = _snapshot_bytes(after, "Activation")
    # Parameter gradients are left out of the transient: the planner adds them at their engine's size.
    transient = (_snapshot_bytes(peak, "Total") - _snapshot_bytes(after, "Total")
                 - (_snapshot_bytes(peak, "Gradient") - _snapshot_bytes(after, "Gradient")))
    return max(0, kept), max(0, transient)


def _block_config(config: HybridConfig, kind: str, ep: int) -> HybridConfig:
    changes = dict(hybrid_override_pattern=kind, ssd_impl="torch")
    if config.n_routed_experts:
        changes["n_routed_experts"] = config.n_routed_experts // ep  # the experts one rank holds
    return dataclasses.replace(config, **changes)


@_cached
def probe_block(config: HybridConfig, kind: str, rows: int, seq_len: int, dtype_name: str, triton_scan: bool,
                checkpoint: bool, ep: int) -> tuple[int, int]:
    """(kept, transient) bytes of one block of ``kind`` for a [rows, seq_len] micro-batch, measured by
    MemTracker on fake tensors (no memory, no compute) at the model's real widths."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from tandem.model import mamba2
    from tandem.model.hybrid import HybridBlock
    from tandem.model.moe import GroupedExperts, MoE

    cfg = _block_config(config, kind, ep)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    with torch.device("meta"):
        block = HybridBlock(cfg, 0)
    original_scan = mamba2.chunk_scan
    if triton_scan:
        mamba2.chunk_scan = _triton_footprint_scan
    try:
        with FakeTensorMode():
            _fake_parameters(block)
            block.train()
            for m in block.modules():
                if isinstance(m, MoE):
                    m.dispatcher = _UniformDispatcher()
                    m.eval()  # skips the per-expert token count (a bincount); its aux loss is a few scalars
                if isinstance(m, GroupedExperts):
                    m.forward = types.MethodType(_uniform_experts_forward, m)
            return _run_tracked(block, lambda: (torch.randn(rows, seq_len, cfg.hidden_size, requires_grad=True),),
                                lambda y: y.float().square().mean(), dtype, checkpoint)
    finally:
        mamba2.chunk_scan = original_scan


@_cached
def probe_head(config: HybridConfig, rows: int, seq_len: int, dtype_name: str) -> tuple[int, int]:
    """(kept, transient) of the output side: embeddings → final norm → ``lm_head`` → the stages' loss
    (:func:`tandem.trainer.stages.base.token_cross_entropy`), on fake tensors at the real vocabulary."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from tandem.model.hybrid import HybridLM

    cfg = dataclasses.replace(config, hybrid_override_pattern="-")
    model = HybridLM(cfg, device="meta")
    model.backbone.layers = torch.nn.ModuleList()
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    with FakeTensorMode():
        _fake_parameters(model)
        model.train()
        ids = torch.zeros(rows, seq_len, dtype=torch.long)
        batch = {"input_ids": ids, "labels": ids, "loss_mask": torch.ones(rows, seq_len)}
        return _head_tracked(model, batch, dtype)


def _head_tracked(model, batch, dtype) -> tuple[int, int]:
    from tandem.trainer.stages.base import token_cross_entropy

    class _Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self):
            return token_cross_entropy(self.model, batch).loss_sum

    return _run_tracked(_Head(), lambda: (), lambda out: out, dtype, False)


# ---------------------------------------------------------------------------------------------------
def _engine_state(engine: str, inv: ParamInventory, cluster: Cluster, ep: int, param_bytes: int,
                  accumulating: bool) -> dict[str, float]:
    """Bytes per rank of weights, gradients, optimizer state, master copy, buffers and step temporaries."""
    world = cluster.world
    edp = world // ep
    dense, expert = inv.dense, inv.expert / ep  # held by a rank before any sharding
    held = dense + expert
    shard = dense / world + expert / edp  # what a fully sharded engine keeps of it
    cuda = cluster.device == "cuda"
    # torch AdamW on CUDA runs the foreach implementation: √v of a whole parameter group at once
    step_temp = 4 * (shard if engine in ("zero1", "zero2", "zero3", "fsdp") else held) if cuda else 8 * inv.largest_tensor
    rows = {"weights": 4 * held, "gradients": 4 * held, "optimizer (AdamW moments)": 8 * held}
    buffers = 0.0
    if engine == "ddp":
        if world > 1:  # gradients flattened into one buffer per group (dense, then experts) to all-reduce;
            # experts whose expert-data-parallel group is one rank (EP = world) are scaled in place instead
            buffers = 4 * max(dense, expert if edp > 1 else 0.0)
    elif engine in ("zero1", "zero2", "zero3"):
        rows["optimizer (AdamW moments)"] = 8 * shard
        rows["master weights (fp32)"] = 4 * shard
        bucket = 4 * min(_DS_BUCKET, held)
        if engine == "zero1":
            buffers = bucket
        elif engine == "zero2":
            rows["gradients"] = 4 * shard
            buffers = bucket
        else:
            rows["weights"] = 4 * shard + 2 * 4 * inv.largest_block_local(ep)  # the layer in use and the next, gathered
            rows["gradients"] = 4 * shard
            buffers = bucket
    elif engine == "fsdp":
        gathered = (param_bytes * 2 + 4) * inv.largest_block_local(ep)  # two blocks' unsharded weights + one's gradients
        rows["weights"] = 4 * shard + gathered
        # Accumulating micro-batches without a gradient reduction each (set_requires_gradient_sync(False))
        # keeps every unsharded gradient, in fp32, until the step's last micro-batch reduce-scatters them.
        rows["gradients"] = 4 * shard + (4 * held if accumulating else 0.0)
        rows["optimizer (AdamW moments)"] = 8 * shard
    else:
        raise ValueError(f"unknown engine {engine!r}")
    # DeepSpeed's buckets live through the backward (gradients are copied in as they are produced); the
    # plain engine's flat buffer exists only after the backward, while it all-reduces
    rows["communication buffers"] = buffers
    rows["optimizer step temporaries"] = step_temp
    return rows


#: engines whose communication buffers coexist with the activations (persistent through the backward)
_PERSISTENT_BUFFERS = ("zero1", "zero2", "zero3")


def _numerics(precision: str, device: str) -> str:
    if device == "cuda" and precision != "fp32":
        return "bf16"
    return "bf16" if precision == "bf16" else "fp32"


def plan(config: HybridConfig, cluster: Cluster, layout: Layout, *, tokens: int, batch_rows: int = 1,
         precision: str = "auto", accumulating: bool = True, generation: Generation | None = None) -> Plan:
    """Bytes per rank of ``layout`` on ``cluster`` for micro-batches of ``tokens`` tokens in ``batch_rows``
    rows (``accumulating``: more than one micro-batch per rank per step; ``generation``: what a GRPO / RLHF
    stage holds while it generates)."""
    if cluster.world % layout.ep:
        raise ValueError(f"parallel.ep={layout.ep} must divide the world size {cluster.world}")
    if cluster.world % layout.cp:
        raise ValueError(f"parallel.cp={layout.cp} must divide the world size {cluster.world}")
    if layout.cp > 1 and (tokens // batch_rows) % (2 * layout.cp):
        raise ValueError(f"data.seq_len={tokens // batch_rows} must be divisible by 2 × parallel.cp = {2 * layout.cp}")
    inv = inventory(config)
    numerics = _numerics(precision, cluster.device)
    param_bytes = 2 if numerics == "bf16" else 4
    rows = _engine_state(layout.engine, inv, cluster, layout.ep, param_bytes, accumulating)
    # Context parallelism: a rank runs every block on seq_len / cp tokens of each row (the probes below
    # measure exactly that); the attention layers also hold the row's whole K/V, gathered (see below).
    rows_, seq_len = batch_rows, tokens // batch_rows // layout.cp
    triton = cluster.device == "cuda"
    by_kind: dict[str, float] = {}
    transient = 0.0
    for kind in sorted(set(config.hybrid_override_pattern)):
        checkpointed = KINDS[kind] in layout.activation_checkpointing
        kept, trans = probe_block(config, kind, rows_, seq_len, numerics, triton, checkpointed, layout.ep)
        if kind == "*" and layout.cp > 1:
            # The probe cannot run the CP path (it needs a process group): add the all-gathered K/V,
            # [rows, 2·kv_heads, seq_len·cp, head_dim], which the per-document SDPA calls keep for backward
            # in place of the local K/V the probe counted (checked against a real CP block in
            # tests/trainer/test_context_parallel.py). Checkpointed: it exists only during the recompute.
            kv = 2 * config.num_key_value_heads * config.head_dim * rows_ * seq_len * param_bytes
            gathered = kv * (layout.cp - 1)
            if cluster.device == "cpu":
                # CPU SDPA turns each piece's lower-right causal mask into an fp32 additive mask it keeps:
                # worst case (one document per row) rank N-1's two chunks, (2N+1)·Tc² per row
                tc = seq_len // 2
                gathered += 4 * rows_ * (2 * layout.cp + 1) * tc * tc
            if checkpointed:
                trans += gathered + kv * layout.cp
            else:
                kept += gathered
                trans += kv * layout.cp  # dK/dV of the whole row before the reduce-scatter
        by_kind[KINDS[kind]] = config.hybrid_override_pattern.count(kind) * kept
        transient = max(transient, trans)
    head_kept, head_trans = probe_head(config, rows_, seq_len, numerics)
    by_kind["output layer + loss"] = head_kept
    transient = max(transient, head_trans)
    # under gradient accumulation each parameter's new gradient is a temporary added into .grad: at most
    # the largest block's (or the output layer's) at once
    transient += 4 * max(inv.largest_block_local(layout.ep), config.vocab_size * config.hidden_size)
    activations = sum(by_kind.values())
    rows["activations (kept for backward)"] = activations
    rows["backward transient (largest layer)"] = transient
    if cluster.device == "cuda" and numerics == "bf16" and layout.engine != "fsdp":
        # autocast casts each weight to bf16 once per forward and the casts stay saved until backward
        rows["autocast bf16 weight copies"] = 2 * (inv.dense + inv.expert / layout.ep)
    static = sum(rows[k] for k in ("weights", "gradients", "optimizer (AdamW moments)")) + rows.get("master weights (fp32)", 0.0)
    during = activations + transient + rows.get("autocast bf16 weight copies", 0.0)
    others = [rows["optimizer step temporaries"]]
    if layout.engine in _PERSISTENT_BUFFERS:
        static += rows["communication buffers"]
    else:
        others.append(rows["communication buffers"])
    if generation is not None:
        regions = _generation_rows(config, generation, layout, inv, numerics, param_bytes, triton)
        rows.update(regions.pop("rows"))
        static += rows.get("judge weights (frozen)", 0.0) + rows.get("reference model (kl_beta > 0)", 0.0)
        others += list(regions.values())
    peak = static + max(during, *others)
    return Plan(cluster, layout, tokens // layout.cp, rows, by_kind, peak)


def _generation_rows(config: HybridConfig, gen: Generation, layout: Layout, inv: ParamInventory, numerics: str,
                     param_bytes: int, triton: bool) -> dict:
    """Rows of a generating stage, and the bytes of each region it generates in (policy rollouts; judging)."""
    from tandem.model.cache import HybridCache

    dtype = torch.bfloat16 if numerics == "bf16" else torch.float32

    def forward_bound(cfg: HybridConfig, rows: int, max_len: int, item: int) -> float:
        # a prefill forward (no autograd) holds at most what training keeps of one block at its tokens, and an
        # attention layer's cached chunk also its K/V over the cached prefix, heads expanded (CUDA: so the
        # masked SDPA can use the memory-efficient kernel; model.attention.masked_gqa_attention)
        chunk = min(gen.prefill_chunk, max_len)
        block = max(probe_block(cfg, kind, rows, chunk, numerics, triton, False, layout.ep)[0]
                    for kind in set(cfg.hybrid_override_pattern))
        kv = 2 * rows * cfg.num_attention_heads * max_len * cfg.head_dim * item if "*" in cfg.hybrid_override_pattern else 0
        return float(max(block, kv))

    held = inv.dense + inv.expert / layout.ep
    out: dict[str, float] = {}
    if gen.reference:
        out["reference model (kl_beta > 0)"] = 4.0 * held
    if gen.vllm_bytes:
        out["vllm rollouts (its GPU share)"] = float(gen.vllm_bytes)
        regions = {"rollouts": float(gen.vllm_bytes)}
    else:
        rollout = {"rollout weights gathered (fsdp)": param_bytes * held if layout.engine == "fsdp" else 0.0,
                   "rollout KV + SSM cache": float(HybridCache.bytes_for(config, gen.rows, gen.max_len, dtype).total),
                   "rollout forward (bound)": forward_bound(config, gen.rows, gen.max_len, param_bytes)}
        out.update(rollout)
        regions = {"rollouts": sum(rollout.values())}
    if gen.judge is not None:
        jinv = inventory(gen.judge)
        jdtype = torch.bfloat16 if gen.judge_bytes == 2 else torch.float32
        judge = {"judge weights (frozen)": gen.judge_bytes * (jinv.dense + jinv.expert / layout.ep),
                 "judge KV + SSM cache": float(HybridCache.bytes_for(gen.judge, gen.judge_rows, gen.judge_max_len, jdtype).total),
                 "judge forward (bound)": forward_bound(gen.judge, gen.judge_rows, gen.judge_max_len, gen.judge_bytes)}
        out.update(judge)
        regions["judging"] = judge["judge KV + SSM cache"] + judge["judge forward (bound)"]
    return {"rows": out, **regions}


# ---------------------------------------------------------------------------------------------------
def layout_from_config(cfg, cluster: Cluster) -> Layout:
    """The layout a composed run config asks for on ``cluster`` (``parallel.engine=auto`` resolved as the
    trainer resolves it: ZeRO when ``zero_stage > 0``, FSDP2 on CUDA with more than one rank, else ddp)."""
    from tandem.model.hybrid import activation_checkpointing_kinds
    from omegaconf import OmegaConf

    zero = int(cfg.parallel.get("zero_stage", 0) or 0)
    engine = str(cfg.parallel.get("engine", "auto") or "auto")
    if engine == "zero" or (engine == "auto" and zero):
        engine = f"zero{zero}"
    elif engine == "auto":
        engine = "fsdp" if cluster.device == "cuda" and cluster.world > 1 and cfg.stage.name not in ("grpo", "rlhf") else "ddp"
    spec = cfg.model.get("activation_checkpointing", None)
    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    return Layout(engine, int(cfg.parallel.ep), activation_checkpointing_kinds(spec), int(cfg.parallel.get("cp", 1) or 1))


def generation_from_config(cfg, model_cfg: HybridConfig, cluster: Cluster) -> tuple[Generation | None, str]:
    """What a GRPO / RLHF run generates with (None for other stages), and a note on how the judge's
    architecture was found."""
    name = str(cfg.stage.name)
    if name not in ("grpo", "rlhf"):
        return None, ""
    g = cfg.stage.grpo
    seq_len = int(cfg.data.seq_len)
    extra = dict(reference=float(g.get("kl_beta", 0.0) or 0.0) > 0,
                 vllm_bytes=float(g.get("vllm_gpu_memory_utilization", 0.5)) * cluster.gpu_mem_gb * GB
                 if str(g.get("rollout_backend", "engine")) == "vllm" else 0.0)
    if name == "grpo":
        return Generation(rows=int(g.generations_per_prompt), max_len=seq_len, **extra), ""
    r = cfg.stage.rlhf
    judge, note = model_cfg, "judge: assumed to be the policy's architecture"
    if r.judge:
        from tandem.model.checkpoint import CheckpointError, read_config
        from .checkpoint.manager import weights_dir

        try:
            judge = read_config(weights_dir(str(r.judge)))
            note = f"judge: the architecture of {r.judge}"
        except (CheckpointError, OSError, ValueError):
            note += f" ({r.judge} is not readable here)"
    jdtype = str(r.get("judge_dtype", "auto"))
    judge_bytes = 4 if jdtype == "fp32" or (jdtype == "auto" and cluster.device != "cuda") else 2
    # a judge prompt: the conversation (≤ seq_len − max_new_tokens) + two final answers (≤ max_new_tokens each)
    # + the instructions (a few hundred tokens, not counted) — then its verdict
    judge_len = seq_len + int(g.max_new_tokens) + int(r.judge_max_new_tokens)
    # one judge call per group: its comparisons × judge_samples rows, at most judge_batch at once
    from .rl.genrm import comparison_pairs

    per_group = len(comparison_pairs(int(g.generations_per_prompt), str(r.pairing))) * int(r.judge_samples)
    return (Generation(rows=int(g.generations_per_prompt), max_len=seq_len, judge=judge,
                       judge_rows=min(int(r.judge_batch), per_group), judge_max_len=judge_len, judge_bytes=judge_bytes,
                       **extra), note)


def candidate_layouts(base: Layout, world: int, seq_len: int | None = None) -> list[Layout]:
    """The layouts worth comparing: the recipe's, then each engine at the recipe's EP and CP, then other
    EP sizes, full activation checkpointing, and larger context parallelism (2/4/8/16 where ``seq_len`` splits)."""
    seen, out = set(), []
    ep_options = sorted({base.ep, *(e for e in (1, 2, 4, 8) if world % e == 0)})
    ac, cp = base.activation_checkpointing, base.cp
    # only larger CP sizes: they are what lowers activations (and probing shorter slices is quick)
    cp_options = [c for c in (2, 4, 8, 16) if c > cp and world % c == 0 and seq_len is not None and seq_len % (2 * c) == 0]
    for layout in [base] + [Layout(e, base.ep, ac, cp) for e in ("ddp", "zero1", "zero2", "zero3", "fsdp")] \
            + [Layout(base.engine, ep, ac, cp) for ep in ep_options] \
            + [Layout(base.engine, base.ep, frozenset(KINDS.values()), cp)] \
            + [Layout(base.engine, base.ep, ac, c) for c in cp_options]:
        if layout not in seen and world % layout.ep == 0:
            seen.add(layout)
            out.append(layout)
    return out


def advice(p: Plan, alternatives: list[Plan]) -> str:
    if p.fits:
        return f"the recipe's layout fits: {p.peak / GB:.1f} of {p.cluster.gpu_mem_gb:g} GB per rank"
    fitting = sorted((a for a in alternatives if a.fits), key=lambda a: a.peak)
    biggest = max(p.rows, key=lambda k: p.rows[k] if k != "optimizer step temporaries" else 0)
    msg = f"does not fit ({p.peak / GB:.1f} GB > {p.cluster.gpu_mem_gb:g} GB); largest part: {biggest}"
    if fitting:
        a = fitting[0]
        msg += f"; {describe(a.layout)} fits at {a.peak / GB:.1f} GB — set " + _overrides(a.layout)
    else:
        msg += "; no compared layout fits: add nodes or lower stage.micro_batch / data.seq_len"
    return msg


def _overrides(layout: Layout) -> str:
    parts = [f"parallel.ep={layout.ep}"] + ([f"parallel.cp={layout.cp}"] if layout.cp > 1 else [])
    parts.append(f"parallel.zero_stage={layout.engine[-1]}" if layout.engine.startswith("zero") else
                 f"parallel.zero_stage=0 parallel.engine={layout.engine}")
    if layout.activation_checkpointing:
        ac = layout.activation_checkpointing
        parts.append("model.activation_checkpointing=" + ("all" if ac == frozenset(KINDS.values()) else "[" + ",".join(sorted(ac)) + "]"))
    return " ".join(parts)


def fail(message: str) -> None:
    """One line on stderr and exit status 2 (the CLI's bad-input convention; not imported from the CLI,
    which imports this module)."""
    print(f"tandem plan: error: {message}", file=sys.stderr)
    sys.exit(2)


def plan_main(argv: list[str]) -> int:
    """``tandem plan -cn RECIPE [overrides] --nodes N --gpus-per-node G --gpu-mem-gb M [--device cuda|cpu]``."""
    import logging

    from tandem.recipes import RECIPES_DIR
    from .config import ConfigError, build_hybrid_config, register_configs, row_length

    p = argparse.ArgumentParser(prog="tandem plan", description="Memory per rank of a recipe on a cluster shape.")
    p.add_argument("-cn", "--config-name", required=True, help="recipe name (e.g. nano3_pretrain)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for `tandem`")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem-gb", type=float, default=80.0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="numerics and kernels to plan for")
    p.add_argument("--all", action="store_true", help="print every compared layout, not only the recipe's")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1 or args.gpu_mem_gb <= 0:
        fail("--nodes and --gpus-per-node must be >= 1 and --gpu-mem-gb > 0")
    logging.getLogger("tandem").setLevel(logging.WARNING)
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = compose(config_name=args.config_name, overrides=list(args.overrides))
        model_cfg = build_hybrid_config(cfg.model)
    except (HydraException, OmegaConfBaseException, ConfigError, ValueError) as e:
        msg = str(e).splitlines()[0]
        if "init_from" in msg:  # a recipe that starts from a checkpoint: plan its architecture by name instead
            msg += " (its config.json is read), or name the architecture to plan: model.preset=nano3"
        fail(msg)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.device)
    base = layout_from_config(cfg, cluster)
    if cluster.world % base.ep:
        fail(f"parallel.ep={base.ep} does not divide {cluster.world} ranks ({args.nodes} nodes × {args.gpus_per_node})")
    seq_len, seq_key = row_length(cfg)  # stage.cpt.long_length for the cpt stage
    tokens = int(cfg.stage.micro_batch) * seq_len
    # data-parallel replicas: world / cp (the CP ranks of a replica share its rows)
    accumulating = int(cfg.stage.global_batch) > int(cfg.stage.micro_batch) * cluster.world // base.cp
    generation, note = generation_from_config(cfg, model_cfg, cluster)
    kwargs = dict(tokens=tokens, batch_rows=int(cfg.stage.micro_batch), precision=str(cfg.precision.name),
                  accumulating=accumulating, generation=generation)
    print(f"{args.config_name}: {model_cfg.hybrid_override_pattern[:40]}{'…' if len(model_cfg.hybrid_override_pattern) > 40 else ''} "
          f"(measuring activations per layer kind on this CPU …)", flush=True)
    mine = plan(model_cfg, cluster, base, **kwargs)
    if cluster.world % base.cp or seq_len % (2 * base.cp):
        fail(f"parallel.cp={base.cp} needs a world size ({cluster.world}) it divides and {seq_key} "
             f"({seq_len}) divisible by {2 * base.cp}")
    others = [plan(model_cfg, cluster, l, **kwargs)
              for l in candidate_layouts(base, cluster.world, seq_len)[1:]]
    print(mine.table())
    if note:
        print(note)
    if args.all:
        print(f"\n{'layout':<40} {'peak/rank':>10}  fits")
        for o in [mine, *others]:
            print(f"{describe(o.layout):<40} {o.peak / GB:8.1f} GB  {'yes' if o.fits else 'no'}")
    print(advice(mine, others))
    return 0 if mine.fits else 1


if __name__ == "__main__":
    sys.exit(plan_main(sys.argv[1:]))
