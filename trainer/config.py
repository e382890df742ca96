"""Typed run configuration: the schema Hydra recipes select and override.

Every dataclass here is registered in Hydra's ConfigStore (:func:`register_configs`), so a typo in a key
(``optim.lrr=1``) or a wrong type (``stage.steps=abc``) fails at composition with Hydra's own error naming
the key. Runtime objects (process groups, datasets, the model) are never stored in configs.

``ModelConfig`` is generated from :class:`tandem.model.HybridConfig`: a ``preset`` plus every HybridConfig field
as an optional override (``None`` = the preset's value), so ``model.hidden_size=128`` works and
``model.hiden_size=128`` is rejected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from tandem.model import HybridConfig

__all__ = [
    "BlendEntry", "CPTConfig", "ChatDataConfig", "ConfigError", "ENGINE_CHOICES", "FSDP_PARAM_DTYPES", "GRPOConfig", "GRPOEnvironment", "RLDataConfig", "RLHFConfig", "DataConfig", "LoggerConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
    "LOGGER_KINDS", "PrecisionConfig", "RunConfig", "RunSection", "StageConfig", "build_hybrid_config", "row_length", "configure_compile", "configure_memory",
    "overrides_suffix", "register_configs", "validate_config", "validate_cpt", "validate_grpo", "validate_memory", "validate_rlhf", "validate_parallel",
]


def _optional_type(hint: Any) -> Any:
    """Map a HybridConfig field type to an OmegaConf-friendly Optional type."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is tuple:
        return Optional[List[float]]
    if args and origin in (typing.Union, types.UnionType):
        return Optional[args[0]]
    return Optional[hint]


def _model_config_class():
    hints = typing.get_type_hints(HybridConfig)
    spec: list[tuple[str, Any, Any]] = [
        ("preset", str, "tiny"),
        ("init_seed", int, 0),
        # Initial weights: a released/HF-layout checkpoint directory, or a tandem run checkpoint
        # (its model/ subfolder is used; weights only — a new stage starts fresh optimizer and data).
        ("init_from", Optional[str], None),
        # Training memory (docs/LONG_CONTEXT.md), not part of the network or its config.json:
        # layer kinds whose blocks are recomputed in the backward: all | none | [mamba, attention, mlp, moe]
        ("activation_checkpointing", Any, "none"),
        # tokens per chunk of the loss's vocabulary projection (null: 256 MiB of fp32 logits per chunk)
        ("loss_chunk_tokens", Optional[int], None),
        # torch.compile every block's training body (configure_compile); the inference paths stay eager
        ("compile", bool, False),
    ]
    for f in dataclasses.fields(HybridConfig):
        spec.append((f.name, _optional_type(hints[f.name]), dataclasses.field(default=None)))
    return dataclasses.make_dataclass("ModelConfig", spec, namespace={"__doc__": "Model preset + field overrides."})


ModelConfig = _model_config_class()


#: ``model.preset`` value meaning "the shape of the checkpoint named by ``model.init_from``"
FROM_CHECKPOINT = "init_from"


def row_length(cfg: Any) -> tuple[int, str]:
    """Tokens per training row and the key that sets them: ``stage.cpt.long_length`` for the cpt stage (its
    rows are long samples or packs of short ones), ``data.seq_len`` otherwise."""
    if cfg.stage.name == "cpt":
        return int(cfg.stage.cpt.long_length), "stage.cpt.long_length"
    return int(cfg.data.seq_len), "data.seq_len"


def build_hybrid_config(cfg: Any) -> HybridConfig:
    """``ModelConfig`` (or its DictConfig) → validated :class:`HybridConfig`.

    ``preset: init_from`` takes the architecture from the ``config.json`` of the checkpoint in
    ``model.init_from`` (a released/HF directory or a tandem run), so fine-tuning a released model needs
    no hand-written shape; field overrides still apply on top (e.g. ``ssd_impl``).
    """
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    overrides = {}
    for f in dataclasses.fields(HybridConfig):
        v = get(f.name, None)
        if v is not None:
            overrides[f.name] = tuple(v) if f.name == "time_step_limit" else v
    if get("preset") == FROM_CHECKPOINT:
        from tandem.model.checkpoint import read_config

        from .checkpoint import weights_dir

        if not get("init_from"):
            raise ValueError("model.preset=init_from needs model.init_from=<checkpoint directory>")
        return read_config(weights_dir(get("init_from"))).replace(**overrides)
    return HybridConfig.preset(get("preset"), **overrides)



def configure_memory(model: Any, cfg: Any) -> None:
    """Apply ``model.activation_checkpointing`` and ``model.loss_chunk_tokens`` (``cfg`` = the ``model``
    section) to a built :class:`~tandem.model.HybridLM`, before any engine wraps it."""
    model.set_activation_checkpointing(_plain(cfg.activation_checkpointing))
    model.loss_chunk_tokens = cfg.loss_chunk_tokens


def configure_compile(model: Any, cfg: Any, backend: str = "inductor") -> None:
    """``model.compile=true``: ``torch.compile`` the training body of every block of a built
    :class:`~tandem.model.HybridLM` (after precision recipes, before any engine wraps it).

    Per block rather than the whole model, as FSDP2 and activation checkpointing want it: module hooks
    (parameter gathering, checkpointing) stay in eager code around each compiled body, and the state dict
    keeps its names (no ``_orig_mod.`` prefix). The
    embedding, final norm and chunked loss run eagerly; so do decode and prefill (``forward_cached``).
    """
    if not cfg.compile:
        return
    import torch

    for layer in model.backbone.layers:
        layer._forward = torch.compile(layer._forward, backend=backend)


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key (printed as one line, exit status 2)."""


@dataclass
class BlendEntry:
    """One data source and its weight in a blend. ``path``: a source spec (see :mod:`tandem.trainer.data`)."""

    path: str = "???"
    weight: float = 1.0


@dataclass
class ChatDataConfig:
    """Conversations for SFT (docs/SFT.md): JSONL / Parquet files or HF dataset folders with ``messages``."""

    train: List[str] = field(default_factory=list)
    # Held-out conversations; empty = hold out ``data.valid_fraction`` of the training conversations.
    valid: List[str] = field(default_factory=list)
    tokenizer: Optional[str] = None  # a local HF tokenizer folder / tokenizer.json; null = the shipped one
    train_on: str = "all"  # all | final: loss on every assistant turn, or only on the last one
    truncate_history_thinking: bool = True  # earlier turns keep only <think></think> + content
    overlong: str = "drop"  # drop | truncate: conversations longer than data.seq_len
    enable_thinking: bool = True  # default reasoning mode for rows without their own enable_thinking


@dataclass
class RLDataConfig:
    """Prompts for RL stages (docs/RL.md): JSONL / Parquet / HF dataset folders, rows with ``prompt`` or
    ``messages``, ``task``, ``answer`` (:mod:`tandem.data_pipelines.rl_prompts`)."""

    train: List[str] = field(default_factory=list)
    # Held-out prompts for the reward evaluation; empty = hold out ``data.valid_fraction`` of ``train``.
    valid: List[str] = field(default_factory=list)
    tokenizer: Optional[str] = None  # a local HF tokenizer folder / tokenizer.json; null = the shipped one


@dataclass
class DataConfig:
    """Pretraining reads ``path`` / ``blend`` / ``phase1``+``phase2`` (docs/DATA.md, trainer/data.py)."""

    # Your own data in one override: one source (a tandem-preprocess prefix or a source spec), or one blend,
    # for the whole run. Either replaces phase1/phase2/phase2_start (the recipe's phases are not used).
    path: Optional[str] = None
    blend: List[BlendEntry] = field(default_factory=list)
    # Phase-1 blend (e.g. the diversity mixture) and the phase-2 blend (e.g. the high-quality mixture).
    phase1: List[BlendEntry] = field(default_factory=list)
    phase2: List[BlendEntry] = field(default_factory=list)
    # Token fraction of the run at which phase 2 starts (0.94 in the nano3 recipe); 1.0 = phase 1 only.
    phase2_start: float = 1.0
    seq_len: int = 256
    # Fraction of every source's documents held out for evaluation.
    valid_fraction: float = 0.02
    seed: int = 1234
    # The tokenizer the indexed sources were made with (a local HF folder / tokenizer.json); null = the
    # shipped one (tandem-preprocess's default). Checked against each source's manifest.
    tokenizer: Optional[str] = None
    # megatron's index caches and the blend indices; null = <run.dir>/data_cache (the data folder may be read-only).
    cache_dir: Optional[str] = None
    # No loss where the input token is EOD (megatron's eod_mask_loss): the next document's first token
    # cannot be predicted from a context that seq_idx has just reset.
    eod_mask_loss: bool = True
    # DataLoader worker processes per rank preparing batches a step ahead (0 = in the training process;
    # the CPU smoke recipes use 0: with no core to spare, a worker costs more than it hides).
    num_workers: int = 2
    # SFT conversations (stage.name=sft); pretraining reads phase1/phase2.
    chat: ChatDataConfig = field(default_factory=ChatDataConfig)
    # RL prompts (stage.name=grpo).
    rl: RLDataConfig = field(default_factory=RLDataConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: fraction of the run spent decaying to min_lr
    decay_style: str = "linear"  # wsd decay shape: linear | sqrt (1 - sqrt)
    # MoE aux-loss-free balancing: bias_e += rate * sign(mean - count_e) after each step (0 = off)
    expert_bias_update_rate: float = 1e-3


#: ``parallel.engine`` values (tandem.trainer.parallel.engines; docs/PARALLELISM.md says what each shards)
ENGINE_CHOICES = ("auto", "ddp", "fsdp", "zero")
#: ``parallel.fsdp_param_dtype`` values: the compute dtype FSDP gathers parameters in
FSDP_PARAM_DTYPES = ("auto", "bf16", "fp32")


@dataclass
class ParallelConfig:
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    # The data-parallel size is derived: world_size / (tp * cp * ep-shards). TP/CP/EP and ZeRO arrive with
    # the MoE/EP issue; the engine registry (tandem.trainer.parallel.engines) is where they plug in.
    tp: int = 1
    # context parallelism: every row split over cp ranks (load-balanced causal split; data.seq_len must be a
    # multiple of 2·cp); the cp ranks of a data-parallel replica read the same rows (trainer/parallel/context.py)
    cp: int = 1
    # attention under cp > 1: sdpa (all-gathered K/V, per-document SDPA) | te (Transformer Engine's CP
    # attention on CUDA for rows of one document; GPU-only, falls back to sdpa elsewhere)
    cp_attention: str = "sdpa"
    ep: int = 1
    zero_stage: int = 0
    # auto: zero when zero_stage > 0, else fsdp on CUDA with more than one process, else ddp | ddp (replicated
    # dense weights) | fsdp (PyTorch FSDP2: weights, gradients, optimizer state sharded) | zero (DeepSpeed)
    engine: str = "auto"
    fsdp_param_dtype: str = "auto"  # fsdp compute dtype: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    # fsdp: free each block's gathered weights after its forward (re-gathered in backward); false keeps them
    # until backward (less communication, more memory)
    fsdp_reshard_after_forward: bool = True


@dataclass
class PrecisionConfig:
    """Numerics of the run; the low-precision recipes are applied by :func:`tandem.model.precision.apply_precision`
    (docs/PRECISION.md). Recipe knobs are read only by the recipes they belong to."""

    # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp8_delayed | fp8_current | fp8_block | mxfp8 | nvfp4
    name: str = "auto"
    backend: str = "auto"  # te | emulate | auto (TE when importable and the GPU supports the recipe)
    high_precision_first: int = 0  # first N blocks keep every linear in high precision
    high_precision_last: int = 0  # last M blocks likewise
    fp8_format: str = "hybrid"  # fp8_delayed/fp8_current: hybrid (E4M3 fwd, E5M2 grads) | e4m3
    block_fp8_format: str = "e4m3"  # fp8_block/mxfp8: e4m3 | hybrid
    margin: int = 0
    amax_history_len: int = 1024  # fp8_delayed
    amax_compute_algo: str = "max"  # fp8_delayed: max | most_recent
    block_power_2_scales: bool = True  # fp8_block
    mx_scale_mode: str = "rceil"  # mxfp8: rceil (NVIDIA hardware) | floor (OCP MX v1.0)
    nvfp4_rht: bool = True  # 16x16 random Hadamard transform on the wgrad GEMM inputs
    nvfp4_stochastic_rounding: bool = True  # gradients
    nvfp4_2d_weights: bool = True  # 16x16 weight blocks


#: ``logger.kind`` values (console progress and metrics.jsonl are always on)
LOGGER_KINDS = ("none", "wandb")


@dataclass
class LoggerConfig:
    kind: str = "none"  # none | wandb (console progress and metrics.jsonl are always on)
    project: Optional[str] = None
    entity: Optional[str] = None
    log_every: int = 10
    progress_bar: bool = True
    # Peak FLOP/s of one device for MFU; null = known GPU table on CUDA, no MFU on CPU.
    peak_flops: Optional[float] = None
    # false: log lines from rank 0 only (other ranks print errors) and no megatron/DeepSpeed/torchao warnings;
    # true: every rank's lines and every library's warnings (trainer/metrics.py: configure_logging)
    verbose: bool = False


@dataclass
class GRPOEnvironment:
    """One environment (task) of a GRPO run: its share of the prompts and its generation mode."""

    task: str = "???"  # a registered environment (tandem.trainer.rl.environments.ENVIRONMENTS)
    weight: float = 1.0  # share of each step's prompts (normalised over the listed environments)
    enable_thinking: Optional[bool] = None  # reasoning ON/OFF; null = stage.grpo.enable_thinking
    thinking_budget: Optional[int] = None  # reasoning-token budget; null = stage.grpo.thinking_budget
    # keyword arguments of the environment's constructor (e.g. code: total_wall_s; gym: servers)
    options: Dict[str, Any] = field(default_factory=dict)
    # multi-turn episodes (tool use): generated turns per rollout; 1 = single-turn (trainer/rl/multiturn.py)
    max_turns: int = 1


@dataclass
class GRPOConfig:
    """Synchronous GRPO (stage.name=grpo; docs/RL.md). By default one optimizer step per rollout batch;
    ``ppo_epochs`` × ``minibatches`` optimizer steps per batch otherwise (``stage.steps`` counts optimizer
    steps)."""

    prompts_per_step: int = 8  # P: prompts per optimizer step over all ranks (a multiple of the world size)
    generations_per_prompt: int = 8  # G: rollouts per prompt (a group; >= 2, groups never span ranks)
    # passes over each rollout batch, and optimizer steps per pass (groups split by global slot i % minibatches;
    # each rank's share of the prompts must be a multiple of it); the old log-probs are the batch's own
    ppo_epochs: int = 1
    minibatches: int = 1
    # dynamic sampling (DAPO): drop groups whose rewards are all equal (no gradient signal) and generate more
    # prompts, up to this many extra rounds of prompts_per_step slots, until prompts_per_step groups remain
    # (0 = off; the batch is trained with what is left after the last round)
    dynamic_sampling_rounds: int = 0
    max_new_tokens: int = 64  # per rollout, forced thinking-budget tokens included
    temperature: float = 1.0  # sampling temperature; the trainer's logprobs use the same temperature
    top_p: float = 1.0
    # environments and their weights; empty = every task in data.rl.train, weighted by its prompt count
    environments: List[GRPOEnvironment] = field(default_factory=list)
    enable_thinking: bool = False  # default reasoning mode of the environments
    thinking_budget: Optional[int] = None  # default thinking budget (null = none)
    advantage: str = "leave_one_out"  # leave_one_out | group_mean | no_std (trainer/rl/advantages.py)
    advantage_clip: Optional[float] = None  # clamp advantages to [-c, c] (null = off)
    overlong_filtering: bool = False  # truncated rollouts: advantage 0, no loss (DAPO §3.4)
    loss: str = "clipped"  # clipped | reinforce (trainer/rl/losses.py)
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.28  # ... and above at 1 + eps_high (clip-higher)
    dual_clip: Optional[float] = None  # c > 1: dual-clip PPO for negative advantages (null = off)
    # k3 KL to a frozen reference policy; 0 (default) = no KL and no reference model is built
    kl_beta: float = 0.0
    kl_reference: Optional[str] = None  # the reference weights (a checkpoint dir); required when kl_beta > 0
    is_cap: Optional[float] = None  # truncated IS weight min(exp(logp_old - logp_gen), cap) (null = off)
    score_timeout_s: float = 10.0  # per verifier call
    score_workers: int = 8  # verifier calls at once
    score_backend: str = "thread"  # thread | process (trainer/rl/environments/base.py)
    eval_prompts: int = 64  # held-out prompts scored at each evaluation (stage.eval_every; 0 = none)
    eval_greedy: bool = False  # held-out rollouts greedy; false = sampled like training, fixed seeds
    # what generates the rollouts (trainer/inference/backends.py): engine = the in-process GenerationEngine on
    # the training model; vllm = a colocated vLLM engine refitted each step (GPU, pip install 'tandem[vllm]')
    rollout_backend: str = "engine"
    # how the engine back-end decodes (docs/GENERATION.md): eager | static (fixed shapes, sampling and stops on
    # the device; any layout) | compiled (static + torch.compile of the decode step; one process only)
    rollout_engine: str = "eager"
    vllm_gpu_memory_utilization: float = 0.5  # vLLM's share of the GPU (weights + KV cache), in (0, 1)


@dataclass
class RLHFConfig:
    """RLHF (stage.name=rlhf; docs/RLHF.md): GRPO (``stage.grpo``) whose rewards come from a frozen GenRM judge
    comparing the rollouts of each group in pairs."""

    judge: Optional[str] = None  # the judge's weights: a tandem run / checkpoint or an HF NemotronH folder (required)
    judge_tokenizer: Optional[str] = None  # null: the tokenizer saved beside the judge's weights, else the policy's
    pairing: str = "circular"  # circular: (i, i+1 mod G), G comparisons per group | all: G(G-1)/2 comparisons
    judge_samples: int = 1  # judge generations per pair (their scores all enter the means)
    retries: int = 1  # re-sample a judgement that does not parse this many times, then use score 3 / ranking 3.5
    judge_max_new_tokens: int = 256  # the judge's reasoning + JSON verdict
    judge_temperature: float = 1.0
    judge_greedy: bool = False  # greedy judging (retries then repeat the same output: set retries=0)
    judge_enable_thinking: bool = True  # the judge reasons before its verdict
    judge_instructions: str = "full"  # the judging instructions (preferences.JUDGE_TEMPLATES) the judge was trained on
    judge_batch: int = 16  # judge prompts generated together (rows of the judge's generation engine)
    judge_dtype: str = "auto"  # the frozen judge's weights: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    tie_break: bool = True  # equal scores: adj = 3.5 - ranking, score_1 += adj, score_2 -= adj
    shortest_top_bonus: float = 0.0  # added to the shortest of each group's top-reward rollouts (0 = off)
    length_penalty: float = 0.0  # zero-centred: reward -= c * (length - group mean) / group mean (0 = off)


@dataclass
class CPTConfig:
    """Long-context continued pretraining (stage.name=cpt; docs/LONG_CONTEXT.md): rows of ``long_length`` tokens,
    a ``long_fraction`` of them one long sample, the rest ``long_length / short_length`` short samples packed
    (their own documents), through the pretraining data path (tandem-preprocess prefixes, blends)."""

    long_length: int = 524288  # tokens per row, and per long sample
    short_length: int = 4096  # tokens per short sample; must divide long_length
    long_fraction: float = 0.5  # share of rows (= of tokens) that are long samples
    long: List[BlendEntry] = field(default_factory=list)  # the long sources (required)
    short: List[BlendEntry] = field(default_factory=list)  # the short sources; empty = the data.* blend / phases
    # the loss of the long rows: all = every token; answers = completion-only, for long sources of task documents
    # (only what follows a document's last answer_marker trains, carrying the row's whole weight)
    long_loss: str = "all"
    answer_marker: str = "\nAnswer:"
    # the long-context evaluation at the end of the stage (trainer/inference/long_eval.py)
    eval_tasks: List[str] = field(default_factory=lambda: ["needle", "kv_retrieval", "multi_hop", "aggregation"])
    eval_lengths: List[int] = field(default_factory=list)  # empty = short_length, long_length and 2 × long_length
    eval_depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    eval_per_cell: int = 4  # examples per (length, depth) cell; 0 = no long-context evaluation
    eval_max_new_tokens: int = 12
    eval_prefill_chunk: int = 2048  # prompt tokens per prefill forward of the evaluation
    eval_baseline: bool = True  # also evaluate the model.init_from weights (the gain CPT made)
    # per task, keyword arguments of its generator (data_pipelines/long_context.py), e.g. {needle: {value_digits: 1}}
    eval_task_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)


@dataclass
class StageConfig:
    name: str = "pretrain"
    steps: int = 100
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 4  # sequences per forward/backward on one rank
    eval_every: int = 0  # 0 = never during the run (a final evaluation still runs when eval_batches > 0)
    eval_batches: int = 4
    save_every: int = 0  # 0 = only at the end (and on preemption)
    keep_last: int = 3
    # sharded (fsdp) checkpoints: periodic saves write in a background thread while training goes on; the
    # checkpoint becomes ``latest`` once every rank's shards are on disk (the final save always waits)
    async_save: bool = False
    nan_tolerance: int = 5  # abort after this many consecutive non-finite steps
    seed: int = 0
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # read by stage.name=grpo and rlhf
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)  # read by stage.name=rlhf only
    cpt: CPTConfig = field(default_factory=CPTConfig)  # read by stage.name=cpt only


@dataclass
class RunSection:
    dir: str = "runs/default"
    # auto: resume from <dir>/checkpoints/latest if present; never: start fresh (refuses a non-empty run
    # directory); or an explicit checkpoint path.
    resume: str = "auto"
    # A resume refuses a changed schedule (trainer/loop.py: Trainer.schedule). true: stage.steps may differ
    # from the checkpoint's — the run is extended (or shortened); the LR curve is recomputed over the new
    # total and the stage re-plans its data from the resume step (docs/RECIPES.md, "Extending a run").
    extend: bool = False


@dataclass
class RunConfig:
    model: Any = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    run: RunSection = field(default_factory=RunSection)


RunConfig.__annotations__["model"] = ModelConfig


#: override keys that do not change what a run trains, so they never change its default directory
_NOT_IN_RUN_NAME = ("run.", "logger.", "hydra.")


def overrides_suffix(overrides: list[str]) -> str:
    """``-k=v,k2=v2`` of the command-line ``overrides`` that change what is trained (sorted; ``run.*``,
    ``logger.*`` and ``hydra.*`` left out), for a directory name; ``""`` when there are none.

    Behind the recipes' ``run.dir: runs/<recipe>${tandem.overrides:}``: every command line, and every job of a
    Hydra multirun, gets its own run directory by default, and the same command line finds its run again
    (and resumes it). A run of characters other than letters, digits and ``._=,+-`` becomes one ``_``; a
    long suffix is cut and ends in a hash of the whole.
    """
    import hashlib
    import re

    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith(_NOT_IN_RUN_NAME))
    if not kept:
        return ""
    name = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", ",".join(kept))
    if len(name) > 96:
        name = name[:80] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return "-" + name


def _overrides_resolver() -> str:
    """``${tandem.overrides:}``: :func:`overrides_suffix` of this Hydra job's overrides (``""`` outside a job,
    e.g. when a recipe is composed for inspection or validation)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return overrides_suffix(list(HydraConfig.get().overrides.task))


def register_configs() -> None:
    """Register the schema so recipes under ``recipes/`` are validated against it, and the
    ``${tandem.overrides:}`` resolver the recipes' run directories use."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("tandem.overrides", _overrides_resolver, replace=True)

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in (
        ("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig), ("parallel", ParallelConfig),
        ("precision", PrecisionConfig), ("logger", LoggerConfig), ("stage", StageConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)



#: fields that must be at least this value (a count of steps, sequences or tokens)
_AT_LEAST = {
    "stage.steps": 1, "stage.global_batch": 1, "stage.micro_batch": 1, "data.seq_len": 1, "logger.log_every": 1,
    "stage.eval_every": 0, "stage.eval_batches": 0, "stage.save_every": 0, "stage.keep_last": 1,
    "optim.warmup_steps": 0, "data.num_workers": 0,
}


def validate_config(cfg: Any) -> None:
    """Checks of a composed config that need neither data nor a model (raises :class:`ConfigError`).

    Keys outside the schema (Hydra accepts ``+lr=1e-3`` even where the schema has no such key), counts
    that must be positive, and choice fields read only later in the run. Run before anything is built or
    written, so a bad value never costs a start or touches a run directory.
    """
    outside = list(_keys_outside_schema(cfg))
    if outside:
        raise ConfigError(f"{', '.join(outside)}: not in the run schema (trainer/config.py); '+key=value' cannot add "
                          f"keys, check the spelling")
    for key, least in _AT_LEAST.items():
        section, name = key.split(".")
        value = cfg[section][name]
        if value < least:
            raise ConfigError(f"{key} must be >= {least}, got {value}")
    if cfg.data.path and cfg.data.blend:
        raise ConfigError("data.path and data.blend are both set; give one (data.path=<prefix> is a one-source blend)")
    if not 0.0 <= cfg.data.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction must be in [0, 1), got {cfg.data.valid_fraction}")
    if cfg.logger.kind not in LOGGER_KINDS:
        raise ConfigError(f"logger.kind must be one of {list(LOGGER_KINDS)}, got {cfg.logger.kind!r}")
    validate_memory(cfg)
    validate_parallel(cfg.parallel)
    validate_grpo(cfg.stage.grpo)
    validate_rlhf(cfg.stage.rlhf, required=cfg.stage.name == "rlhf")
    validate_cpt(cfg.stage.cpt, required=cfg.stage.name == "cpt")


def validate_memory(cfg: Any) -> None:
    """``model.activation_checkpointing`` and ``model.loss_chunk_tokens`` (ConfigError naming the key)."""
    from tandem.model.hybrid import activation_checkpointing_kinds

    try:
        kinds = activation_checkpointing_kinds(_plain(cfg.model.activation_checkpointing))
    except ValueError as e:
        raise ConfigError(f"model.activation_checkpointing: {e}") from None
    if not isinstance(cfg.model.get("compile", False), bool):
        raise ConfigError(f"model.compile must be true or false, got {cfg.model.compile!r}")
    chunk = cfg.model.loss_chunk_tokens
    if chunk is not None and chunk < 1:
        raise ConfigError(f"model.loss_chunk_tokens must be >= 1 or null, got {chunk}")
    if kinds and cfg.precision.name == "fp8_delayed":
        # A recompute would quantize with the scale its own forward just updated (not the original one)
        # and push every amax into the history twice.
        raise ConfigError("model.activation_checkpointing cannot be combined with precision.name=fp8_delayed: "
                          "recomputing a block would advance the amax history again; use fp8_current or fp8_block")


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def validate_parallel(p: Any) -> None:
    """Choice fields of ``parallel`` and the engine / ZeRO-stage combinations that contradict each other."""
    if p.engine not in ENGINE_CHOICES:
        raise ConfigError(f"parallel.engine must be one of {list(ENGINE_CHOICES)}, got {p.engine!r}")
    if p.fsdp_param_dtype not in FSDP_PARAM_DTYPES:
        raise ConfigError(f"parallel.fsdp_param_dtype must be one of {list(FSDP_PARAM_DTYPES)}, got {p.fsdp_param_dtype!r}")
    if p.engine in ("ddp", "fsdp") and p.zero_stage != 0:
        raise ConfigError(f"parallel.engine={p.engine} with parallel.zero_stage={p.zero_stage}: ZeRO is the zero engine; "
                          f"set parallel.zero_stage=0 or parallel.engine=zero")
    if p.engine == "zero" and p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.engine=zero needs parallel.zero_stage 1, 2 or 3, got {p.zero_stage}")
    if p.cp < 1:
        raise ConfigError(f"parallel.cp must be >= 1, got {p.cp}")
    if p.cp_attention not in ("sdpa", "te"):
        raise ConfigError(f"parallel.cp_attention must be sdpa or te, got {p.cp_attention!r}")


def validate_grpo(g: Any) -> None:
    """Range and choice checks of ``stage.grpo`` (ConfigError naming the key)."""
    from .inference.backends import ROLLOUT_BACKENDS, ROLLOUT_ENGINES
    from .inference.vllm_backend import check_config as check_vllm_config
    from .rl.advantages import ADVANTAGE_ESTIMATORS
    from .rl.environments.base import BACKENDS
    from .rl.losses import POLICY_LOSSES

    def bad(key: str, why: str, value: Any):
        raise ConfigError(f"stage.grpo.{key} {why}, got {value!r}")

    for key, least in (("prompts_per_step", 1), ("generations_per_prompt", 2), ("max_new_tokens", 1),
                       ("score_workers", 1), ("eval_prompts", 0), ("ppo_epochs", 1), ("minibatches", 1),
                       ("dynamic_sampling_rounds", 0)):
        if g[key] < least:
            bad(key, f"must be >= {least}", g[key])
    if not g.temperature > 0:
        bad("temperature", "must be > 0", g.temperature)
    if not 0 < g.top_p <= 1:
        bad("top_p", "must be in (0, 1]", g.top_p)
    if g.advantage not in ADVANTAGE_ESTIMATORS:
        bad("advantage", f"must be one of {sorted(ADVANTAGE_ESTIMATORS)}", g.advantage)
    if g.advantage_clip is not None and not g.advantage_clip > 0:
        bad("advantage_clip", "must be > 0 or null", g.advantage_clip)
    if g.loss not in POLICY_LOSSES:
        bad("loss", f"must be one of {sorted(POLICY_LOSSES)}", g.loss)
    if not 0 <= g.eps_low < 1:
        bad("eps_low", "must be in [0, 1)", g.eps_low)
    if not g.eps_high >= 0:
        bad("eps_high", "must be >= 0", g.eps_high)
    if g.dual_clip is not None and not g.dual_clip > 1:
        bad("dual_clip", "must be > 1 or null", g.dual_clip)
    if not g.kl_beta >= 0:
        bad("kl_beta", "must be >= 0", g.kl_beta)
    if g.kl_beta > 0 and not g.kl_reference:
        bad("kl_reference", "must name the reference checkpoint when kl_beta > 0", g.kl_reference)
    if g.is_cap is not None and not g.is_cap > 0:
        bad("is_cap", "must be > 0 or null", g.is_cap)
    if not g.score_timeout_s > 0:
        bad("score_timeout_s", "must be > 0", g.score_timeout_s)
    if g.score_backend not in BACKENDS:
        bad("score_backend", f"must be one of {sorted(BACKENDS)}", g.score_backend)
    if g.thinking_budget is not None and g.thinking_budget < 0:
        bad("thinking_budget", "must be >= 0 or null", g.thinking_budget)
    if g.rollout_backend not in ROLLOUT_BACKENDS:
        bad("rollout_backend", f"must be one of {sorted(ROLLOUT_BACKENDS)}", g.rollout_backend)
    if g.rollout_engine not in ROLLOUT_ENGINES:
        bad("rollout_engine", f"must be one of {list(ROLLOUT_ENGINES)}", g.rollout_engine)
    if g.rollout_engine != "eager" and g.rollout_backend != "engine":
        bad("rollout_engine", f"applies to rollout_backend=engine only (rollout_backend={g.rollout_backend})",
            g.rollout_engine)
    if not 0 < g.vllm_gpu_memory_utilization < 1:
        bad("vllm_gpu_memory_utilization", "must be in (0, 1): the trainer needs the rest of the GPU",
            g.vllm_gpu_memory_utilization)
    tasks = [e.task for e in g.environments]
    if len(set(tasks)) != len(tasks):
        bad("environments", "lists a task twice", tasks)
    for i, e in enumerate(g.environments):
        if not e.weight > 0:
            bad(f"environments.{i}.weight", "must be > 0", e.weight)
        if e.thinking_budget is not None and e.thinking_budget < 0:
            bad(f"environments.{i}.thinking_budget", "must be >= 0 or null", e.thinking_budget)
        if e.max_turns < 1:
            bad(f"environments.{i}.max_turns", "must be >= 1", e.max_turns)
    if g.rollout_backend == "vllm":  # what vLLM cannot do like the engine (the machine is checked at bind)
        try:
            check_vllm_config(g)
        except ValueError as e:
            raise ConfigError(str(e)) from None


#: ``stage.rlhf.judge_dtype`` choices (auto: bf16 on CUDA, fp32 on CPU)
JUDGE_DTYPES = ("auto", "bf16", "fp32")


def validate_rlhf(r: Any, required: bool = False) -> None:
    """Range and choice checks of ``stage.rlhf`` (ConfigError naming the key); ``required``: the judge must be named."""
    from .rl.genrm import PAIRINGS

    def bad(key: str, why: str, value: Any):
        raise ConfigError(f"stage.rlhf.{key} {why}, got {value!r}")

    if required and not r.judge:
        bad("judge", "must name the GenRM judge (a tandem run / checkpoint or an HF NemotronH folder)", r.judge)
    if r.pairing not in PAIRINGS:
        bad("pairing", f"must be one of {list(PAIRINGS)}", r.pairing)
    from tandem.data_pipelines.preferences import JUDGE_TEMPLATES

    if r.judge_instructions not in JUDGE_TEMPLATES:
        bad("judge_instructions", f"must be one of {sorted(JUDGE_TEMPLATES)}", r.judge_instructions)
    for key, least in (("judge_samples", 1), ("retries", 0), ("judge_max_new_tokens", 1), ("judge_batch", 1)):
        if r[key] < least:
            bad(key, f"must be >= {least}", r[key])
    if not r.judge_temperature > 0:
        bad("judge_temperature", "must be > 0", r.judge_temperature)
    if getattr(r, "judge_dtype", "auto") not in JUDGE_DTYPES:
        bad("judge_dtype", f"must be one of {list(JUDGE_DTYPES)}", r.judge_dtype)
    for key in ("shortest_top_bonus", "length_penalty"):
        if not r[key] >= 0:
            bad(key, "must be >= 0", r[key])


#: ``stage.cpt.long_loss`` values
LONG_LOSSES = ("all", "answers")


def validate_cpt(c: Any, required: bool = False) -> None:
    """Range checks of ``stage.cpt`` (ConfigError naming the key); ``required``: the long sources must be given."""
    from tandem.data_pipelines.long_context import GENERATORS

    def bad(key: str, why: str, value: Any):
        raise ConfigError(f"stage.cpt.{key} {why}, got {value!r}")

    for key, least in (("long_length", 1), ("short_length", 1), ("eval_per_cell", 0), ("eval_max_new_tokens", 1),
                       ("eval_prefill_chunk", 1)):
        if c[key] < least:
            bad(key, f"must be >= {least}", c[key])
    if c.long_length % c.short_length:
        bad("long_length", f"must be a multiple of stage.cpt.short_length ({c.short_length})", c.long_length)
    if not 0.0 <= c.long_fraction <= 1.0:
        bad("long_fraction", "must be in [0, 1]", c.long_fraction)
    if c.long_loss not in LONG_LOSSES:
        bad("long_loss", f"must be one of {list(LONG_LOSSES)}", c.long_loss)
    if c.long_loss == "answers" and not c.answer_marker:
        bad("answer_marker", "must be the text that precedes each answer when long_loss=answers", c.answer_marker)
    if required and c.long_fraction > 0 and not c.long:
        bad("long", "must list the long sources ([{path, weight}, ...]) when long_fraction > 0", list(c.long))
    for key in ("long", "short"):
        for i, e in enumerate(c[key]):
            if not e.weight >= 0:
                bad(f"{key}[{i}].weight", "must be >= 0", e.weight)
    unknown = [t for t in c.eval_tasks if t not in GENERATORS]
    if unknown or (c.eval_per_cell and not c.eval_tasks):
        bad("eval_tasks", f"must list tasks of {sorted(GENERATORS)}", list(c.eval_tasks))
    if any(n < 16 for n in c.eval_lengths):
        bad("eval_lengths", "must be token counts >= 16", list(c.eval_lengths))
    if not c.eval_depths or any(not 0 <= d <= 1 for d in c.eval_depths):
        bad("eval_depths", "must be a non-empty list of fractions in [0, 1]", list(c.eval_depths))
    import inspect

    for task, options in c.eval_task_options.items():
        if task not in c.eval_tasks:
            bad("eval_task_options", f"names {task!r}, which is not in stage.cpt.eval_tasks", task)
        accepted = set(inspect.signature(GENERATORS[task]).parameters) - {"rng", "target_tokens", "depth", "tokenizer"}
        if set(options) - accepted:
            bad(f"eval_task_options.{task}", f"may set only {sorted(accepted)}", sorted(options))


def _keys_outside_schema(node: Any, prefix: str = ""):
    """Dotted keys of ``node`` that its typed schema (the dataclass behind each node) does not declare."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        schema = OmegaConf.get_type(node)
        declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in node.keys():
            if declared is not None and key not in declared:
                yield f"{prefix}{key}"
            elif not OmegaConf.is_missing(node, key):
                yield from _keys_outside_schema(node[key], f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_missing(node, i):
                yield from _keys_outside_schema(node[i], f"{prefix}{i}.")
