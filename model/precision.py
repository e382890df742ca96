"""Low-precision training applied to a built model from outside: ``apply_precision(model, spec)``.

Policy (what is quantized):

- quantized: every ``nn.Linear`` inside a block's mixer (Mamba ``in_proj``/``out_proj``; attention
  ``q/k/v/o_proj``; MLP and shared-expert ``up/down_proj``; MoE latent projections) and the routed
  experts' GEMMs (through the one hook :attr:`tandem.model.moe.GroupedExperts.matmul`);
- never quantized: ``backbone.embeddings``, ``lm_head``, the router ``mixer.gate`` (fp32 by design),
  every norm, attention scores/softmax (SDPA), the SSM scan and the depthwise conv1d;
- the first ``high_precision_first`` and last ``high_precision_last`` blocks keep all their linears in
  high precision (the NVFP4 recipe keeps ~16% of linears in BF16: first 2 / last 8 blocks of the 12B
  study; the tiny-model defaults in ``recipes/precision/*.yaml`` keep the first and last block).

Two backends behind one :class:`PrecisionSpec`:

- ``emulate`` (any device, the reference face): :class:`QuantLinear` (an ``nn.Linear`` subclass holding
  the *same* ``weight``/``bias`` Parameters) and a wrapped expert matmul, both running
  :func:`tandem.kernels.quant.quantized_linear`. State dicts are unchanged, so checkpoints move freely between
  fp32/bf16/emulated/TE runs.
- ``te`` (Transformer Engine, GPU): see :mod:`tandem.model.precision_te`. ``auto`` picks ``te`` when TE imports
  and the GPU supports the format, else ``emulate`` (and says why in :attr:`PrecisionPlan.notes`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tandem.kernels.quant import RECIPES, LinearQuantizers, RecipeOptions, build_quantizers, quantized_linear

from .moe import GroupedExperts

__all__ = [
    "PrecisionSpec", "PrecisionPlan", "PrecisionError", "QuantLinear", "QuantizedExpertMatmul", "apply_precision",
    "HIGH_PRECISION_NAMES", "QUANTIZED_NAMES", "quantized_module_names",
]

log = logging.getLogger(__name__)

HIGH_PRECISION_NAMES = ("auto", "fp32", "bf16")
QUANTIZED_NAMES = tuple(RECIPES)  # fp8_delayed, fp8_current, fp8_block, mxfp8, nvfp4
BACKENDS = ("auto", "emulate", "te")


class PrecisionError(ValueError):
    """A precision setting that cannot be honoured; the message names the key and the fix."""


@dataclass
class PrecisionSpec:
    """What ``precision`` asks for (mirrors ``tandem.trainer.config.PrecisionConfig``; model/ never imports trainer)."""

    name: str = "auto"
    backend: str = "auto"
    high_precision_first: int = 0
    high_precision_last: int = 0
    options: RecipeOptions = field(default_factory=RecipeOptions)

    @classmethod
    def from_config(cls, cfg: Any) -> "PrecisionSpec":
        """From a dataclass / DictConfig / dict with ``name``, ``backend``, ``high_precision_*`` and any
        :class:`~tandem.kernels.quant.RecipeOptions` field at top level."""
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
        opts = {f.name: get(f.name) for f in dataclasses.fields(RecipeOptions) if get(f.name) is not None}
        return cls(
            name=get("name", "auto"), backend=get("backend", "auto") or "auto",
            high_precision_first=int(get("high_precision_first", 0) or 0),
            high_precision_last=int(get("high_precision_last", 0) or 0),
            options=RecipeOptions(**opts),
        )

    @property
    def quantized(self) -> bool:
        return self.name in QUANTIZED_NAMES

    def validate(self) -> None:
        if self.name not in HIGH_PRECISION_NAMES + QUANTIZED_NAMES:
            raise PrecisionError(f"precision.name must be one of {list(HIGH_PRECISION_NAMES + QUANTIZED_NAMES)}, got {self.name!r}")
        if self.backend not in BACKENDS:
            raise PrecisionError(f"precision.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        for key in ("high_precision_first", "high_precision_last"):
            if getattr(self, key) < 0:
                raise PrecisionError(f"precision.{key} must be >= 0, got {getattr(self, key)}")
        try:
            build_quantizers(self.name, self.options) if self.quantized else None
        except ValueError as e:
            raise PrecisionError(str(e)) from None


@dataclass
class PrecisionPlan:
    """What :func:`apply_precision` did: backend used, quantized / kept module names, notes."""

    name: str
    backend: str
    quantized: list[str] = field(default_factory=list)
    high_precision: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    te_recipe: Any = None

    def summary(self) -> str:
        n_q, n_h = len(self.quantized), len(self.high_precision)
        frac = n_h / max(n_q + n_h, 1)
        s = f"precision {self.name} ({self.backend}): {n_q} GEMM sites quantized, {n_h} kept high precision ({frac:.0%})"
        return s + "".join(f"; {n}" for n in self.notes)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose GEMMs are quantize–dequantize emulated; same parameters and state dict."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, quantizers: LinearQuantizers,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.quantizers = quantizers

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizers: LinearQuantizers) -> "QuantLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, quantizers=quantizers, device="meta")
        new.weight = linear.weight  # the same Parameter objects: optimizer state and tying survive
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias, self.quantizers)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recipe={self.quantizers.name}"


class QuantizedExpertMatmul:
    """Replacement for ``GroupedExperts.matmul``: each expert GEMM through :func:`quantized_linear`.

    Recipes with state (delayed scaling) need one state per weight; the weight passed in is a view
    ``up_proj[e]`` / ``down_proj[e]``, identified here by its storage and offset.
    """

    def __init__(self, experts: GroupedExperts, recipe: str, options: RecipeOptions):
        self.recipe, self.options = recipe, options
        self._experts = experts
        self._quantizers: dict[tuple[str, int], LinearQuantizers] = {}

    def _key(self, weight: torch.Tensor) -> tuple[str, int]:
        for name in ("up_proj", "down_proj"):
            p = getattr(self._experts, name)
            if weight.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
                return name, (weight.storage_offset() - p.storage_offset()) // p[0].numel()
        return "other", id(weight)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        key = self._key(weight)
        if key not in self._quantizers:
            self._quantizers[key] = build_quantizers(self.recipe, self.options)
        return quantized_linear(x, weight, None, self._quantizers[key])

    def __repr__(self) -> str:
        return f"QuantizedExpertMatmul(recipe={self.recipe})"


def _blocks(model: nn.Module):
    backbone = getattr(model, "backbone", None)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise PrecisionError("apply_precision expects a HybridLM-like model with backbone.layers")
    return layers


def quantized_module_names(model: nn.Module, spec: PrecisionSpec) -> tuple[list[str], list[str]]:
    """(quantized, kept-high-precision) GEMM sites under the layer policy: ``nn.Linear`` module names
    and ``…experts`` for each GroupedExperts."""
    layers = _blocks(model)
    n = len(layers)
    hp = set(range(min(spec.high_precision_first, n))) | set(range(max(n - spec.high_precision_last, 0), n))
    quantized, kept = [], []
    for i, block in enumerate(layers):
        for name, mod in block.mixer.named_modules():
            if isinstance(mod, (nn.Linear, GroupedExperts)):
                full = f"backbone.layers.{i}.mixer.{name}"
                (kept if i in hp else quantized).append(full)
    return quantized, kept


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def apply_precision(model: nn.Module, cfg: Any, device: torch.device | str | None = None) -> nn.Module:
    """Make ``model`` train in the precision ``cfg`` asks for (a :class:`PrecisionSpec` or a config with
    the same fields). ``device``: where it will run (default: where its parameters are; give it for a model
    still on ``meta``, whose backend — TE or emulation — depends on the device it will be materialised on). Must run before the optimizer is built only if a backend replaces parameters
    (neither does: ``QuantLinear`` reuses the Parameter objects). Returns the model; the plan is on
    ``model.precision_plan``.
    """
    spec = cfg if isinstance(cfg, PrecisionSpec) else PrecisionSpec.from_config(cfg)
    spec.validate()
    if not spec.quantized:
        model.precision_plan = PrecisionPlan(spec.name, "torch")
        return model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    backend, notes = _choose_backend(spec, device)
    quantized, kept = quantized_module_names(model, spec)
    plan = PrecisionPlan(spec.name, backend, quantized, kept, notes)
    if backend == "te":
        from .precision_te import apply_te

        apply_te(model, spec, plan)
    else:
        for name in quantized:
            mod = model.get_submodule(name)
            if isinstance(mod, GroupedExperts):
                mod.matmul = QuantizedExpertMatmul(mod, spec.name, spec.options)
            else:
                _set_submodule(model, name, QuantLinear.from_linear(mod, build_quantizers(spec.name, spec.options)))
    model.precision_plan = plan
    log.info(plan.summary())
    return model


def _choose_backend(spec: PrecisionSpec, device: torch.device) -> tuple[str, list[str]]:
    if spec.backend == "emulate":
        return "emulate", []
    from .precision_te import te_unavailable_reason

    reason = te_unavailable_reason(spec.name, device)
    if spec.backend == "te":
        if reason:
            raise PrecisionError(f"precision.backend=te for {spec.name}: {reason}. Or set precision.backend=emulate.")
        return "te", []
    if reason:
        return "emulate", [f"emulated because {reason}"]
    return "te", []
