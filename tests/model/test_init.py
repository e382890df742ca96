"""Initialisation is per tensor and per global expert: the same seed gives the same weights whatever slice
of the experts a process holds, and a model built on meta then cut allocates only its slice."""

import pytest
import torch

from tandem.model import HybridConfig, HybridLM
from tandem.model.moe import GroupedExperts

CFG = HybridConfig.preset("tiny", hybrid_override_pattern="ME*E", n_routed_experts=8, num_experts_per_tok=2)


def _sharded(cfg, seed, ep, rank):
    model = HybridLM(cfg, device="meta")
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            local = m.total_experts // ep
            m.keep_experts(rank * local, local)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_slices_concatenate_to_the_unsharded_init(ep):
    full = HybridLM(CFG, init_seed=11).state_dict()
    shards = [_sharded(CFG, 11, ep, r).state_dict() for r in range(ep)]
    for name, t in full.items():
        if name.endswith(("experts.up_proj", "experts.down_proj")):
            got = torch.cat([s[name] for s in shards])
        else:
            got = shards[ep - 1][name]
            for s in shards:
                assert torch.equal(s[name], t), name  # dense weights identical on every shard
        assert torch.equal(got, t), name


def test_seed_changes_every_tensor_and_streams_differ():
    a, b = HybridLM(CFG, init_seed=1).state_dict(), HybridLM(CFG, init_seed=2).state_dict()
    random_init = [n for n, t in a.items() if t.numel() > 1 and t.std() > 0]
    assert random_init and all(not torch.equal(a[n], b[n]) for n in random_init)
    # distinct names draw distinct streams (two same-shaped experts are not copies of each other)
    up = a["backbone.layers.1.mixer.experts.up_proj"]
    assert not torch.equal(up[0], up[1])
    assert not torch.equal(up, a["backbone.layers.3.mixer.experts.up_proj"])


def test_init_statistics_follow_the_config():
    cfg = HybridConfig.preset("tiny", hybrid_override_pattern="ME*E", n_routed_experts=8, hidden_size=256,
                              moe_intermediate_size=256)
    state = HybridLM(cfg, init_seed=0).state_dict()
    std = cfg.initializer_range
    rescale = (1.0 / cfg.num_hidden_layers ** 0.5) if cfg.rescale_prenorm_residual else 1.0
    assert abs(state["backbone.layers.1.mixer.experts.up_proj"].std().item() - std) < 0.05 * std
    assert abs(state["backbone.layers.1.mixer.experts.down_proj"].std().item() - std * rescale) < 0.05 * std * rescale
    assert abs(state["lm_head.weight"].std().item() - std) < 0.05 * std


def test_parameter_count_is_the_whole_model_under_sharding():
    full = HybridLM(CFG, device="meta").parameter_count()
    assert _sharded(CFG, 0, 4, 3).parameter_count() == full


def test_keep_experts_refuses_a_second_cut_or_a_bad_range():
    m = HybridLM(CFG, device="meta")
    experts = m.backbone.layers[1].mixer.experts
    with pytest.raises(ValueError, match="cannot keep experts"):
        experts.keep_experts(6, 4)
    experts.keep_experts(4, 4)
    with pytest.raises(ValueError, match=r"holding \[4, 8\) of 8"):
        experts.keep_experts(0, 4)
