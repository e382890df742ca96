"""Checkpoint interop: parity with transformers' NemotronHForCausalLM in both directions, the released
layout, and clear errors for bad checkpoints."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tandem.model import HybridConfig, HybridLM
from tandem.model.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")
from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

TINY_HF = dict(
    vocab_size=101, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
    conv_kernel=4, chunk_size=8, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=24, routed_scaling_factor=2.5,
)


def _hf_model(pattern, **kw):
    torch.manual_seed(0)
    model = NemotronHForCausalLM(NemotronHConfig(hybrid_override_pattern=pattern, **{**TINY_HF, **kw})).eval()
    # Re-initialise so every part carries O(1) signal (transformers' init leaves Mamba activations so
    # small that the gated norm's eps hides them); random correction bias and norm weights so they count.
    with torch.no_grad():
        for name, t in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                t.normal_(std=0.2)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                t.uniform_(0.5, 1.5)
            elif name.endswith(("A_log", "dt_bias", "D", "conv1d.bias")):
                continue
            elif t.dim() >= 2:
                t.normal_(std=t.shape[-1] ** -0.5)
    return model


@pytest.mark.parametrize(
    "pattern, batch, seqlen",
    [("M*-E", 2, 21), ("MEM*EM-", 1, 8), ("EM*M", 3, 33), ("-*EMM", 2, 5)],
)
def test_load_transformers_checkpoint_same_logits(tmp_path, pattern, batch, seqlen):
    hf = _hf_model(pattern)
    hf.save_pretrained(tmp_path)
    # transformers clamps dt at time_step_min; match that choice explicitly.
    ours = HybridLM.from_pretrained(tmp_path, config_overrides={"time_step_limit": (hf.config.time_step_min, math.inf)})
    assert ours.config.hybrid_override_pattern == pattern
    ids = torch.randint(0, 101, (batch, seqlen))
    with torch.no_grad():
        diff = (hf(ids, use_cache=False).logits - ours(ids).float()).abs().max().item()
    assert diff <= 1e-4


def test_parity_is_sensitive(tmp_path):
    """Negative control: swapping two experts' weights or changing one Mamba parameter is visible."""
    hf = _hf_model("ME*")
    hf.save_pretrained(tmp_path)
    ours = HybridLM.from_pretrained(tmp_path, config_overrides={"time_step_limit": (hf.config.time_step_min, math.inf)})
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert (ref - ours(ids)).abs().max() <= 1e-4
        experts = ours.backbone.layers[1].mixer.experts
        experts.up_proj[[0, 1]] = experts.up_proj[[1, 0]].clone()
        assert (ref - ours(ids)).abs().max() > 1e-3
        experts.up_proj[[0, 1]] = experts.up_proj[[1, 0]].clone()
        ours.backbone.layers[0].mixer.A_log.add_(0.5)
        assert (ref - ours(ids)).abs().max() > 1e-3


def test_time_step_limit_is_the_only_dt_difference(tmp_path):
    """With dt_bias driving softplus below time_step_min, the clamp matters: parity holds only when the
    limit matches the peer's, which shows the parity test really exercises it."""
    hf = _hf_model("M", time_step_min=0.01)
    with torch.no_grad():  # half the heads far below the clamp, half above; no D skip to hide the scan
        mixer = hf.model.layers[0].mixer
        mixer.dt_bias.copy_(torch.tensor([-8.0, 1.0, -8.0, 1.0]))
        mixer.D.zero_()
        mixer.in_proj.weight.normal_(std=0.5)  # big enough activations that the gated norm's eps is negligible
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 101, (1, 19))
    default = HybridLM.from_pretrained(tmp_path)  # config says (0, inf): the original kernels' choice
    assert default.config.time_step_limit == (0.0, math.inf)
    matched = HybridLM.from_pretrained(tmp_path, config_overrides={"time_step_limit": (0.01, math.inf)})
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        assert (ref - default(ids)).abs().max() > 1e-3
        assert (ref - matched(ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("shard", [None, 20_000])
def test_save_then_transformers_loads_same_logits(tmp_path, shard):
    cfg = HybridConfig.preset("tiny", hybrid_override_pattern="M*E-M", time_step_limit=(1e-3, math.inf))
    ours = HybridLM(cfg, init_seed=3).eval()
    with torch.no_grad():
        ours.backbone.layers[2].mixer.gate.e_score_correction_bias.normal_(std=0.2)
    ours.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    files = sorted(os.listdir(tmp_path))
    if shard:
        assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    else:
        assert files == ["config.json", "model.safetensors"]
    hf = NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.hybrid_override_pattern == "M*E-M"
    ids = torch.randint(0, 512, (2, 27))
    with torch.no_grad():
        assert (hf(ids, use_cache=False).logits - ours(ids).float()).abs().max() <= 1e-4


def test_saved_layout_is_the_released_one(tmp_path):
    ours = HybridLM(HybridConfig.preset("tiny"), init_seed=0).to(torch.bfloat16)
    ours.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("backbone.layers.1.mixer.gate.weight").dtype == torch.float32
        assert f.get_tensor("backbone.layers.1.mixer.experts.0.up_proj.weight").dtype == torch.bfloat16
    assert "backbone.embeddings.weight" in keys and "lm_head.weight" in keys and "backbone.norm_f.weight" in keys
    assert {f"backbone.layers.1.mixer.experts.{e}.{p}.weight" for e in range(8) for p in ("up_proj", "down_proj")} <= keys
    assert "backbone.layers.1.mixer.gate.e_score_correction_bias" in keys
    assert {"backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.mixer.A_log"} <= keys
    assert not any(".experts.up_proj" in k for k in keys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["torch_dtype"] == "bfloat16"
    assert config["hybrid_override_pattern"] == "ME*M-E"


@pytest.mark.parametrize("shard", [None, 50_000])
def test_round_trip_is_byte_identical(tmp_path, shard):
    ours = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    ours.save_pretrained(tmp_path / "a", **({"max_shard_size": shard} if shard else {}))
    back = HybridLM.from_pretrained(tmp_path / "a")
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    back.save_pretrained(tmp_path / "b", **({"max_shard_size": shard} if shard else {}))
    for f in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_load_dtype_selectable(tmp_path):
    HybridLM(HybridConfig.preset("tiny"), init_seed=0).save_pretrained(tmp_path)
    m = HybridLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.backbone.layers[1].mixer.gate.weight.dtype == torch.float32


def _single_file_checkpoint(tmp_path):
    HybridLM(HybridConfig.preset("tiny"), init_seed=0).save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_legacy_names_and_mtp_keys(tmp_path):
    f = _single_file_checkpoint(tmp_path)
    tensors = load_file(str(f))
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    tensors["mtp.layers.0.norm.weight"] = torch.ones(64)
    save_file(tensors, str(f))
    config = json.loads((tmp_path / "config.json").read_text())
    config["layers_block_type"] = ["mamba", "moe", "attention", "mamba", "mlp", "moe"]
    del config["hybrid_override_pattern"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    m = HybridLM.from_pretrained(tmp_path)
    assert torch.equal(m.backbone.embeddings.weight, tensors["backbone.embedding.weight"])


def test_missing_unexpected_and_mismatched_keys(tmp_path):
    f = _single_file_checkpoint(tmp_path)
    good = load_file(str(f))

    bad = dict(good)
    del bad["backbone.layers.1.mixer.experts.3.down_proj.weight"]
    del bad["lm_head.weight"]
    save_file(bad, str(f))
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\): .*experts\.3\.down_proj\.weight.*lm_head\.weight|2 missing key\(s\): .*lm_head\.weight.*experts\.3\.down_proj"):
        HybridLM.from_pretrained(tmp_path)

    save_file({**good, "backbone.layers.0.mixer.extra.weight": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\).*backbone\.layers\.0\.mixer\.extra\.weight"):
        HybridLM.from_pretrained(tmp_path)
    HybridLM.from_pretrained(tmp_path, strict=False)  # skipped when not strict

    save_file({**good, "backbone.norm_f.weight": torch.ones(63)}, str(f))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shape mismatch for 'backbone\.norm_f\.weight': checkpoint has \(63,\), model expects \(64,\)"):
        HybridLM.from_pretrained(tmp_path)

    save_file({**good, "backbone.layers.1.mixer.experts.8.up_proj.weight": torch.zeros(32, 64)}, str(f))
    with pytest.raises(CheckpointError, match="expert 8, but the config has 8 routed experts"):
        HybridLM.from_pretrained(tmp_path)


def test_unknown_model_type_and_bad_json(tmp_path):
    _single_file_checkpoint(tmp_path)
    cfg_file = tmp_path / "config.json"
    config = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**config, "model_type": "mamba2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'mamba2'"):
        HybridLM.from_pretrained(tmp_path)
    cfg_file.write_text('{"model_type": "nemotron_h",\n  "hidden_size": 64,,\n}')
    with pytest.raises(CheckpointError, match=r"config\.json:2:\d+: invalid JSON"):
        HybridLM.from_pretrained(tmp_path)


def test_truncated_or_corrupt_safetensors(tmp_path):
    f = _single_file_checkpoint(tmp_path)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file, possibly truncated or corrupt"):
        HybridLM.from_pretrained(tmp_path)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        HybridLM.from_pretrained(tmp_path)


def test_never_unpickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HybridConfig.preset("tiny").to_hf_dict()))
    torch.save({"lm_head.weight": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        HybridLM.from_pretrained(tmp_path)


def test_sharded_index_errors(tmp_path):
    HybridLM(HybridConfig.preset("tiny"), init_seed=0).save_pretrained(tmp_path, max_shard_size=50_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"lists shard '{shards[-1].name}', which does not exist"):
        HybridLM.from_pretrained(tmp_path)


def test_save_replaces_checkpoint_but_keeps_other_files(tmp_path):
    a = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    b = HybridLM(HybridConfig.preset("tiny"), init_seed=1)
    a.save_pretrained(tmp_path / "ckpt", max_shard_size=50_000)  # sharded
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    b.save_pretrained(tmp_path / "ckpt")  # single file now: stale shards must go
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert torch.equal(HybridLM.from_pretrained(tmp_path / "ckpt").lm_head.weight, b.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    a = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    a.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    import tandem.model.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        HybridLM(HybridConfig.preset("tiny"), init_seed=1).save_pretrained(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_safetensors_reader_equals_the_library_for_every_dtype(tmp_path):
    """model.checkpoint_io reads with pread (nothing stays mapped); it must agree with safetensors itself."""
    from safetensors.torch import load_file, save_file

    from tandem.model.checkpoint_io import SAFETENSORS_DTYPES, SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, dtype in SAFETENSORS_DTYPES.items():
        base = torch.randn(3, 5, 7, generator=g) * 4
        if dtype == torch.bool:
            tensors[name] = base > 0
        elif dtype.is_floating_point:
            tensors[name] = base.to(dtype)
        else:
            tensors[name] = base.to(torch.int64).clamp(0 if dtype == torch.uint8 else -100, 100).to(dtype)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    ref = load_file(str(tmp_path / "x.safetensors"))
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert sorted(f.keys()) == sorted(ref)
        for key, t in ref.items():
            got = f.get_tensor(key)
            assert got.dtype == t.dtype and f.shape(key) == tuple(t.shape) and f.dtype(key) == t.dtype
            assert torch.equal(got.view(torch.uint8) if t.dtype.itemsize == 1 and t.dtype != torch.bool else got,
                               t.view(torch.uint8) if t.dtype.itemsize == 1 and t.dtype != torch.bool else t), key


@pytest.mark.parametrize("damage", ["short_header", "bad_json", "cut_data"])
def test_safetensors_reader_names_a_damaged_file(tmp_path, damage):
    from tandem.model.checkpoint_io import SafetensorsFile

    HybridLM(HybridConfig.preset("tiny"), init_seed=0).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if damage == "short_header":
        f.write_bytes(data[:4])
    elif damage == "bad_json":
        f.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    else:
        f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        SafetensorsFile(f)
