"""Multi-turn tool rollouts with a scripted policy: the token sequence is exactly the chat template's
rendering of the conversation (token-in / token-out), tool responses are forced (no loss), invalid calls
are counted, the tool world's verdicts, turn / length limits. (A GRPO step with the tool task:
test_env_prompt_sets.py::test_mixed_recipe_step_scores_every_environment.)"""

import json

import pytest

from tandem.data_pipelines.chat import render_chat, render_prompt
from tandem.data_pipelines.tokenizer import load_tokenizer
from tandem.trainer.inference.engine import GenerationResult, SamplingParams
from tandem.trainer.rl.environments.tools import ToolWorldEnv, parse_tool_calls, run_tool, split_transcript, ToolError
from tandem.trainer.rl.multiturn import rollout_episodes
from tandem.trainer.stages.grpo import Rollout, pack_rollouts

TOK = load_tokenizer(None)
IM_END = TOK.token_to_id("<|im_end|>")
SAMPLE = {"task": "tools", "answer": "391", "prompt": "Compute 17*23, store it under 'result', then say it.",
          "metadata": {"initial": {}, "expect_state": {"result": 391}}}
CALC = {"name": "calculator", "arguments": {"expression": "17*23"}}
SET = {"name": "kv_set", "arguments": {"key": "result", "value": 391}}
BOGUS = {"name": "rm_rf", "arguments": {}}


def call_text(*calls, pre="Let me use a tool."):
    return pre + "".join(f"\n<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)


SCRIPT = [call_text(CALC), call_text(SET, BOGUS, pre="Storing it."), "The value is 391."]


class Scripted:
    """A policy that answers turn k of every episode with SCRIPT[k] (tokens as the tokenizer encodes them)."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, prompts, params):
        self.calls.append(params)
        out = []
        for p in prompts:
            turn = (p.count(TOK.token_to_id("<|im_start|>")) - 3) // 2  # system, user, header; +2 per turn
            ids = TOK.encode(self.script[turn])[: params.max_new_tokens - 1]
            done = len(ids) < params.max_new_tokens - 1 or len(TOK.encode(self.script[turn])) == len(ids)
            toks = ids + ([IM_END] if done else [])
            out.append(GenerationResult(list(p), toks, [-0.5] * len(toks), [False] * len(toks),
                                        "stop" if done else "length"))
        return out


def prompt_ids():
    return render_prompt([{"role": "user", "content": SAMPLE["prompt"]}], TOK, enable_thinking=False,
                         tools=ToolWorldEnv.tools)


def run(script=SCRIPT, max_turns=4, max_tokens=2048, env=None, n=1):
    params = SamplingParams(max_new_tokens=256, seed=7, stop_token_ids=(IM_END,))
    policy = Scripted(script)
    eps = rollout_episodes(policy, [prompt_ids()] * n, params, env=env or ToolWorldEnv(), samples=[SAMPLE] * n,
                           tokenizer=TOK, thinking=False, max_turns=max_turns, max_tokens=max_tokens)
    return eps, policy


def test_tokens_are_the_templates_rendering_and_tool_responses_are_forced():
    (ep,), policy = run()
    assert ep.turns == 3 and ep.finish_reason == "stop" and ep.invalid_calls == 1
    conv = [{"role": "user", "content": SAMPLE["prompt"]},
            {"role": "assistant", "content": "Let me use a tool.", "tool_calls": [CALC]},
            {"role": "tool", "content": json.dumps({"result": 391})},
            {"role": "assistant", "content": "Storing it.", "tool_calls": [SET, BOGUS]},
            {"role": "tool", "content": json.dumps({"ok": True})},
            {"role": "tool", "content": json.dumps({"error": "unknown tool 'rm_rf'; tools: ['calculator', 'kv_get', 'kv_set']"})},
            {"role": "assistant", "content": "The value is 391."}]
    full = render_chat(conv, TOK, tools=ToolWorldEnv.tools, enable_thinking=False)["input_ids"]
    p = prompt_ids()
    assert full[: len(p)] == p
    assert ep.tokens == full[len(p): -len(TOK.encode("\n"))]  # the template's, but for the newline after the end
    # generated tokens are exactly the policy's; everything else (tool responses, headers) is forced
    generated = [t for t, f in zip(ep.tokens, ep.forced) if not f]
    assert generated == [t for s in SCRIPT for t in TOK.encode(s) + [IM_END]]
    forced_text = TOK.decode([t for t, f in zip(ep.tokens, ep.forced) if f])
    assert forced_text.count("<tool_response>") == 3 and "391" in forced_text and "Let me" not in forced_text
    assert all(lp == 0.0 for lp, f in zip(ep.logprobs, ep.forced) if f)
    assert len({c.seed for c in policy.calls}) == 3  # each turn its own seed
    # packed for training: only generated tokens are targets
    r = Rollout(ep.prompt_ids, ep.tokens, ep.logprobs, ep.forced, advantage=1.0)
    b = pack_rollouts([r], seq_len=2048, pad_id=0)
    targets = (b["loss_mask"] > 0) & ~b["forced_mask"]
    assert int(targets.sum()) == len(generated)
    assert b["labels"][targets].tolist() == generated


def test_verdict_of_the_transcript():
    (ep,), _ = run()
    env = ToolWorldEnv()
    text = "<think></think>" + TOK.decode(ep.tokens[:-1])  # what the GRPO stage scores
    assert [r for r, _ in split_transcript(text)] == ["assistant", "user", "assistant", "user", "assistant"]
    v = env.verify(SAMPLE, text)
    assert v.reward == 1.0 and v.components == {"answer_ok": 1.0, "state_ok": 1.0, "tool_calls": 3.0,
                                                "invalid_calls": 1.0, "turns": 3.0}
    assert v.info["final_store"] == {"result": 391}
    assert ToolWorldEnv(invalid_penalty=0.25).verify(SAMPLE, text).reward == 0.75
    wrong = "<think></think>" + call_text({"name": "kv_set", "arguments": {"key": "result", "value": 390}}) \
        + "<|im_end|>\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n<|im_start|>assistant\n" \
          "<think></think>It is 390."
    w = ToolWorldEnv().verify(SAMPLE, wrong)
    assert w.reward == 0.0 and w.components["state_ok"] == 0.0 and w.components["answer_ok"] == 0.0


def test_turn_and_length_limits():
    (ep,), policy = run(max_turns=2)  # the answer turn never comes
    assert ep.turns == 2 and len(policy.calls) == 2
    v = ToolWorldEnv().verify(SAMPLE, "<think></think>" + TOK.decode(ep.tokens[:-1]))
    assert v.components["answer_ok"] == 0.0 and v.components["state_ok"] == 1.0 and v.reward == 0.5
    (short,), _ = run(max_tokens=len(prompt_ids()) + 40)  # room for the first call, not for its response
    assert short.finish_reason == "length" and short.turns == 1
    assert len(short.prompt_ids) + len(short.tokens) <= len(prompt_ids()) + 40
    many, _ = run(n=3)  # a group: episodes batched per turn
    assert all(e.tokens == many[0].tokens for e in many)


def test_tools_and_invalid_calls():
    store = {"x": 2}
    assert run_tool(store, "calculator", {"expression": "(1 + 2) * 3 - 4 / 2"}) == {"result": 7}
    assert run_tool(store, "kv_get", {"key": "x"}) == {"value": 2}
    assert "error" in run_tool(store, "kv_get", {"key": "nope"})  # valid call, absent key
    assert run_tool(store, "kv_set", {"key": "y", "value": [1]}) == {"ok": True} and store["y"] == [1]
    for name, args in (("calculator", {"expression": "__import__('os')"}), ("calculator", {"expression": "2**99999"}),
                       ("calculator", {"expression": "1/0"}), ("calculator", {}), ("kv_get", {"key": 1}),
                       ("kv_set", {"key": "a"}), ("kv_get", {"key": "x", "extra": 1}), ("shell", {})):
        with pytest.raises(ToolError):
            run_tool(store, name, args)
    calls = parse_tool_calls('<think><tool_call>{"name": "x"}</tool_call></think>'
                             '<tool_call>{bad json}</tool_call><tool_call>{"name": "kv_get", "arguments": "{\\"key\\": \\"x\\"}"}</tool_call>')
    assert [c[0] for c in calls] == [None, "kv_get"] and calls[1][1] == {"key": "x"}  # reasoning's calls ignored
