"""Token-level policy losses against hand derivations: clip branches and gradients, dual clip, k3 KL and
its clamps, forced-token masking, micro-batch invariance, truncated IS weight, the prob-error metric."""

import math

import pytest
import torch

from tandem.trainer.rl.losses import (
    MAX_METRICS, POLICY_LOSSES, PolicyLossConfig, k3_kl, policy_loss, reduce_metrics, target_tokens,
)

# (A, ρ) per token with ε_low 0.2 / ε_high 0.28, and the hand-derived loss and dL/dlogp (= −A·ρ where the
# unclipped branch is the max, 0 where the clipped one is):
CASES = [
    # A,   ρ,   L = max(−Aρ, −A·clip(ρ)),               dL/dlogp
    (+1.0, 1.1, -1.1, -1.1),  # inside the range
    (+1.0, 1.5, -1.28, 0.0),  # A > 0 above 1.28: clipped (high)
    (+1.0, 0.5, -0.5, -0.5),  # A > 0 below 0.8: the unclipped −Aρ = −0.5 is the larger
    (-2.0, 0.5, 1.6, 0.0),  # A < 0 below 0.8: max(1.0, 2·0.8 = 1.6), clipped (low)
    (-2.0, 1.5, 3.0, 3.0),  # A < 0 above 1.28: max(3.0, 2.56) unclipped
    (-2.0, 0.9, 1.8, 1.8),  # inside
]


def leaf(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def run(adv, ratio, config=PolicyLossConfig(), **kw):
    logp = leaf([[math.log(r) for r in ratio]])
    out = policy_loss(logp, torch.zeros_like(logp), torch.tensor([adv]), torch.ones_like(logp, dtype=torch.bool),
                      config=config, **kw)
    out.loss_sum.backward()
    return out, logp.grad[0]


def test_clipped_surrogate_values_and_gradient_by_hand():
    adv, ratio, loss, grad = zip(*CASES)
    out, g = run(adv, ratio)
    assert out.loss_sum.item() == pytest.approx(sum(loss), abs=1e-5)  # 3.52
    assert sum(loss) == pytest.approx(3.52)
    torch.testing.assert_close(g, torch.tensor(grad), atol=1e-5, rtol=0)
    assert float(out.num_tokens) == 6
    assert float(out.metrics["clip_frac_low"]) == 1 and float(out.metrics["clip_frac_high"]) == 1
    assert float(out.metrics["ratio_mean"]) == pytest.approx(sum(ratio), abs=1e-5)
    assert float(out.metrics["ratio_max"]) == pytest.approx(1.5, abs=1e-5)
    assert "kl" not in out.metrics and "token_mult_prob_error" not in out.metrics


def test_toy_policy_gradient_through_logits():
    """A softmax policy over 5 tokens: ∂/∂logits = Σ_t dL/dlogp_t · (onehot(y_t) − softmax_t)."""
    torch.manual_seed(0)
    logits = torch.randn(len(CASES), 5, requires_grad=True)
    tokens = torch.tensor([0, 3, 1, 4, 2, 0])
    logp = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    adv, ratio, _, _ = zip(*CASES)
    logp_old = (logp - torch.log(torch.tensor(ratio))).detach()  # so that ρ is the table's
    out = policy_loss(logp[None], logp_old[None], torch.tensor([adv]), torch.ones(1, 6, dtype=torch.bool))
    out.loss_sum.backward()
    with torch.no_grad():
        p = torch.softmax(logits, -1)
        dldlogp = torch.tensor([c[3] for c in CASES])
        want = dldlogp[:, None] * (torch.nn.functional.one_hot(tokens, 5).float() - p)
    torch.testing.assert_close(logits.grad, want, atol=1e-5, rtol=0)


def test_dual_clip_caps_negative_advantage_loss():
    # A = −1, ρ = 4: PPO gives max(4, 1.28) = 4; dual clip c = 3 caps it at −c·A = 3 with no gradient.
    # A = −2, ρ = 1.5: 3.0 < cap 6, untouched. A = +1, ρ = 4: A > 0 is never dual-clipped (−1.28).
    cfg = PolicyLossConfig(dual_clip=3.0)
    out, g = run([-1.0, -2.0, 1.0], [4.0, 1.5, 4.0], cfg)
    assert out.loss_sum.item() == pytest.approx(3.0 + 3.0 - 1.28, abs=1e-5)
    torch.testing.assert_close(g, torch.tensor([0.0, 3.0, 0.0]), atol=1e-5, rtol=0)
    assert float(out.metrics["dual_clip_frac"]) == 1
    plain, g_plain = run([-1.0, -2.0, 1.0], [4.0, 1.5, 4.0])
    assert plain.loss_sum.item() == pytest.approx(4.0 + 3.0 - 1.28, abs=1e-5) and float(g_plain[0]) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        PolicyLossConfig(dual_clip=1.0)


def test_k3_kl_values_gradients_and_clamps():
    logp = leaf([0.0, 0.0, 0.0, 0.0, 0.0])
    r = torch.tensor([math.log(2), -1.0, 0.0, 30.0, -30.0])  # r = logp_ref − logp
    kl = k3_kl(logp, r.clone())
    # e^r − 1 − r: ln2 → 2 − 1 − ln2 = 0.306853; −1 → e^−1 = 0.367879; 0 → 0;
    # 30 → r clamped to 20, e^20 − 21 ≫ 10 → 10; −30 → r clamped to −20, e^−20 + 19 ≈ 19 → 10
    torch.testing.assert_close(kl, torch.tensor([1 - math.log(2), math.exp(-1), 0.0, 10.0, 10.0]), atol=1e-6, rtol=0)
    kl.sum().backward()
    # d/dlogp (e^r − 1 − r) = −(e^r − 1): ln2 → −1, −1 → 1 − e^−1; 0 at r = 0 and wherever a clamp is active
    torch.testing.assert_close(logp.grad, torch.tensor([-1.0, 1 - math.exp(-1), 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    # r = 2.5 is inside the input clamp but e^2.5 − 3.5 = 8.68 < 10: not clamped; r = 3 → 16.09 → 10
    assert float(k3_kl(torch.zeros(1), torch.tensor([2.5]))) == pytest.approx(math.exp(2.5) - 3.5, abs=1e-5)
    assert float(k3_kl(torch.zeros(1), torch.tensor([3.0]))) == 10.0


def test_kl_enters_the_loss_with_beta():
    logp = leaf([[0.0, 0.0]])
    ref = torch.tensor([[math.log(2), -1.0]])
    cfg = PolicyLossConfig(kl_beta=0.5)
    out = policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                      config=cfg, logp_ref=ref)
    kl = (1 - math.log(2)) + math.exp(-1)
    assert float(out.metrics["kl"]) == pytest.approx(kl, abs=1e-6)
    assert out.loss_sum.item() == pytest.approx(-2.0 + 0.5 * kl, abs=1e-6)  # on-policy: −A·ρ = −1 per token
    out.loss_sum.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 + 0.5 * -1.0, -1 + 0.5 * (1 - math.exp(-1))]]),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logp_ref"):
        policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), config=cfg)


def test_forced_and_padding_tokens_are_masked_without_nan():
    # token 1 is forced (</think>), token 2 is padding holding garbage (NaN / −inf): 0·NaN is NaN, so a
    # loss that only multiplied by the mask would be NaN
    logp = leaf([[math.log(1.1), 5.0, math.nan]])
    logp_old = torch.tensor([[0.0, -3.0, -math.inf]])
    loss_mask = torch.tensor([[True, True, False]])
    forced = torch.tensor([[False, True, False]])
    out = policy_loss(logp, logp_old, torch.tensor([1.0]), loss_mask, forced_mask=forced)
    assert float(out.num_tokens) == 1 == float(target_tokens(loss_mask, forced).sum())
    assert out.loss_sum.item() == pytest.approx(-1.1, abs=1e-6)  # only token 0
    out.loss_sum.backward()
    assert torch.isfinite(logp.grad).all()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1, 0.0, 0.0]]), atol=1e-6, rtol=0)
    # the forced token would otherwise count: ρ = e^8 clipped at 1.28
    unforced = policy_loss(logp.detach(), logp_old, torch.tensor([1.0]), loss_mask)
    assert float(unforced.num_tokens) == 2 and unforced.loss_sum.item() == pytest.approx(-1.1 - 1.28, abs=1e-5)


def test_global_token_mean_is_invariant_to_micro_batching():
    torch.manual_seed(1)
    b, t = 4, 7
    logp = (torch.randn(b, t) * 0.3 - 1).requires_grad_()
    logp_old = logp.detach() + torch.randn(b, t) * 0.3
    logp_ref = logp.detach() + torch.randn(b, t) * 0.2
    adv = torch.randn(b)
    mask = torch.rand(b, t) > 0.3
    mask[0, :] = False
    mask[0, 0] = True  # rows with very different token counts: a per-micro-batch mean would differ
    cfg = PolicyLossConfig(kl_beta=0.1)

    def loss_of(splits):
        parts = [policy_loss(logp[s], logp_old[s], adv[s], mask[s], config=cfg, logp_ref=logp_ref[s]) for s in splits]
        total = sum(float(p.num_tokens) for p in parts)
        value = sum(p.loss_sum for p in parts) / total
        (grad,) = torch.autograd.grad(value, logp)
        per_micro_mean = sum(p.loss_sum.item() / float(p.num_tokens) for p in parts) / len(parts)
        return value.item(), grad, per_micro_mean, reduce_metrics([p.metrics for p in parts], total)

    whole, g_whole, _, m_whole = loss_of([slice(0, 4)])
    for splits in ([slice(0, 2), slice(2, 4)], [slice(0, 1), slice(1, 4)], [slice(i, i + 1) for i in range(4)]):
        value, g, per_micro, m = loss_of(splits)
        assert value == pytest.approx(whole, abs=1e-6)
        torch.testing.assert_close(g, g_whole, atol=1e-6, rtol=0)
        assert m.keys() == m_whole.keys() and all(m[k] == pytest.approx(m_whole[k], abs=1e-6) for k in m)
    assert abs(loss_of([slice(i, i + 1) for i in range(4)])[2] - whole) > 1e-3  # the wrong normalisation differs
    assert "ratio_max" in MAX_METRICS


def test_truncated_importance_sampling_weight():
    # on-policy (ρ = 1) so the clipped loss is −A per token; logp_old − logp_gen = ln 3 → w = min(3, 2) = 2,
    # = ln 0.5 → w = 0.5
    logp = leaf([[-1.0, -2.0]])
    logp_gen = torch.tensor([[-1.0 - math.log(3), -2.0 - math.log(0.5)]])
    cfg = PolicyLossConfig(is_cap=2.0)
    out = policy_loss(logp, logp.detach(), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool),
                      config=cfg, logp_gen=logp_gen)
    assert out.loss_sum.item() == pytest.approx(-1.0 * 2 + 1.0 * 0.5, abs=1e-5)
    out.loss_sum.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, 0.5]]), atol=1e-5, rtol=0)
    assert float(out.metrics["is_weight_mean"]) == pytest.approx(2.5, abs=1e-5)  # a token sum
    with pytest.raises(ValueError, match="logp_gen"):
        policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), config=cfg)


def test_token_mult_prob_error_and_entropy_metrics():
    logp_old = torch.tensor([[-1.0, -2.0, -3.0]])
    logp_gen = torch.tensor([[-1.1, -1.8, -9.0]])  # |Δ| = 0.1, 0.2; token 2 is masked out
    mask = torch.tensor([[True, True, False]])
    out = policy_loss(logp_old.clone(), logp_old, torch.tensor([1.0]), mask, logp_gen=logp_gen,
                      entropy=torch.tensor([[0.5, 1.5, 100.0]]))
    m = reduce_metrics([out.metrics], float(out.num_tokens))
    assert m["token_mult_prob_error"] == pytest.approx((math.exp(0.1) + math.exp(0.2)) / 2, abs=1e-6)  # 1.163287
    assert m["entropy"] == pytest.approx(1.0)
    assert m["ratio_mean"] == pytest.approx(1.0) and m["ratio_max"] == pytest.approx(1.0)
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0


def test_reinforce_variant_and_registry():
    assert {"clipped", "reinforce"} <= set(POLICY_LOSSES)
    logp = leaf([[-0.5, -1.0]])
    out = policy_loss(logp, torch.tensor([[-3.0, 0.0]]), torch.tensor([[2.0, -1.0]]),
                      torch.ones(1, 2, dtype=torch.bool), config=PolicyLossConfig(name="reinforce"))
    assert out.loss_sum.item() == pytest.approx(-2.0 * -0.5 + 1.0 * -1.0)  # Σ −A·logp, ratio ignored
    out.loss_sum.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, 1.0]]))
    with pytest.raises(ValueError, match="unknown policy loss"):
        PolicyLossConfig(name="ppo_typo")
