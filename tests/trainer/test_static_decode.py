"""Static-shape decoding (GenerationEngine(static=True / compile=True)) gives the eager engine's results:
greedy tokens bit for bit (ragged prompts, stop tokens, max_new_tokens, several waves), the thinking
budget's forced tokens, the seeded sampling stream while every row runs, logprobs within rounding; the
compiled step is one graph (no breaks, no recompiles across steps and waves)."""

import pytest
import torch

from tandem.trainer.inference import static
from tandem.trainer.inference.engine import GenerationEngine, SamplingParams
from tests.trainer.test_generation import (A, B, C, END_THINK, GREEDY, IM_END, IM_START, NL, PROMPT, THINK,
                                           THINK_IDS, Scripted, _script, _tiny)


def _same(eager, static, atol=1e-5):
    for e, s in zip(eager, static, strict=True):
        assert s.tokens == e.tokens
        assert (s.finish_reason, s.stop_token, s.forced) == (e.finish_reason, e.stop_token, e.forced)
        assert (s.reasoning_tokens, s.thinking_forced, s.prompt_ids) == (e.reasoning_tokens, e.thinking_forced, e.prompt_ids)
        assert s.logprobs == pytest.approx(e.logprobs, abs=atol)


def test_static_greedy_equals_eager_ragged_stops_lengths_and_waves():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(11, 512, (n,), generator=g).tolist() for n in (3, 17, 1, 12)]
    free = GenerationEngine(model, max_batch=3).generate(prompts, SamplingParams(max_new_tokens=10, greedy=True))
    # stop ids that rows really produce, at different steps (one row stops on its first token)
    stops = (free[0].tokens[5], free[2].tokens[0], free[3].tokens[7])
    params = SamplingParams(max_new_tokens=10, greedy=True, stop_token_ids=stops)
    eager = GenerationEngine(model, max_batch=3).generate(prompts, params)  # 2 waves, the last of 1 row
    assert {r.finish_reason for r in eager} == {"stop", "length"}
    for sync_every in (1, 16):  # host checks every step / never before the end
        static = GenerationEngine(model, max_batch=3, static=True, sync_every=sync_every).generate(prompts, params)
        _same(eager, static)


@pytest.mark.parametrize("script, budget, grace", [
    (_script(5, [A, A, NL, A, A, A, NL]) | _script(14, [B, C, IM_END]), 4, 500),  # closes at a newline
    (_script(5, [A] * 5) | _script(13, [C, IM_END]), 2, 3),  # hard stop at budget + grace
    (_script(5, [A, A, END_THINK, NL, A, A, NL, IM_END]), 1, 500),  # closes its own reasoning
])
def test_static_thinking_budget_forces_the_same_tokens(script, budget, grace):
    params = SamplingParams(max_new_tokens=50, thinking_budget=budget, thinking_grace=grace, **GREEDY)
    # with a row that is not reasoning and one that runs out of tokens, in one wave
    prompts = [PROMPT, [IM_START, 90, THINK, END_THINK, NL], PROMPT[:4]]
    eager = GenerationEngine(Scripted(script)).generate(prompts, params, think_ids=THINK_IDS)
    static = GenerationEngine(Scripted(script), static=True).generate(prompts, params, think_ids=THINK_IDS)
    assert any(eager[0].forced) == (script != _script(5, [A, A, END_THINK, NL, A, A, NL, IM_END]))
    _same(eager, static)


def test_static_seeded_sampling_same_stream_while_all_rows_run_then_deterministic():
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(11, 512, (n,), generator=g).tolist() for n in (4, 9, 6)]
    for kw in (dict(temperature=0.8), dict(temperature=1.3, top_k=20, top_p=0.9)):
        params = SamplingParams(max_new_tokens=12, seed=5, **kw)
        eager = GenerationEngine(model, max_batch=3).generate(prompts, params)
        static = GenerationEngine(model, max_batch=3, static=True).generate(prompts, params)
        _same(eager, static)  # no stop token: every row runs to the end, the generator is drawn alike
    # with stop tokens the streams part once a row finishes (module doc); the first steps still agree
    first = GenerationEngine(model, max_batch=3).generate(prompts, SamplingParams(max_new_tokens=12, seed=5))
    stop = first[1].tokens[3]
    params = SamplingParams(max_new_tokens=12, seed=5, stop_token_ids=(stop,))
    eager = GenerationEngine(model, max_batch=3).generate(prompts, params)
    engine = GenerationEngine(model, max_batch=3, static=True)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    k = min(len(r.tokens) for r in eager)  # steps before the first row finished
    assert [r.tokens[:k] for r in a] == [r.tokens[:k] for r in eager]
    for r in a:  # a row ends exactly at its first stop token, or runs to max_new_tokens
        assert (r.finish_reason == "stop") == (stop in r.tokens) and stop not in r.tokens[:-1]
        assert r.finish_reason == "stop" or len(r.tokens) == 12


def test_compiled_step_one_graph_no_breaks_same_tokens(monkeypatch):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = _tiny("M*E")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(11, 512, (n,), generator=g).tolist() for n in (5, 11, 2, 8, 3)]
    params = SamplingParams(max_new_tokens=10, greedy=True, stop_token_ids=(7,))
    eager = GenerationEngine(model, max_batch=2).generate(prompts, params)
    engine = GenerationEngine(model, max_batch=2, compile=True)
    compiled = engine.generate(prompts, params)  # 3 waves (the last padded to 2 rows), other lengths
    compiled += engine.generate(prompts[:1], SamplingParams(max_new_tokens=6, greedy=True))
    _same(eager, compiled[:5], atol=1e-4)
    assert compiled[5].tokens == eager[0].tokens[:6]
    # weights changed in place (an optimizer step between GRPO rollouts): the compiled step sees them
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    after = engine.generate(prompts[:2], params)
    _same(GenerationEngine(model, max_batch=2).generate(prompts[:2], params), after, atol=1e-4)
    assert [r.tokens for r in after] != [r.tokens for r in compiled[:2]]
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # one trace for every step of every wave
    # past the recompile limit (fullgraph would raise) the step warns and runs eagerly, same tokens
    monkeypatch.setattr(static, "RECOMPILE_LIMIT", 1)
    torch._dynamo.reset()
    limited = GenerationEngine(model, max_batch=2, compile=True)
    limited.generate(prompts[:2], params)  # bucket 256: the one graph allowed
    long = [prompts[0] * 60]  # 300 tokens: bucket 512, a second graph
    with pytest.warns(UserWarning, match="running it eagerly"):
        out = limited.generate(long, params)
    _same(GenerationEngine(model, max_batch=2).generate(long, params), out, atol=1e-4)
