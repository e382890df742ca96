"""Activation checkpointing per layer kind: bit-identical loss and gradients, MoE routing statistics and
aux loss recorded once (not again by the recompute), dropout repeated, clear errors for bad kinds."""

import contextlib

import pytest
import torch

from tandem.model import HybridConfig, HybridLM
from tandem.model.hybrid import HybridBlock, activation_checkpointing_kinds
from tandem.model.moe import MoE

PATTERN = "ME*M-E"  # every layer kind
IDS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
SEQ_IDX = torch.tensor([[0] * 10 + [1] * 1 + [2] * 29, [0] * 40])


def _model(**kw):
    cfg = HybridConfig.preset("tiny", hybrid_override_pattern=PATTERN, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3, **kw)
    return HybridLM(cfg, init_seed=0).train()


def _step(model, kinds, seed=0):
    """One fwd+bwd of CE + aux loss; returns (loss, aux, grads, per-layer token counts)."""
    model.zero_grad()
    for m in model.modules():
        if isinstance(m, MoE):
            m.tokens_per_expert_acc.zero_()
    model.set_activation_checkpointing(kinds)
    torch.manual_seed(seed)
    aux = None
    loss = model(IDS, SEQ_IDX, labels=LABELS).sum()
    aux = model.aux_loss()
    (loss + 80 * aux).backward()
    counts = [m.tokens_per_expert_acc.clone() for m in model.modules() if isinstance(m, MoE)]
    return loss.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, counts


@pytest.mark.parametrize("kinds", ["all", ["moe"], ["mamba", "attention", "mlp"]])
def test_gradients_identical_with_and_without(kinds):
    model = _model()
    ref = _step(model, "none")
    out = _step(model, kinds)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    for n, g in ref[2].items():
        assert torch.equal(out[2][n], g), n
    # routing counted once per token copy, as without checkpointing (the recompute must not count again)
    for a, b in zip(out[3], ref[3]):
        assert torch.equal(a, b)
    assert float(out[3][0].sum()) == IDS.numel() * model.config.num_experts_per_tok
    # after the backward the recorded aux loss is still the original forward's
    assert torch.equal(model.aux_loss().detach(), ref[1])


def test_the_recompute_really_happens_and_would_double_count_without_the_guard(monkeypatch):
    model = _model()
    ref = _step(model, "none")
    calls = []
    real = MoE.forward
    monkeypatch.setattr(MoE, "forward", lambda self, *a: calls.append(self.record_routing) or real(self, *a))
    _step(model, ["moe"])
    assert calls == [True, True, False, False]  # two MoE layers: forward, then one recompute each
    calls.clear()
    monkeypatch.setattr(HybridBlock, "_contexts", lambda self: (contextlib.nullcontext(), contextlib.nullcontext()))
    doubled = _step(model, ["moe"])[3]
    assert all(torch.equal(a, 2 * b) for a, b in zip(doubled, ref[3]))


def test_attention_dropout_is_repeated_by_the_recompute():
    model = _model(attention_dropout=0.3)
    ref = _step(model, "none", seed=5)
    out = _step(model, ["attention"], seed=5)
    assert torch.equal(out[0], ref[0])
    for n, g in ref[2].items():
        assert torch.equal(out[2][n], g), n


def test_flags_follow_the_kinds_and_eval_or_no_grad_skip_it():
    model = _model()
    assert model.set_activation_checkpointing(["moe", "mamba"]) == {"moe", "mamba"}
    assert [b.activation_checkpointing for b in model.backbone.layers] == [c in "ME" for c in PATTERN]
    assert model.set_activation_checkpointing("none") == frozenset()
    assert not any(b.activation_checkpointing for b in model.backbone.layers)
    model.set_activation_checkpointing("all")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, SEQ_IDX), _model()(IDS, SEQ_IDX).detach())


@pytest.mark.parametrize("bad, match", [("everything", "unknown layer kind"), (["mamba", "ssm"], r"\['ssm'\]"),
                                        (3, "expected 'all', 'none'")])
def test_bad_kinds_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        activation_checkpointing_kinds(bad)
