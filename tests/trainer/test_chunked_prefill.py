"""Chunked prefill (GenerationEngine ``prefill_chunk``): the same last-token logits, the same hybrid-cache
state and the same generated tokens as the one-shot prefill, for a model with Mamba-2, attention and MoE
layers, ragged prompts and chunk sizes that do not divide the prompt lengths."""

import pytest
import torch

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.inference.engine import DEFAULT_PREFILL_CHUNK, GenerationEngine, SamplingParams, prefill


def _model():
    # M, E (MoE), * (attention), M, - (MLP), E: every layer kind; chunk_size 16 so a 7-token prefill chunk
    # crosses the SSD scan's own chunk boundaries at other offsets than the one-shot prefill
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0).eval()
    with torch.no_grad():  # O(1) logits so greedy choices are not near-ties
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                p.normal_(std=p.shape[-1] ** -0.5)
    return model


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(7, 500, (n,), generator=g).tolist() for n in lengths]


def _prefilled(model, prompts, chunk):
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    cache = model.allocate_cache(len(prompts), max(lengths) + 4)
    with torch.no_grad():
        last = prefill(model, ids, lengths, cache, chunk)
        return model.lm_head(last), cache


@pytest.mark.parametrize("chunk", [7, 20])
def test_chunked_prefill_equals_one_shot(chunk):
    model = _model()
    prompts = _prompts([45, 29, 38])  # ragged; neither 7 nor 20 divides any of them
    ref_logits, ref = _prefilled(model, prompts, None)
    logits, cache = _prefilled(model, prompts, chunk)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert cache.lengths.tolist() == ref.lengths.tolist() == [45, 29, 38]
    for i in ref.conv:  # Mamba: the conv window (the last inputs) and the SSM state carried across chunks
        torch.testing.assert_close(cache.conv[i], ref.conv[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.ssm[i], ref.ssm[i], rtol=1e-4, atol=1e-5)
    for i in ref.key:  # attention: each row's real keys/values (pads past a row's length may differ)
        for b, n in enumerate([45, 29, 38]):
            torch.testing.assert_close(cache.key[i][b, :, :n], ref.key[i][b, :, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.value[i][b, :, :n], ref.value[i][b, :, :n], rtol=1e-4, atol=1e-5)


def test_chunked_generation_matches_one_shot_and_full_forward():
    model = _model()
    prompts = _prompts([45, 29, 38], seed=1)
    params = SamplingParams(max_new_tokens=8, greedy=True)
    one_shot = GenerationEngine(model, max_batch=3, prefill_chunk=None).generate(prompts, params)
    chunked = GenerationEngine(model, max_batch=3, prefill_chunk=7).generate(prompts, params)
    assert [r.tokens for r in chunked] == [r.tokens for r in one_shot]
    for a, b in zip(chunked, one_shot):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # and both are what a cache-free forward over prompt + generated tokens picks at every step
    for p, r in zip(prompts, chunked):
        with torch.no_grad():
            full = model(torch.tensor([p + r.tokens]))[0]
        assert full[len(p) - 1: -1].argmax(-1).tolist() == r.tokens


def test_prefill_chunk_is_validated_and_defaults():
    model = _model()
    assert GenerationEngine(model).prefill_chunk == DEFAULT_PREFILL_CHUNK
    with pytest.raises(ValueError, match="prefill_chunk"):
        GenerationEngine(model, prefill_chunk=0)
