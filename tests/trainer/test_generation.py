"""Generation engine: thinking budget on scripted models, stop/length, sampling, logprob semantics, and
greedy parity with transformers' NemotronHForCausalLM.generate."""

import math

import pytest
import torch
from torch import nn

from tandem.data_pipelines.tokenizer import load_tokenizer
from tandem.model import HybridConfig, HybridLM
from tandem.trainer.inference.engine import GenerationEngine, SamplingParams, ThinkTokens, _filter_top_k_top_p

IM_START, IM_END, THINK, END_THINK, NL = 3, 4, 5, 6, 209  # shipped tokenizer ids
A, B, C = 75, 76, 77  # "a", "b", "c"
THINK_IDS = ThinkTokens(THINK, END_THINK, frozenset({NL}), (NL,))


def _tiny(pattern="ME*M-E", **kw):
    model = HybridLM(HybridConfig.preset("tiny", hybrid_override_pattern=pattern, **kw), init_seed=0).eval()
    with torch.no_grad():  # O(1) logits so greedy choices are not near-ties
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                p.normal_(std=p.shape[-1] ** -0.5)
    return model


class _ScriptHead(nn.Module):
    """Logits that make ``script[position]`` the argmax, where position = tokens in the cache so far."""

    def __init__(self, owner, script, vocab):
        super().__init__()
        self.owner, self.script, self.vocab = [owner], script, vocab  # list: not a submodule

    def forward(self, h):
        lengths = self.owner[0].last_cache.lengths.tolist()
        logits = torch.zeros(*h.shape[:-1], self.vocab)
        flat = logits.view(-1, self.vocab)
        for b, pos in enumerate(lengths):
            flat[b, self.script.get(pos, A)] = 30.0
        return logits


class Scripted(HybridLM):
    """A real tiny model (so the cache is exercised) whose next token is scripted by absolute position."""

    def __init__(self, script: dict[int, int]):
        super().__init__(HybridConfig.preset("tiny", hybrid_override_pattern="M*"), init_seed=0)
        self.last_cache = None
        self.lm_head = _ScriptHead(self, script, self.config.vocab_size)

    def hidden_states(self, input_ids, seq_idx=None, *, cache=None, lengths=None):
        self.last_cache = cache
        return super().hidden_states(input_ids, seq_idx, cache=cache, lengths=lengths)


def _script(start, tokens):
    return {start + i: t for i, t in enumerate(tokens)}


PROMPT = [IM_START, 90, 91, THINK, NL]  # …assistant\n<think>\n  (5 tokens: generation starts at position 5)
GREEDY = dict(greedy=True, stop_token_ids=(IM_END,))


def test_thinking_budget_closes_at_first_newline_after_budget():
    # reasoning: a a NL(3rd, under budget 4) a a a NL(7th ≥ 4 → close); forced </think> NL at positions 12, 13
    script = _script(5, [A, A, NL, A, A, A, NL]) | _script(14, [B, C, IM_END])
    res = GenerationEngine(Scripted(script)).generate(
        [PROMPT], SamplingParams(max_new_tokens=50, thinking_budget=4, **GREEDY), think_ids=THINK_IDS)[0]
    assert res.tokens == [A, A, NL, A, A, A, NL, END_THINK, NL, B, C, IM_END]
    assert res.forced == [False] * 7 + [True, True] + [False] * 3
    assert (res.finish_reason, res.stop_token) == ("stop", IM_END)
    assert res.reasoning_tokens == 7 and res.thinking_forced == "budget"
    assert len(res.logprobs) == len(res.tokens) and all(math.isfinite(x) for x in res.logprobs)


def test_thinking_budget_hard_stop_at_budget_plus_grace():
    script = _script(5, [A] * 5) | _script(13, [C, IM_END])  # no newline ever; forced NL </think> NL at 10..12
    res = GenerationEngine(Scripted(script)).generate(
        [PROMPT], SamplingParams(max_new_tokens=50, thinking_budget=2, thinking_grace=3, **GREEDY), think_ids=THINK_IDS)[0]
    assert res.tokens == [A] * 5 + [NL, END_THINK, NL, C, IM_END]
    assert res.forced == [False] * 5 + [True] * 3 + [False] * 2
    assert res.reasoning_tokens == 5 and res.thinking_forced == "hard"


def test_model_that_closes_its_own_reasoning_or_has_none_is_untouched():
    script = _script(5, [A, A, END_THINK, NL, A, A, NL, IM_END])
    engine = GenerationEngine(Scripted(script))
    params = SamplingParams(max_new_tokens=50, thinking_budget=1, **GREEDY)
    res = engine.generate([PROMPT], params, think_ids=THINK_IDS)[0]
    assert res.tokens == [A, A, END_THINK, NL, A, A, NL, IM_END] and not any(res.forced)
    assert res.reasoning_tokens == 2 and res.thinking_forced is None
    # reasoning OFF prompt (<think></think>): nothing counts as reasoning, newlines are not touched
    off = engine.generate([[IM_START, 90, THINK, END_THINK, NL]], params, think_ids=THINK_IDS)[0]
    assert off.reasoning_tokens == 0 and not any(off.forced)


def test_max_new_tokens_stop_tokens_and_rows_finishing_at_different_steps():
    script = _script(9, [IM_END])  # a row stops when it reaches absolute position 9
    engine = GenerationEngine(Scripted(script), max_batch=2)
    prompts = [[90] * 3, [91] * 7, [92] * 9, [93] * 2]  # two waves of 2
    res = engine.generate(prompts, SamplingParams(max_new_tokens=5, **GREEDY))
    assert [r.tokens for r in res] == [[A] * 5, [A, A, IM_END], [IM_END], [A] * 5]
    assert [r.finish_reason for r in res] == ["length", "stop", "stop", "length"]
    assert [r.stop_token for r in res] == [None, IM_END, IM_END, None]
    assert [r.prompt_ids for r in res] == prompts


def test_batch_of_different_lengths_equals_each_prompt_alone():
    model = _tiny()
    prompts = [torch.randint(11, 512, (n,)).tolist() for n in (3, 17, 9, 1)]
    params = SamplingParams(max_new_tokens=12, greedy=True, stop_token_ids=(7, 8))
    together = GenerationEngine(model, max_batch=4).generate(prompts, params)
    for p, r in zip(prompts, together):
        alone = GenerationEngine(model, max_batch=1).generate([p], params)[0]
        assert r.tokens == alone.tokens and r.finish_reason == alone.finish_reason
        assert r.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_logprobs_are_the_full_distribution_at_temperature():
    """logprob = log_softmax(logits / T) of a full forward over prompt + generated, not renormalised by top-k/p."""
    model = _tiny()
    prompt = torch.randint(11, 512, (6,)).tolist()
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    res = GenerationEngine(model).generate([prompt], params)[0]
    seq = torch.tensor([prompt + res.tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq)[0, len(prompt) - 1 : -1] / 0.7, -1)
    expect = logp.gather(1, torch.tensor(res.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(res.logprobs), expect, atol=1e-4, rtol=1e-4)
    # every sampled token is inside the top-5 of its step
    top5 = logp.topk(5, -1).indices
    assert all(t in top5[i].tolist() for i, t in enumerate(res.tokens))


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = _tiny()
    prompts = [torch.randint(11, 512, (n,)).tolist() for n in (4, 9)]
    engine = GenerationEngine(model)
    a = engine.generate(prompts, SamplingParams(max_new_tokens=16, seed=7))
    b = engine.generate(prompts, SamplingParams(max_new_tokens=16, seed=7))
    c = engine.generate(prompts, SamplingParams(max_new_tokens=16, seed=8))
    assert [r.tokens for r in a] == [r.tokens for r in b] != [r.tokens for r in c]
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=16, greedy=True))
    top1 = engine.generate(prompts, SamplingParams(max_new_tokens=16, top_k=1, seed=1))
    tiny_p = engine.generate(prompts, SamplingParams(max_new_tokens=16, top_p=1e-6, seed=1))
    assert [r.tokens for r in greedy] == [r.tokens for r in top1] == [r.tokens for r in tiny_p]


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda k, p: torch.isfinite(_filter_top_k_top_p(logits, k, p))[0].tolist()  # noqa: E731
    assert kept(0, 1.0) == [True] * 4
    assert kept(2, 1.0) == [True, True, False, False]
    assert kept(0, 0.5) == [True, False, False, False]
    assert kept(0, 0.6) == [True, True, False, False]
    assert kept(0, 0.81) == [True, True, True, False]


def test_engine_restores_training_mode_and_validates():
    model = _tiny().train()
    engine = GenerationEngine(model)
    engine.generate([[11, 12]], SamplingParams(max_new_tokens=2, greedy=True))
    assert model.training
    with pytest.raises(ValueError, match="thinking_budget needs think_ids"):
        engine.generate([[11]], SamplingParams(thinking_budget=3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="every prompt at least one token"):
        engine.generate([[]], SamplingParams())


def test_think_tokens_from_shipped_tokenizer():
    ids = ThinkTokens.from_tokenizer(load_tokenizer())
    assert (ids.think_start, ids.think_end, ids.newline) == (THINK, END_THINK, (NL,))
    assert NL in ids.newline_ids and A not in ids.newline_ids


# --- parity with transformers ------------------------------------------------------------------------
def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import NemotronHForCausalLM

    transformers.logging.set_verbosity_error()
    # transformers clamps dt at time_step_min in its chunked prefill but not in its single-token update;
    # dt stays far above a tiny time_step_min here so both of its paths (and ours) agree.
    model = _tiny(time_step_min=1e-5, time_step_limit=(1e-5, math.inf))
    with torch.no_grad():
        for layer in model.backbone.layers:
            if layer.kind == "M":
                layer.mixer.dt_bias.uniform_(-2.0, 0.0)
    model.save_pretrained(tmp_path)
    hf = NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 13, 20)]  # 20 > chunk_size 16
    ours = GenerationEngine(model, max_batch=3).generate(
        prompts, SamplingParams(max_new_tokens=24, greedy=True, stop_token_ids=(2,)))
    for p, r in zip(prompts, ours):
        out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, pad_token_id=0, eos_token_id=2,
                          return_dict_in_generate=True, output_logits=True)
        assert out.sequences[0, len(p):].tolist() == r.tokens
        hf_logp = torch.stack([torch.log_softmax(x[0].float(), -1)[t] for x, t in zip(out.logits, r.tokens)])
        torch.testing.assert_close(torch.tensor(r.logprobs), hf_logp, atol=1e-4, rtol=1e-4)
