"""Chunked linear + cross-entropy / log-probs: the plain full-logits values and gradients, without ever
holding [N, V] logits; and the model's ``labels=`` forward that the stages call."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tandem.model import HybridConfig, HybridLM
from tandem.model.loss import chunked_cross_entropy, chunked_token_logprobs, default_chunk_tokens
from tandem.trainer.stages.base import token_cross_entropy
from tandem.trainer.stages.grpo import model_logprobs, token_logprobs

N, H, V = 45, 16, 300


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 7, 8, 44]] = -100  # ignored positions, the last one included
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 7, N, 1000])
def test_chunked_cross_entropy_equals_plain(chunk):
    hidden, weight, labels = _inputs()
    g_out = torch.rand(N, generator=torch.Generator().manual_seed(1))  # any per-token weighting (masks, advantages)
    ref = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="none")
    ref_grads = torch.autograd.grad(ref, (hidden, weight), g_out)
    out = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    grads = torch.autograd.grad(out, (hidden, weight), g_out)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert bool((out[[0, 7, 8, 44]] == 0).all())
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [4, N])
def test_chunked_logprobs_at_a_temperature_with_entropy(chunk):
    hidden, weight, labels = _inputs()
    logits = F.linear(hidden, weight)
    ref_logp, ref_ent = token_logprobs(logits, labels, 0.7, entropy=True)
    ref_grads = torch.autograd.grad(ref_logp.sum(), (hidden, weight))
    logp, ent = chunked_token_logprobs(hidden, weight, labels, chunk_tokens=chunk, temperature=0.7, entropy=True)
    torch.testing.assert_close(logp, ref_logp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=1e-6)
    assert not ent.requires_grad
    for a, r in zip(torch.autograd.grad(logp.sum(), (hidden, weight)), ref_grads):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)


class _LargestFloatTensor(TorchDispatchMode):
    """Records the most elements any floating-point op output had (forward and backward, same thread)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.most = max(self.most, t.numel())
        return out


def test_never_materialises_full_logits():
    hidden, weight, labels = _inputs()
    chunk = 5
    with _LargestFloatTensor() as chunked:
        chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk).sum().backward()
    with _LargestFloatTensor() as plain:
        F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="none").sum().backward()
    assert plain.most == N * V
    assert chunked.most == max(chunk * V, V * H)  # a chunk's logits, or the weight's gradient


def test_default_chunk_is_256_mib_of_fp32_logits():
    assert default_chunk_tokens(131072) == 512
    assert default_chunk_tokens(512) == 131072


def _batch(b=2, t=24):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (b, t + 1), generator=g)
    mask = torch.ones(b, t)
    mask[0, :9] = 0
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask,
            "seq_idx": torch.tensor([[0] * 10 + [1] * 1 + [2] * (t - 11), [0] * t])}


@pytest.mark.parametrize("chunk", [None, 5])
def test_model_labels_forward_equals_full_logits_loss_and_grads(chunk):
    """``token_cross_entropy`` (pretrain and SFT) through ``labels=`` equals CE on the model's logits."""
    model = HybridLM(HybridConfig.preset("tiny", moe_aux_loss_coeff=0.01), init_seed=0).train()
    batch = _batch()
    logits = model(batch["input_ids"], seq_idx=batch["seq_idx"])
    per_token = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten()
    ref = (per_token * mask).sum() + model.aux_loss() * mask.sum()
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.loss_chunk_tokens = chunk
    out = token_cross_entropy(model, batch)
    out.loss_sum.backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-5, rtol=1e-6)
    assert float(out.num_tokens) == float(mask.sum())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-4, msg=n)


def test_model_logprobs_for_grpo_equal_full_logits():
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    model.loss_chunk_tokens = 7
    batch = _batch()
    labels = batch["labels"].clone()
    labels[:, -3:] = -100
    ids, seq_idx = batch["input_ids"], batch["seq_idx"]
    ref_logp, ref_ent = token_logprobs(model(ids, seq_idx=seq_idx), labels, 0.8, entropy=True)
    logp, ent = model_logprobs(model, ids, seq_idx, labels, 0.8, entropy=True)
    torch.testing.assert_close(logp, ref_logp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=1e-6)
    assert bool((logp[:, -3:] == 0).all()) and logp.shape == labels.shape
    with torch.no_grad():
        torch.testing.assert_close(model_logprobs(model, ids, seq_idx, labels, 0.8), ref_logp.detach(), atol=1e-6, rtol=1e-6)


def test_labels_forward_refuses_bad_arguments():
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    ids = torch.randint(0, 512, (1, 8))
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="cache"):
        model(ids, cache=model.allocate_cache(1, 16), labels=ids)
    with pytest.raises(ValueError, match="entropy=True needs labels"):
        model(ids, entropy=True)
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        model.loss_chunk_tokens = 0
