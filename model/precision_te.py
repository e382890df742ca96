"""Transformer Engine backend of :func:`model.precision.apply_precision` (the production face).

**Not run on hardware here**: the machines tandem is developed on have no GPU and cannot install TE.
This path is written against TE ≥ 2.9's public API (``te.Linear``, ``te.GroupedLinear``,
``te.autocast(recipe=…)`` — ``te.fp8_autocast(fp8_recipe=…)`` on older TE — and the recipe classes in
``transformer_engine.common.recipe``); ``tests/precision/test_te_backend.py`` runs it against the
emulation when TE and a capable GPU are present and skips with the reason otherwise.

Design: tandem's parameters stay where they are (same names, same Parameter objects), so state dicts and
checkpoints are identical across backends. A TE module is built *beside* each quantized site (not
registered as a submodule, so its ``_extra_state`` never enters the state dict) and borrows the
Parameters; each quantized forward runs under TE's autocast with the recipe built from the config, and
layers kept in high precision run outside it.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .moe import GroupedExperts

__all__ = ["te_unavailable_reason", "build_te_recipe", "te_autocast", "apply_te", "TELinear", "TEGroupedExperts"]

INSTALL_HINT = ("install the optional 'gpu' extra on a CUDA machine: pip install -e '.[gpu]' "
                "(Transformer Engine builds against the CUDA toolkit; see README)")
#: minimum compute capability per recipe: FP8 needs Ada/Hopper (8.9); MXFP8 and NVFP4 need Blackwell (10.0)
MIN_CAPABILITY = {"fp8_delayed": (8, 9), "fp8_current": (8, 9), "fp8_block": (9, 0), "mxfp8": (10, 0), "nvfp4": (10, 0)}


def _import_te():
    return importlib.import_module("transformer_engine.pytorch")


def te_unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when TE can run recipe ``name`` on ``device``; else a sentence saying why and how to fix it."""
    if device.type != "cuda":
        return f"the model is on {device.type}, and Transformer Engine needs a CUDA GPU"
    try:
        te = _import_te()
    except Exception as e:  # ImportError, or a TE build that does not match the CUDA/torch installed
        return f"Transformer Engine is not importable ({type(e).__name__}: {e}); {INSTALL_HINT}"
    cap = torch.cuda.get_device_capability(device)
    need = MIN_CAPABILITY[name]
    if cap < need:
        gpu = torch.cuda.get_device_name(device)
        what = "Blackwell (compute capability 10.x)" if need >= (10, 0) else f"compute capability >= {need[0]}.{need[1]}"
        return f"{name} needs {what}; this GPU ({gpu}) is {cap[0]}.{cap[1]}"
    check = {"nvfp4": "is_nvfp4_available", "mxfp8": "is_mxfp8_available",
             "fp8_block": "is_fp8_block_scaling_available"}.get(name, "is_fp8_available")
    fn = getattr(te, check, None)
    if fn is not None:
        ok = fn(return_reason=True) if _takes_reason(fn) else fn()
        ok, why = ok if isinstance(ok, tuple) else (ok, "")
        if not ok:
            return f"Transformer Engine reports {name} unavailable: {why}"
    return None


def _takes_reason(fn) -> bool:
    import inspect

    try:
        return "return_reason" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def build_te_recipe(spec):
    """The TE recipe object for a :class:`~model.precision.PrecisionSpec`."""
    from transformer_engine.common import recipe as R

    o = spec.options
    hybrid = R.Format.HYBRID if o.fp8_format == "hybrid" else R.Format.E4M3
    block = R.Format.HYBRID if o.block_fp8_format == "hybrid" else R.Format.E4M3
    if spec.name == "fp8_delayed":
        return R.DelayedScaling(fp8_format=hybrid, margin=o.margin, amax_history_len=o.amax_history_len,
                                amax_compute_algo=o.amax_compute_algo)
    if spec.name == "fp8_current":
        return R.Float8CurrentScaling(fp8_format=hybrid)
    if spec.name == "fp8_block":
        return R.Float8BlockScaling(fp8_format=block)
    if spec.name == "mxfp8":
        return R.MXFP8BlockScaling(fp8_format=block)
    if spec.name == "nvfp4":
        return R.NVFP4BlockScaling(disable_rht=not o.nvfp4_rht, disable_stochastic_rounding=not o.nvfp4_stochastic_rounding,
                                   disable_2d_quantization=not o.nvfp4_2d_weights)
    raise ValueError(f"no Transformer Engine recipe for precision {spec.name!r}")


def te_autocast(recipe):
    """TE's autocast for ``recipe`` (``te.autocast`` on TE ≥ 2.9, ``te.fp8_autocast`` before)."""
    te = _import_te()
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


class TELinear(nn.Linear):
    """``nn.Linear`` (same Parameters, same state dict) whose forward is a ``te.Linear`` under autocast."""

    def __init__(self, linear: nn.Linear, recipe):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        te = _import_te()
        inner = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          params_dtype=linear.weight.dtype, device=linear.weight.device)
        inner.weight = self.weight  # borrow tandem's Parameters
        if linear.bias is not None:
            inner.bias = self.bias
        object.__setattr__(self, "_te", inner)  # not a registered submodule: no _extra_state in state dicts
        object.__setattr__(self, "_recipe", recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bind the Parameters this module holds *now*: a data-parallel engine may have replaced them since
        # (FSDP2 swaps in sharded Parameters, and the gathered ones during forward)
        self._te._parameters["weight"] = self.weight
        if self.bias is not None:
            self._te._parameters["bias"] = self.bias
        with te_autocast(self._recipe):
            return self._te(x)


class TEGroupedExperts(GroupedExperts):
    """GroupedExperts whose two grouped GEMMs run as ``te.GroupedLinear`` (one GEMM per expert, fused).

    The stacked ``up_proj [E, I, H]`` / ``down_proj [E, H, I]`` Parameters stay (same state dict); on
    each forward the TE modules' ``weight{e}`` entries are bound to the slices ``up_proj[e]``, so the
    gradient flows back into the stacked Parameters through autograd.
    """

    def _bind(self, gl, stacked: torch.Tensor) -> None:
        for e in range(self.num_experts):
            gl._parameters[f"weight{e}"] = stacked[e]  # a view; TE reads weights via getattr(self, f"weight{e}")

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert.tolist()
        up, down = self._te_modules
        self._bind(up, self.up_proj)
        self._bind(down, self.down_proj)
        with te_autocast(self._te_recipe):
            h = up(x_sorted, counts)
            h = self.act_fn(h)
            return down(h, counts)


def _to_te_experts(experts: GroupedExperts, recipe) -> None:
    te = _import_te()
    e, i, h = experts.up_proj.shape
    kw = dict(bias=False, params_dtype=experts.up_proj.dtype, device=experts.up_proj.device)
    mods = (te.GroupedLinear(e, h, i, **kw), te.GroupedLinear(e, i, h, **kw))
    experts.__class__ = TEGroupedExperts
    object.__setattr__(experts, "_te_modules", mods)  # unregistered: the state dict keeps the stacked layout
    object.__setattr__(experts, "_te_recipe", recipe)


def apply_te(model: nn.Module, spec, plan) -> None:
    """Swap the plan's quantized sites for TE modules; records the recipe on the plan."""
    recipe = build_te_recipe(spec)
    plan.te_recipe = recipe
    for name in plan.quantized:
        mod = model.get_submodule(name)
        if isinstance(mod, GroupedExperts):
            _to_te_experts(mod, recipe)
            continue
        if mod.in_features % 16 or mod.out_features % 16:
            plan.notes.append(f"{name} kept high precision (TE needs dims divisible by 16, got {mod.in_features}→{mod.out_features})")
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, TELinear(mod, recipe))
