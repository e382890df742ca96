import pytest
import torch

from tandem.model import HybridConfig
from tandem.model.moe import GroupedExperts, MoE, TopKRouter, permute_tokens, router_z_loss, select_experts, sequence_aux_loss, unpermute_tokens


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
    assert moe.tokens_per_expert_acc.sum().item() == x.shape[0] * cfg.num_experts_per_tok
    torch.testing.assert_close(moe.tokens_per_expert_acc, torch.bincount(r.topk_idx.flatten(), minlength=8).double())


def test_latent_moe_shapes():
    cfg = HybridConfig.preset("tiny", moe_latent_size=24)
    moe = MoE(cfg)
    assert moe.experts.up_proj.shape == (8, 32, 24)
    assert moe(torch.randn(2, 3, 64)).shape == (2, 3, 64)


def test_sequence_aux_loss_hand_computed():
    # one sequence of 2 tokens, 4 experts, top-1
    scores = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.2, 0.4]])
    idx = torch.tensor([[0], [3]])
    # f = E/(k T) * counts = 4/2 * [1, 0, 0, 1] = [2, 0, 0, 2]
    # P = mean of normalised scores = ([.5,.5,0,0] + [.2,.2,.2,.4]) / 2 = [.35, .35, .1, .2]
    assert sequence_aux_loss(scores, idx, batch=1).item() == pytest.approx(2 * 0.35 + 2 * 0.2)
    # perfectly balanced → 1
    uniform = torch.full((4, 4), 0.25)
    assert sequence_aux_loss(uniform, torch.tensor([[0], [1], [2], [3]]), batch=1).item() == pytest.approx(1.0)
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expect = (torch.log(torch.tensor(2.0)) ** 2 + (1 + torch.log(torch.tensor(2.0))) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expect.item())


def test_aux_losses_only_in_training_and_differentiable():
    cfg = HybridConfig.preset("tiny", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    for p in (moe.experts.up_proj, moe.experts.down_proj):
        torch.nn.init.normal_(p, std=0.1)
    moe(torch.randn(2, 6, 64))
    aux = moe.aux_loss()
    assert aux is not None and aux.item() > 0
    aux.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    moe.eval()
    moe(torch.randn(2, 6, 64))
    assert moe.aux_loss() is None
    assert MoE(HybridConfig.preset("tiny")).aux_loss() is None


def test_grouped_gemm_equals_per_expert_loop():
    experts = GroupedExperts(6, 16, 24)
    torch.nn.init.normal_(experts.up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(29, 16, requires_grad=True)
    tpe = torch.tensor([5, 0, 9, 1, 14, 0])
    g = torch.randn(29, 16)
    outs, grads = [], []
    for grouped in (True, False):
        experts.grouped = grouped
        for p in (x, experts.up_proj, experts.down_proj):
            p.grad = None
        y = experts(x, tpe)
        (y * g).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone(), experts.up_proj.grad.clone(), experts.down_proj.grad.clone()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
