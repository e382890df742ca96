"""NVFP4 checkpoints in the quantized release layout (NVIDIA ModelOpt's Hugging Face export).

For every quantized linear ``<m>``:

- ``<m>.weight``         uint8 ``[out, in/2]``: two E2M1 codes per byte, element ``2j`` in the low nibble;
- ``<m>.weight_scale``   float8_e4m3fn ``[out, in/16]``: one scale per 16 consecutive inputs;
- ``<m>.weight_scale_2`` fp32 scalar: the per-tensor decode scale ``amax(W) / (448 · 6)``;
- ``<m>.input_scale``    fp32 scalar: the same for the layer's input activations (calibrated).

``W = (e2m1(weight) · fp32(weight_scale)) · weight_scale_2``. Routed experts are stored per expert
(``…experts.{e}.up_proj.weight`` etc.) like the unquantized release; ``config.json`` carries
``quantization_config`` (``quant_algo: NVFP4``, ``group_size: 16``, ``exclude_modules``).

:func:`nvfp4_reader` is what :func:`tandem.model.checkpoint.load_checkpoint_into` consults to dequantize such a
checkpoint into the training dtype (so one can fine-tune from an NVFP4 release); :func:`export_nvfp4`
writes a model in the layout. Export → load reproduces the dequantized weights exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tandem.kernels.quant.formats import e2m1_decode, pack_e2m1, unpack_e2m1
from tandem.kernels.quant.scaled import quantize_nvfp4

from .checkpoint_io import CONFIG_NAME, SINGLE_FILE, CheckpointError, checkpoint_items, open_safetensors, staged_directory
from .moe import GroupedExperts

__all__ = ["nvfp4_reader", "NVFP4Reader", "dequantize_nvfp4_weight", "export_nvfp4", "AUX_SUFFIXES"]

AUX_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")
GROUP = 16


def dequantize_nvfp4_weight(packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """Release-layout tensors → fp32 weight ``[out, in]``."""
    values = e2m1_decode(unpack_e2m1(packed))
    s = weight_scale.float().repeat_interleave(GROUP, dim=1)[:, : values.shape[1]]
    return (values * s) * weight_scale_2.float().reshape(())


class NVFP4Reader:
    """Knows which keys of a checkpoint are packed NVFP4 weights and where their scales live."""

    def __init__(self, key_files: dict[str, Path]):
        self.key_files = key_files
        self.packed = {k[: -len(".weight_scale")] + ".weight" for k in key_files if k.endswith(".weight_scale")}

    def is_aux(self, key: str) -> bool:
        return key.endswith(AUX_SUFFIXES)

    def is_packed(self, key: str) -> bool:
        return key in self.packed

    def _aux(self, key: str, suffix: str) -> torch.Tensor:
        name = key[: -len(".weight")] + suffix
        if name not in self.key_files:
            raise CheckpointError(f"NVFP4 checkpoint: {key!r} has a weight_scale but no {name!r}")
        with open_safetensors(self.key_files[name]) as f:
            return f.get_tensor(name)

    def logical_shape(self, key: str, packed_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(packed_shape) != 2:
            raise CheckpointError(f"NVFP4 checkpoint: packed weight {key!r} must be 2-D [out, in/2], got {packed_shape}")
        return (packed_shape[0], packed_shape[1] * 2)

    def dequantize(self, key: str, packed: torch.Tensor) -> torch.Tensor:
        if packed.dtype != torch.uint8:
            raise CheckpointError(f"NVFP4 checkpoint: {key!r} should be uint8 (two E2M1 codes per byte), got {packed.dtype}")
        scale = self._aux(key, ".weight_scale")
        scale2 = self._aux(key, ".weight_scale_2")
        out, half = packed.shape
        expect = (out, -(-half * 2 // GROUP))
        if scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != expect:
            raise CheckpointError(
                f"NVFP4 checkpoint: {key[:-7]}.weight_scale should be float8_e4m3fn {expect}, got {scale.dtype} {tuple(scale.shape)}")
        if scale2.numel() != 1:
            raise CheckpointError(f"NVFP4 checkpoint: {key[:-7]}.weight_scale_2 should be a scalar, got shape {tuple(scale2.shape)}")
        return dequantize_nvfp4_weight(packed, scale, scale2)


def nvfp4_reader(files: list[Path]) -> NVFP4Reader | None:
    """An :class:`NVFP4Reader` when the checkpoint files hold NVFP4 weights, else None (reads headers only)."""
    key_files: dict[str, Path] = {}
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                key_files[key] = file
    if not any(k.endswith(".weight_scale_2") for k in key_files):
        return None
    return NVFP4Reader(key_files)


# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def _input_amax(model, sites: list[str], calibration_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Max |input| of every quantized GEMM site over one forward of ``calibration_inputs``."""
    amax: dict[str, torch.Tensor] = {}
    handles, restore = [], []

    def record(name, x):
        a = x.detach().abs().amax().float().cpu()
        amax[name] = torch.maximum(amax[name], a) if name in amax else a

    for name in sites:
        mod = model.get_submodule(name)
        if isinstance(mod, GroupedExperts):
            orig = mod.matmul

            def wrapped(x, w, _mod=mod, _name=name, _orig=orig):
                proj = "up_proj" if w.untyped_storage().data_ptr() == _mod.up_proj.untyped_storage().data_ptr() else "down_proj"
                e = (w.storage_offset() - getattr(_mod, proj).storage_offset()) // w.numel()
                record(f"{_name}.{e}.{proj}", x)
                return _orig(x, w)

            mod.matmul = wrapped
            restore.append((mod, orig))
        else:
            handles.append(mod.register_forward_pre_hook(lambda m, args, _n=name: record(_n, args[0])))
    try:
        was_training = model.training
        model.eval()
        model(calibration_inputs)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        for mod, orig in restore:
            mod.matmul = orig
    return amax


def export_nvfp4(model, path: str | Path, calibration_inputs: torch.Tensor, *, dtype: torch.dtype | None = torch.bfloat16,
                 sites: list[str] | None = None) -> Path:
    """Write ``model`` in the NVFP4 release layout (one safetensors file + ``config.json``).

    ``sites``: quantized GEMM sites (``nn.Linear`` names / ``…experts``); default the model's
    ``precision_plan.quantized`` when :func:`~tandem.model.precision.apply_precision` ran, else every mixer
    linear and expert (the router, norms, conv1d, embeddings and lm_head are never quantized).
    ``calibration_inputs``: token ids ``[B, T]`` run once to set each ``input_scale``. Unquantized tensors
    are stored in ``dtype`` (the router stays fp32). Weights use 1×16 blocks with round-to-nearest-even.
    """
    from .precision import PrecisionSpec, quantized_module_names

    path = Path(path)
    if sites is None:
        plan = getattr(model, "precision_plan", None)
        sites = list(plan.quantized) if plan is not None and plan.quantized else quantized_module_names(model, PrecisionSpec("nvfp4"))[0]
    amax = _input_amax(model, sites, calibration_inputs)
    quant_keys: dict[str, str] = {}  # checkpoint weight key → calibration name
    for name in sites:
        mod = model.get_submodule(name)
        if isinstance(mod, GroupedExperts):
            for e in range(mod.num_experts):
                for proj in ("up_proj", "down_proj"):
                    quant_keys[f"{name}.{e}.{proj}.weight"] = f"{name}.{e}.{proj}"
        else:
            quant_keys[f"{name}.weight"] = name
    tensors: dict[str, torch.Tensor] = {}
    for key, t in checkpoint_items(model.state_dict()):
        t = t.detach().cpu()
        if key in quant_keys:
            if t.shape[1] % 2:
                raise ValueError(f"export_nvfp4: {key} has an odd number of inputs ({t.shape[1]}); E2M1 packing needs pairs")
            q = quantize_nvfp4(t.float(), (1, 16))
            base = key[: -len(".weight")]
            tensors[key] = pack_e2m1(q.codes()).contiguous()
            tensors[base + ".weight_scale"] = q.block_scale.contiguous()
            tensors[base + ".weight_scale_2"] = q.global_decode.reshape(()).clone()
            a = amax.get(quant_keys[key], torch.zeros(()))  # an expert no calibration token reached: 0
            tensors[base + ".input_scale"] = (a / (448.0 * 6.0)).reshape(()).float()
        elif dtype is not None and t.is_floating_point() and not key.endswith(("mixer.gate.weight", "e_score_correction_bias")):
            tensors[key] = t.to(dtype).contiguous()
        else:
            tensors[key] = t.contiguous()
    excluded = sorted({k.rsplit(".", 1)[0] for k, t in checkpoint_items(model.state_dict())
                       if k.endswith(".weight") and k not in quant_keys and t.dim() == 2})
    config = model.config.to_hf_dict()
    stored = dtype or model.lm_head.weight.dtype
    config["dtype"] = config["torch_dtype"] = str(stored).replace("torch.", "")
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": GROUP,
                                     "exclude_modules": excluded}
    with staged_directory(path) as tmp:
        save_file(tensors, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
