import pytest
import torch

from tandem.model import HybridConfig, HybridLM


def _tiny(**kw):
    return HybridLM(HybridConfig.preset("tiny", **kw), init_seed=0)


def test_forward_shapes_and_backward():
    model = _tiny()
    ids = torch.randint(0, 512, (2, 37))
    logits = model(ids)
    assert logits.shape == (2, 37, 512)
    logits.logsumexp(-1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad


def test_causality():
    model = _tiny().eval()
    ids = torch.randint(0, 512, (1, 30))
    ids2 = ids.clone()
    ids2[0, 20:] = torch.randint(0, 512, (10,))
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-4


@pytest.mark.parametrize("pattern", ["ME*M-E", "M", "*", "E-"])
def test_packed_documents_equal_separate_runs(pattern):
    model = _tiny(hybrid_override_pattern=pattern).eval()
    lengths = [7, 9, 1, 15]  # boundaries at 7, 16 (a chunk edge: chunk_size 16) and 17 (a 1-token document)
    docs = [torch.randint(0, 512, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    seq_idx = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = model(packed, seq_idx=seq_idx)
        apart = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(together, apart, atol=2e-5, rtol=1e-5)


def test_packed_boundary_on_chunk_edge_and_batch_rows_independent():
    model = _tiny(hybrid_override_pattern="M*").eval()
    ids = torch.randint(0, 512, (2, 48))
    seq_idx = torch.tensor([[0] * 16 + [1] * 32, [0] * 48])  # chunk_size 16: boundary exactly on a chunk edge
    with torch.no_grad():
        out = model(ids, seq_idx=seq_idx)
        torch.testing.assert_close(out[0, 16:], model(ids[:1, 16:])[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], model(ids[1:])[0], atol=2e-5, rtol=1e-5)


def test_seeded_init_is_reproducible_and_follows_the_recipe():
    cfg = HybridConfig.preset("tiny")
    a, b, c = HybridLM(cfg, init_seed=1), HybridLM(cfg, init_seed=1), HybridLM(cfg, init_seed=2)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    mixer = a.backbone.layers[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert bool(((dt >= cfg.time_step_min * 0.999) & (dt <= cfg.time_step_max * 1.001)).all())
    A = torch.exp(mixer.A_log)
    assert bool(((A >= 1) & (A <= 16)).all())
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    # residual-stream projections are scaled by 1/sqrt(num_layers)
    std_out = mixer.out_proj.weight.std().item()
    std_in = mixer.in_proj.weight.std().item()
    assert std_out == pytest.approx(std_in / cfg.num_hidden_layers**0.5, rel=0.15)
    moe = a.backbone.layers[1].mixer
    assert moe.gate.e_score_correction_bias.abs().sum() == 0


def test_init_does_not_touch_global_rng():
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    _tiny()
    torch.testing.assert_close(torch.rand(3), expect)


def test_input_validation():
    model = _tiny()
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seqlen\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_idx shape"):
        model(torch.zeros(1, 5, dtype=torch.long), seq_idx=torch.zeros(1, 4, dtype=torch.long))


def test_bf16_forward_runs_and_stays_close_to_fp32():
    model = _tiny().eval()
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    assert model.backbone.layers[1].mixer.gate.weight.dtype == torch.float32
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
