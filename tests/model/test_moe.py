import pytest
import torch

from model import HybridConfig
from model.moe import MoE, TopKRouter, permute_tokens, select_experts, unpermute_tokens


def test_router_math_on_hand_made_scores():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.3]])
    # The bias moves selection (expert 2 beats expert 1) but not the weights, which use raw scores.
    bias = torch.tensor([0.0, 0.0, 0.75, 0.0])
    idx, w = select_experts(scores, bias, top_k=2, routed_scaling_factor=2.5)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [0, 2]
    torch.testing.assert_close(w[0][order], torch.tensor([0.9, 0.1]) / 1.0 * 2.5)
    idx, w = select_experts(scores, torch.zeros(4), top_k=2, norm_topk_prob=False)
    assert sorted(idx[0].tolist()) == [0, 1]
    torch.testing.assert_close(w[0].sort().values, torch.tensor([0.8, 0.9]))


def test_group_limited_routing():
    # Two groups of two experts; group scores = sum of the top-2 in each group: g0 = 0.2+0.1, g1 = 0.9+0.8.
    scores = torch.tensor([[0.2, 0.1, 0.9, 0.8]])
    idx, _ = select_experts(scores, torch.zeros(4), top_k=1, n_group=2, topk_group=1)
    assert idx.tolist() == [[2]]
    bias = torch.tensor([1.0, 1.0, 0.0, 0.0])  # biased group sums now favour group 0
    idx, w = select_experts(scores, bias, top_k=2, n_group=2, topk_group=1, norm_topk_prob=False)
    assert sorted(idx[0].tolist()) == [0, 1]
    torch.testing.assert_close(w[0].sort().values, torch.tensor([0.1, 0.2]))


def test_router_is_fp32_and_stays_fp32():
    router = TopKRouter(HybridConfig.preset("tiny"))
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    out = router(torch.randn(5, 64, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.float32 and out.topk_weights.dtype == torch.float32
    torch.testing.assert_close(out.topk_weights.sum(-1), torch.full((5,), 2.5))
    assert "e_score_correction_bias" in router.state_dict()
    assert not any(n.endswith("e_score_correction_bias") for n, _ in router.named_parameters())


def test_permute_unpermute_round_trip():
    x = torch.randn(7, 3)
    idx = torch.randint(0, 4, (7, 2))
    w = torch.rand(7, 2)
    xs, order, tpe = permute_tokens(x, idx, 4)
    assert tpe.tolist() == torch.bincount(idx.flatten(), minlength=4).tolist()
    sorted_experts = idx.flatten()[order]
    assert bool((sorted_experts[1:] >= sorted_experts[:-1]).all())
    y = unpermute_tokens(xs, order, w, 7)
    torch.testing.assert_close(y, x * w.sum(-1, keepdim=True))


def test_moe_forward_matches_per_token_loop():
    cfg = HybridConfig.preset("tiny")
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.e_score_correction_bias.normal_(std=0.1)
    h = torch.randn(2, 5, cfg.hidden_size)
    y = moe(h)
    x = h.reshape(-1, cfg.hidden_size)
    r = moe.gate(x)
    expect = []
    for t in range(x.shape[0]):
        acc = moe.shared_experts(x[t])
        for k in range(cfg.num_experts_per_tok):
            e = r.topk_idx[t, k]
            up, down = moe.experts.up_proj[e], moe.experts.down_proj[e]
            acc = acc + r.topk_weights[t, k] * (down @ torch.relu(up @ x[t]) ** 2)
        expect.append(acc)
    torch.testing.assert_close(y.reshape(-1, cfg.hidden_size), torch.stack(expect), atol=1e-5, rtol=1e-5)
    assert moe.last_tokens_per_expert.sum().item() == x.shape[0] * cfg.num_experts_per_tok


def test_latent_moe_shapes():
    cfg = HybridConfig.preset("tiny", moe_latent_size=24)
    moe = MoE(cfg)
    assert moe.experts.up_proj.shape == (8, 32, 24)
    assert moe(torch.randn(2, 3, 64)).shape == (2, 3, 64)
