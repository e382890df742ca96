"""``HybridConfig``: the hybrid Mamba-2 / attention / MLP / MoE network, with NemotronH field names.

The layout is data: ``hybrid_override_pattern`` has one character per layer

    ``M`` Mamba-2 mixer   ``*`` attention (GQA, no RoPE)   ``-`` dense MLP   ``E`` sparse MoE

and one group of fields per layer kind configures every layer of that kind. Field names are those of
transformers' ``NemotronHConfig`` so a released ``config.json`` maps onto this class one to one
(:meth:`HybridConfig.from_hf_dict` / :meth:`HybridConfig.to_hf_dict`). Fields that exist only in tandem
are marked "tandem" below and are not written to ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["HybridConfig", "LAYER_KINDS", "PRESETS"]

#: pattern character → layer kind
LAYER_KINDS: dict[str, str] = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}

# transformers' `layers_block_type` names (5.x writes the first of each pair; older tools the second).
_BLOCK_TYPE_TO_CHAR = {
    "linear_attention": "M", "mamba": "M",
    "full_attention": "*", "attention": "*",
    "mlp": "-",
    "moe": "E",
}
# Older NemotronH configs use these names for the Mamba fields (transformers accepts both).
_LEGACY_FIELD_NAMES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
}
_ACTIVATIONS = ("relu2", "silu", "gelu")
_SSD_IMPLS = ("auto", "torch", "triton")  # tandem.kernels.ssd.IMPLS


@dataclass
class HybridConfig:
    # --- layout and shared -------------------------------------------------------------------------
    hybrid_override_pattern: str = "M*-E"
    vocab_size: int = 131072
    hidden_size: int = 2688
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False  # NemotronH is untied; tied is rejected
    max_position_embeddings: int = 262144  # informational: no positional embedding exists
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # --- attention (`*`) ---------------------------------------------------------------------------
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # --- dense MLP (`-`); also the activation of MoE experts ---------------------------------------
    intermediate_size: int = 1856
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    # --- Mamba-2 (`M`) -----------------------------------------------------------------------------
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64  # d_inner = mamba_num_heads * mamba_head_dim (not expand * hidden_size)
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    use_bias: bool = False  # bias of the Mamba in_proj / out_proj (transformers' `use_bias`)
    chunk_size: int = 128
    mamba_hidden_act: str = "silu"
    time_step_min: float = 1e-3  # dt init range (and transformers' dt clamp; see time_step_limit)
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    # Clamp applied to dt = softplus(dt_raw + dt_bias). (0, inf) = no clamp, the original kernels'
    # behaviour; transformers' NemotronH clamps at (time_step_min, inf) regardless of this field.
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # --- sparse MoE (`E`) --------------------------------------------------------------------------
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    n_shared_experts: int = 1  # 0 or 1 (transformers always builds one)
    moe_latent_size: int | None = None  # experts work in a smaller latent space when set
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # training-time MoE options (tandem only, not in config.json)
    moe_aux_loss_coeff: float = 0.0  # tandem: sequence-level balance loss coefficient (1e-4 in nano3 recipes)
    moe_z_loss_coeff: float = 0.0  # tandem: router z-loss coefficient
    moe_grouped_gemm: bool = True  # tandem: one grouped GEMM for all experts where supported (else a loop)
    # --- initialisation ----------------------------------------------------------------------------
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    # --- tandem only (not in config.json) -----------------------------------------------------------
    ssd_impl: str = "auto"  # tandem: SSD scan implementation, see tandem.kernels.ssd.chunk_scan

    _TANDEM_ONLY = ("ssd_impl", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_grouped_gemm")

    def __post_init__(self):
        self.time_step_limit = _decode_limit(self.time_step_limit, "time_step_limit")
        self.validate()

    # ------------------------------------------------------------------------------------------------
    # derived sizes
    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layer_kinds(self) -> list[str]:
        return [LAYER_KINDS[ch] for ch in self.hybrid_override_pattern]

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        """Rows of ``in_proj``: z [d_inner] | xBC [d_inner + 2·G·N] | dt [heads]."""
        return 2 * self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size + self.mamba_num_heads

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what was expected."""
        pattern = self.hybrid_override_pattern
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"hybrid_override_pattern must be a non-empty string of {list(LAYER_KINDS)}, got {pattern!r}")
        for i, ch in enumerate(pattern):
            if ch not in LAYER_KINDS:
                raise ValueError(
                    f"hybrid_override_pattern: unknown layer character {ch!r} at position {i} in {pattern!r}; "
                    f"expected one of 'M' (Mamba-2), '*' (attention), '-' (MLP), 'E' (MoE)"
                )
        for name in ("vocab_size", "hidden_size"):
            _positive(self, name)
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported: NemotronH has an untied lm_head")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        kinds = set(pattern)
        if "*" in kinds:
            for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
                _positive(self, name)
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                    f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
                )
        if "-" in kinds:
            _positive(self, "intermediate_size")
        if kinds & {"-", "E"} and self.mlp_hidden_act not in _ACTIVATIONS:
            raise ValueError(f"mlp_hidden_act must be one of {_ACTIVATIONS}, got {self.mlp_hidden_act!r}")
        if "M" in kinds:
            for name in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size"):
                _positive(self, name)
            if self.mamba_num_heads % self.n_groups:
                raise ValueError(
                    f"mamba_num_heads ({self.mamba_num_heads}) must be divisible by n_groups ({self.n_groups}): "
                    f"each group of B/C is shared by mamba_num_heads / n_groups heads"
                )
            if self.mamba_d_inner % self.n_groups:
                raise ValueError(
                    f"d_inner = mamba_num_heads * mamba_head_dim = {self.mamba_d_inner} must be divisible by "
                    f"n_groups ({self.n_groups}) for the grouped gated RMSNorm"
                )
            if self.mamba_hidden_act not in ("silu", "swish"):
                raise ValueError(f"mamba_hidden_act must be 'silu', got {self.mamba_hidden_act!r}")
            lo, hi = self.time_step_limit
            if not (0.0 <= lo < hi):
                raise ValueError(f"time_step_limit must be (lo, hi) with 0 <= lo < hi, got {self.time_step_limit}")
            if not (0 < self.time_step_min <= self.time_step_max):
                raise ValueError(
                    f"need 0 < time_step_min <= time_step_max, got {self.time_step_min}, {self.time_step_max}"
                )
        if "E" in kinds:
            for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
                _positive(self, name)
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= n_routed_experts ({self.n_routed_experts})"
                )
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                raise ValueError("group-limited routing (n_group > 1) needs at least 2 experts per group")
            if self.n_shared_experts not in (0, 1):
                raise ValueError(f"n_shared_experts must be 0 or 1, got {self.n_shared_experts}")
            if self.n_shared_experts:
                _positive(self, "moe_shared_expert_intermediate_size")
            if self.moe_latent_size is not None:
                _positive(self, "moe_latent_size")
            if self.moe_aux_loss_coeff < 0 or self.moe_z_loss_coeff < 0:
                raise ValueError("moe_aux_loss_coeff and moe_z_loss_coeff must be >= 0")
        if self.ssd_impl not in _SSD_IMPLS:
            raise ValueError(f"ssd_impl must be one of {_SSD_IMPLS}, got {self.ssd_impl!r}")

    # ------------------------------------------------------------------------------------------------
    # presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "HybridConfig":
        """A named shape (``tiny``, ``nano3``, ``nemotron_h_8b``), optionally with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown HybridConfig field(s) {sorted(unknown)} in overrides for preset {name!r}")
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> "HybridConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------
    # transformers / released config.json interop
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "HybridConfig":
        """Build from a NemotronH ``config.json`` dict (release or transformers form).

        Accepts ``hybrid_override_pattern`` or ``layers_block_type``, the legacy ``mamba_*`` field names
        and transformers' ``{"__float__": "Infinity"}`` encoding. Unknown keys are ignored (configs carry
        many that do not affect the network: ``architectures``, ``torch_dtype``, ``use_cache``, …).
        ``source`` names the file in errors.
        """
        model_type = d.get("model_type")
        if model_type != "nemotron_h":
            raise ValueError(f"{source}: model_type is {model_type!r}; tandem loads 'nemotron_h' checkpoints only")
        d = dict(d)
        for old, new in _LEGACY_FIELD_NAMES.items():
            if old in d:
                d.setdefault(new, d.pop(old))
        if "hybrid_override_pattern" not in d:
            block_types = d.get("layers_block_type") or d.get("layer_types")
            if not block_types:
                raise ValueError(f"{source}: needs 'hybrid_override_pattern' or 'layers_block_type'")
            try:
                d["hybrid_override_pattern"] = "".join(_BLOCK_TYPE_TO_CHAR[t] for t in block_types)
            except KeyError as e:
                raise ValueError(
                    f"{source}: layers_block_type has unknown type {e.args[0]!r}; "
                    f"expected one of {sorted(_BLOCK_TYPE_TO_CHAR)}"
                ) from None
        names = {f.name for f in fields(cls)} - set(cls._TANDEM_ONLY)
        kwargs = {k: _decode_json_value(v) for k, v in d.items() if k in names}
        if isinstance(kwargs.get("eos_token_id"), list):  # some configs list several stop tokens
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs.setdefault("time_step_limit", (0.0, math.inf))  # absent → the original kernels' (0, inf)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """``config.json`` content that transformers' ``NemotronHForCausalLM.from_pretrained`` loads."""
        out: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        for f in fields(self):
            if f.name in self._TANDEM_ONLY:
                continue
            out[f.name] = _encode_json_value(getattr(self, f.name))
        out["num_hidden_layers"] = self.num_hidden_layers
        out["mamba_proj_bias"] = self.use_bias
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "HybridConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_hf_dict(d, source=str(path))


PRESETS: dict[str, dict[str, Any]] = {
    # A few-hundred-thousand-parameter model with all four layer kinds; one train step ≪ 1 s on CPU.
    "tiny": dict(
        hybrid_override_pattern="ME*M-E", vocab_size=512, hidden_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64, routed_scaling_factor=2.5,
        max_position_embeddings=4096,
    ),
    # NVIDIA Nemotron 3 Nano 30B-A3B: 52 layers, 23 Mamba-2 + 23 MoE + 6 attention.
    "nano3": dict(
        hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        vocab_size=131072, hidden_size=2688, layer_norm_epsilon=1e-5, max_position_embeddings=262144,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        intermediate_size=1856,  # unused: the pattern has no dense MLP layer
        mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
        n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5, n_group=1, topk_group=1,
        norm_topk_prob=True,
    ),
    # NVIDIA Nemotron-H 8B: dense (Mamba-2 / MLP / attention), no MoE.
    "nemotron_h_8b": dict(
        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        vocab_size=131072, hidden_size=4096, max_position_embeddings=8192,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=21504,
        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
    ),
}


def _positive(cfg: HybridConfig, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _decode_json_value(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"__float__"}:
        return float(v["__float__"])
    if isinstance(v, list):
        return [_decode_json_value(x) for x in v]
    return v


def _encode_json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return {"__float__": "Infinity" if v > 0 else ("-Infinity" if v < 0 else "NaN")}
    if isinstance(v, (list, tuple)):
        return [_encode_json_value(x) for x in v]
    return v


def _decode_limit(v: Any, name: str) -> tuple[float, float]:
    v = _decode_json_value(v)
    try:
        lo, hi = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi), got {v!r}") from None
    return (lo, hi)
