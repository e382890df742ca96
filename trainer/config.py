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
from typing import Any, List, Optional

from tandem.model import HybridConfig

__all__ = [
    "BlendEntry", "ChatDataConfig", "ConfigError", "DataConfig", "LoggerConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
    "LOGGER_KINDS", "PrecisionConfig", "RunConfig", "RunSection", "StageConfig", "build_hybrid_config", "register_configs",
    "validate_config",
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
    ]
    for f in dataclasses.fields(HybridConfig):
        spec.append((f.name, _optional_type(hints[f.name]), dataclasses.field(default=None)))
    return dataclasses.make_dataclass("ModelConfig", spec, namespace={"__doc__": "Model preset + field overrides."})


ModelConfig = _model_config_class()


#: ``model.preset`` value meaning "the shape of the checkpoint named by ``model.init_from``"
FROM_CHECKPOINT = "init_from"


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
class DataConfig:
    # Phase-1 blend (e.g. the diversity mixture) and the phase-2 blend (e.g. the high-quality mixture).
    phase1: List[BlendEntry] = field(default_factory=list)
    phase2: List[BlendEntry] = field(default_factory=list)
    # Token fraction of the run at which phase 2 starts (0.94 in the nano3 recipe); 1.0 = phase 1 only.
    phase2_start: float = 1.0
    seq_len: int = 256
    # Fraction of every source's documents held out for evaluation.
    valid_fraction: float = 0.02
    seed: int = 1234
    # SFT conversations (stage.name=sft); pretraining reads phase1/phase2.
    chat: ChatDataConfig = field(default_factory=ChatDataConfig)


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


@dataclass
class ParallelConfig:
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    # The data-parallel size is derived: world_size / (tp * cp * ep-shards). TP/CP/EP and ZeRO arrive with
    # the MoE/EP issue; the engine registry (tandem.trainer.parallel.engines) is where they plug in.
    tp: int = 1
    cp: int = 1
    ep: int = 1
    zero_stage: int = 0


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
    nan_tolerance: int = 5  # abort after this many consecutive non-finite steps
    seed: int = 0


@dataclass
class RunSection:
    dir: str = "runs/default"
    # auto: resume from <dir>/checkpoints/latest if present; never: start fresh (refuses a non-empty run
    # directory); or an explicit checkpoint path.
    resume: str = "auto"


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


def register_configs() -> None:
    """Register the schema so recipes under ``recipes/`` are validated against it."""
    from hydra.core.config_store import ConfigStore

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
    "optim.warmup_steps": 0,
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
    if not 0.0 <= cfg.data.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction must be in [0, 1), got {cfg.data.valid_fraction}")
    if cfg.logger.kind not in LOGGER_KINDS:
        raise ConfigError(f"logger.kind must be one of {list(LOGGER_KINDS)}, got {cfg.logger.kind!r}")


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
