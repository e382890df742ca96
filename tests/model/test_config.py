import math

import pytest
import torch

from tandem.model import HybridConfig, HybridLM


def test_presets_build_and_validate():
    tiny = HybridConfig.preset("tiny")
    assert set(tiny.hybrid_override_pattern) == {"M", "*", "-", "E"}
    nano = HybridConfig.preset("nano3")
    assert nano.num_hidden_layers == 52
    assert nano.layer_kinds.count("mamba") == 23 and nano.layer_kinds.count("moe") == 23
    assert [i for i, c in enumerate(nano.hybrid_override_pattern) if c == "*"] == [5, 12, 19, 26, 33, 42]
    assert nano.mamba_d_inner == 4096 and nano.mamba_in_proj_dim == 2 * 4096 + 2 * 8 * 128 + 64
    h8 = HybridConfig.preset("nemotron_h_8b")
    assert "E" not in h8.hybrid_override_pattern and h8.intermediate_size == 21504


def test_preset_overrides_and_unknown():
    assert HybridConfig.preset("tiny", hidden_size=32).hidden_size == 32
    with pytest.raises(ValueError, match="unknown preset 'nano4'"):
        HybridConfig.preset("nano4")
    with pytest.raises(ValueError, match="hiden_size"):
        HybridConfig.preset("tiny", hiden_size=32)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hybrid_override_pattern="M*X-"), r"unknown layer character 'X' at position 2"),
        (dict(hybrid_override_pattern=""), "non-empty"),
        (dict(num_attention_heads=6, num_key_value_heads=4), r"num_attention_heads \(6\) must be divisible by num_key_value_heads \(4\)"),
        (dict(mamba_num_heads=6, n_groups=4), r"mamba_num_heads \(6\) must be divisible by n_groups \(4\)"),
        (dict(mamba_num_heads=4, mamba_head_dim=3, n_groups=4, hidden_size=64), None),  # d_inner 12 % 4 == 0: valid
        (dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\) must be <= n_routed_experts \(8\)"),
        (dict(n_group=3), r"n_routed_experts \(8\) must be divisible by n_group \(3\)"),
        (dict(tie_word_embeddings=True), "untied"),
        (dict(time_step_limit=(0.5, 0.1)), "time_step_limit"),
        (dict(mlp_hidden_act="swiglu"), "mlp_hidden_act"),
        (dict(ssd_impl="cuda"), "ssd_impl"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
    ],
)
def test_validation_errors_name_the_field(changes, message):
    if message is None:
        HybridConfig.preset("tiny", **changes)
        return
    with pytest.raises(ValueError, match=message):
        HybridConfig.preset("tiny", **changes)


def test_unused_kind_fields_are_not_validated():
    # A dense model does not need valid MoE fields (nemotron_h_8b has no 'E' layers).
    HybridConfig.preset("nemotron_h_8b", n_routed_experts=0)


def test_hf_dict_round_trip_and_infinity_encoding():
    cfg = HybridConfig.preset("tiny", time_step_limit=(0.0, math.inf))
    d = cfg.to_hf_dict()
    assert d["model_type"] == "nemotron_h" and d["architectures"] == ["NemotronHForCausalLM"]
    assert d["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    assert "ssd_impl" not in d
    back = HybridConfig.from_hf_dict(d)
    assert back == cfg


def test_from_hf_dict_accepts_layers_block_type_and_legacy_names():
    d = HybridConfig.preset("tiny").to_hf_dict()
    del d["hybrid_override_pattern"]
    d["layers_block_type"] = ["mamba", "moe", "attention", "linear_attention", "mlp", "moe"]
    d["mamba_n_groups"] = d.pop("n_groups")
    d["mamba_chunk_size"] = d.pop("chunk_size")
    del d["time_step_limit"]  # absent → (0, inf)
    cfg = HybridConfig.from_hf_dict(d)
    assert cfg.hybrid_override_pattern == "ME*M-E"
    assert cfg.n_groups == 2 and cfg.chunk_size == 16
    assert cfg.time_step_limit == (0.0, math.inf)


def test_from_hf_dict_errors():
    d = HybridConfig.preset("tiny").to_hf_dict()
    with pytest.raises(ValueError, match=r"cfg.json: model_type is 'llama'"):
        HybridConfig.from_hf_dict({**d, "model_type": "llama"}, source="cfg.json")
    bad = {k: v for k, v in d.items() if k != "hybrid_override_pattern"}
    with pytest.raises(ValueError, match="needs 'hybrid_override_pattern' or 'layers_block_type'"):
        HybridConfig.from_hf_dict(bad)
    with pytest.raises(ValueError, match="unknown type 'ssm'"):
        HybridConfig.from_hf_dict({**bad, "layers_block_type": ["ssm"]})


def test_meta_device_parameter_counts():
    with torch.device("meta"):
        nano = HybridLM(HybridConfig.preset("nano3"))
    count = nano.parameter_count()
    assert all(p.is_meta for p in nano.parameters())
    assert 31.4e9 < count.total < 31.8e9  # model card: 31.6B
    assert 3.2e9 <= count.active <= 3.6e9  # model card: ~3.5B active (incl. embeddings)
    assert 3.2e9 <= count.active_non_embedding + count.embedding <= 3.6e9
    with torch.device("meta"):
        h8 = HybridLM(HybridConfig.preset("nemotron_h_8b"))
    dense = h8.parameter_count()
    assert dense.total == dense.active and 7.9e9 < dense.total < 8.3e9
