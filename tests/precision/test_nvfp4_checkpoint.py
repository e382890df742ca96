"""NVFP4 checkpoints in the quantized release layout: export → load is exact; malformed files are named."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tandem.kernels.quant import quantize_nvfp4
from tandem.kernels.quant.formats import e2m1_decode, unpack_e2m1
from tandem.model import HybridConfig, HybridLM
from tandem.model.checkpoint import CheckpointError
from tandem.model.precision import PrecisionSpec, apply_precision
from tandem.model.checkpoint_nvfp4 import export_nvfp4


@pytest.fixture
def exported(tmp_path):
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    apply_precision(model, PrecisionSpec("nvfp4", high_precision_first=1, high_precision_last=1))
    export_nvfp4(model, tmp_path / "q", torch.randint(0, 512, (2, 16)), dtype=torch.bfloat16)
    return model, tmp_path / "q"


def test_layout(exported):
    model, path = exported
    f = safe_open(str(path / "model.safetensors"), "pt")
    base = "backbone.layers.2.mixer.q_proj"
    w = f.get_tensor(base + ".weight")
    assert w.dtype == torch.uint8 and w.shape == (64, 32)
    assert f.get_tensor(base + ".weight_scale").dtype == torch.float8_e4m3fn
    assert f.get_tensor(base + ".weight_scale").shape == (64, 4)
    assert f.get_tensor(base + ".weight_scale_2").dtype == torch.float32 and f.get_tensor(base + ".weight_scale_2").dim() == 0
    assert f.get_tensor(base + ".input_scale").item() > 0
    # per-expert keys, packed too; first/last blocks, router, embeddings and lm_head are not quantized
    assert f.get_tensor("backbone.layers.1.mixer.experts.3.down_proj.weight").dtype == torch.uint8
    assert f.get_tensor("backbone.layers.0.mixer.in_proj.weight").dtype == torch.bfloat16
    assert f.get_tensor("backbone.layers.1.mixer.gate.weight").dtype == torch.float32
    assert "backbone.layers.0.mixer.in_proj.weight_scale" not in f.keys()
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_algo"] == "NVFP4" and qc["group_size"] == 16 and "lm_head" in qc["exclude_modules"]
    # the nibbles are the E2M1 codes of the weight, element 2j in the low nibble
    q = quantize_nvfp4(model.backbone.layers[2].mixer.q_proj.weight.detach())
    assert torch.equal(e2m1_decode(unpack_e2m1(w)), q.values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_then_load_is_exact(exported, dtype):
    model, path = exported
    loaded = HybridLM.from_pretrained(path, dtype=dtype)
    quantized = set(model.precision_plan.quantized)
    for name, t in model.state_dict().items():
        site = name.rsplit(".", 1)[0]
        got = loaded.state_dict()[name]
        if site in quantized or name.rsplit(".", 1)[0] in quantized:  # nn.Linear weight / stacked experts
            rows = t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t
            per = [quantize_nvfp4(r).dequantize() for r in (t.unbind(0) if t.dim() == 3 else [rows])]
            expect = torch.stack(per) if t.dim() == 3 else per[0]
            assert torch.equal(got, expect.to(got.dtype)), name
        elif name.endswith(("gate.weight", "e_score_correction_bias")):
            assert torch.equal(got, t), name  # router stays fp32
        else:
            assert torch.equal(got, t.to(torch.bfloat16).to(got.dtype)), name


def test_missing_scale_is_named(exported, tmp_path):
    _, path = exported
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["backbone.layers.2.mixer.q_proj.weight_scale_2"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'backbone.layers.2.mixer.q_proj.weight' has a weight_scale but no "
                                              r"'backbone.layers.2.mixer.q_proj.weight_scale_2'"):
        HybridLM.from_pretrained(path)


def test_wrong_scale_dtype_is_named(exported):
    _, path = exported
    tensors = load_file(str(path / "model.safetensors"))
    key = "backbone.layers.3.mixer.out_proj.weight_scale"
    tensors[key] = tensors[key].float()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"out_proj.weight_scale should be float8_e4m3fn \(64, 8\), got torch.float32"):
        HybridLM.from_pretrained(path)
