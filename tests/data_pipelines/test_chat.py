"""The chat template (Jinja, applied by transformers) and the token-level renderer agree token for token."""

import json
import random

import pytest
from dp_helpers import CHAT_TOOLS, random_conversation

from tandem.data_pipelines.chat import (chat_pieces, load_chat_template, render_chat, render_prompt, render_sft_samples, render_text,
                                 segment_ends, thinking_mode)
from tandem.data_pipelines.tokenizer import SHIPPED_TOKENIZER_DIR


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER_DIR), local_files_only=True)


def template(hf, messages, **kw):
    return hf.apply_chat_template(messages, tokenize=False, **kw)


def assert_agree(hf, tok, messages, **kw):
    """Template text == pieces text, and renderer ids == encode(template text) == transformers' ids."""
    text = template(hf, messages, **kw)
    assert render_text(messages, **kw) == text
    ids = render_chat(messages, tok, **kw)["input_ids"]
    assert ids == tok.encode(text)
    assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    assert ids == tok.apply_chat_template(messages, **kw)
    assert ids == render_chat(messages, hf, **kw)["input_ids"]  # a transformers tokenizer works as well
    return text


AGENT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "reasoning_content": "Use the tool.", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "reasoning_content": "The tool said 5.", "content": "5"},
    {"role": "user", "content": "And 1 + 1?"},
    {"role": "assistant", "reasoning_content": "1 + 1 = 2.", "content": "2"},
]


def test_exact_format_of_the_facts_sheet(hf, tok):
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "reasoning_content": "greet", "content": "Hello"}]
    assert assert_agree(hf, tok, msgs) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\ngreet\n</think>\nHello<|im_end|>\n")
    no_reasoning = [msgs[0], {"role": "assistant", "content": "Hello"}]
    assert assert_agree(hf, tok, no_reasoning).endswith("<|im_start|>assistant\n<think></think>Hello<|im_end|>\n")
    on = assert_agree(hf, tok, msgs[:1], add_generation_prompt=True)
    off = assert_agree(hf, tok, msgs[:1], add_generation_prompt=True, enable_thinking=False)
    assert on.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think></think>")
    # reasoning OFF drops reasoning from every assistant turn
    assert "greet" not in assert_agree(hf, tok, msgs, enable_thinking=False)


def test_tools_tool_calls_and_tool_responses(hf, tok):
    text = assert_agree(hf, tok, AGENT, tools=CHAT_TOOLS)
    sys_block = text.split("<|im_end|>")[0]
    assert sys_block.startswith("<|im_start|>system\nYou add numbers.\n\n# Tools\n")
    assert "<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in CHAT_TOOLS) + "\n</tools>" in sys_block
    assert ('<|im_start|>assistant\n<think></think><tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n') in text
    # consecutive tool results share one user turn; calls follow the content after a newline
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "Two calls.", "tool_calls": [
                {"name": "add", "arguments": {"a": 1}}, {"name": "lookup", "arguments": '{"w": "x"}'}]},
            {"role": "tool", "content": "1"}, {"role": "tool", "content": "x"},
            {"role": "assistant", "content": "done"}]
    text = assert_agree(hf, tok, msgs, tools=CHAT_TOOLS)
    assert ('Two calls.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
            '{"name": "lookup", "arguments": {"w": "x"}}\n</tool_call><|im_end|>') in text
    assert "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\nx\n</tool_response><|im_end|>" in text
    # empty system + tools: the tools section alone
    assert template(hf, msgs[:1], tools=CHAT_TOOLS).startswith("<|im_start|>system\n# Tools\n")


def test_history_truncation(hf, tok):
    text = assert_agree(hf, tok, AGENT)
    # the two turns before the last user message lose their reasoning, the last one keeps it
    assert "Use the tool." not in text and "The tool said 5." not in text and "<think>\n1 + 1 = 2.\n</think>\n2" in text
    full = assert_agree(hf, tok, AGENT, truncate_history_thinking=False)
    assert "<think>\nUse the tool.\n</think>\n" in full and "<think>\nThe tool said 5.\n</think>\n5" in full


@pytest.mark.parametrize("texts,kwarg,expect", [
    (["sys /no_think", "q"], True, False),
    (["", "q /no_think"], True, False),
    (["/no_think", "q /think"], True, True),
    (["", "a /think b /no_think"], True, False),
    (["", "a /no_think b /think"], False, True),
    (["", "q"], False, False),
    (["/think", "q"], False, True),
])
def test_think_markers_last_one_wins_and_are_removed(hf, tok, texts, kwarg, expect):
    msgs = [{"role": "system", "content": texts[0]}, {"role": "user", "content": texts[1]}]
    assert thinking_mode(msgs, kwarg) is expect
    text = assert_agree(hf, tok, msgs, enable_thinking=kwarg, add_generation_prompt=True)
    assert "/think" not in text.replace("</think>", "") and "/no_think" not in text
    assert text.endswith("<think>\n" if expect else "<think></think>")


def test_randomized_agreement(hf, tok):
    """Property: for random conversations (special-token strings, markers, unicode and whitespace in the
    text) and random options, the piece-wise ids equal transformers' rendering of the Jinja template."""
    rng = random.Random(1234)
    for _ in range(150):
        msgs, tools = random_conversation(rng)
        kw = dict(enable_thinking=rng.choice([True, False, None]), add_generation_prompt=rng.random() < 0.5,
                  truncate_history_thinking=rng.random() < 0.7)
        if kw["enable_thinking"] is None:
            del kw["enable_thinking"]
        assert_agree(hf, tok, msgs, tools=tools, **kw)
        # every expanded sample is the template's rendering of a prefix
        for end in segment_ends(msgs):
            assert render_chat(msgs[:end], tok, tools=tools)["input_ids"] == tok.encode(
                template(hf, msgs[:end], tools=tools))


def masked_runs(tok, sample):
    """Decoded text of each contiguous run of loss_mask == 1."""
    runs, cur = [], []
    for i, m in zip(sample["input_ids"], sample["loss_mask"] + [0]):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_loss_mask_is_exactly_the_assistant_bodies(tok):
    s = render_chat(AGENT, tok, truncate_history_thinking=False, add_generation_prompt=True)
    assert len(s["input_ids"]) == len(s["loss_mask"])
    assert masked_runs(tok, s) == [
        '<think>\nUse the tool.\n</think>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>',
        "<think>\nThe tool said 5.\n</think>\n5<|im_end|>",
        "<think>\n1 + 1 = 2.\n</think>\n2<|im_end|>"]
    ids, mask = s["input_ids"], s["loss_mask"]
    im_start, im_end, think = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<think>"))
    for i, t in enumerate(ids):
        if t == im_end and mask[i]:
            assert mask[i + 1] == 0 and tok.decode([ids[i + 1]]) == "\n"  # the newline after is not trained
        if t == think and mask[i]:
            start = max(j for j in range(i) if ids[j] == im_start)
            assert tok.decode(ids[start:i]) == "<|im_start|>assistant\n" and not any(mask[start:i])  # header
    prompt = render_prompt(AGENT[:2], tok)
    with_prompt = render_chat(AGENT[:2], tok, add_generation_prompt=True)
    assert with_prompt["input_ids"] == prompt and not any(with_prompt["loss_mask"])  # prompt never trained
    assert ids[:len(prompt)] == prompt  # the ON prompt is exactly the trained context of the first answer
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n") and prompt[-1] != im_start


def conversation_bodies(msgs, tools=None):
    """The full (untruncated) body text of every assistant turn, as trained."""
    return [text for text, turn in chat_pieces(msgs, tools=tools, truncate_history_thinking=False) if turn is not None]


def test_multi_turn_trains_every_assistant_turn_exactly_once(hf, tok):
    rng = random.Random(7)
    checked = 0
    for _ in range(60):
        msgs, tools = random_conversation(rng)
        # unique, non-empty text per turn so a trained body identifies its turn
        for k, m in enumerate(msgs):
            if m["role"] in ("system", "user"):  # one mode for the whole conversation (markers: below)
                m["content"] = m["content"].replace("/no_think", "").replace("/think", "")
            if m["role"] == "assistant":
                m["content"] = f"answer {k}"
                m["reasoning_content"] = f"reason {k}" if rng.random() < 0.7 else ""
        for merge in (True, False):
            samples = render_sft_samples(msgs, tok, tools=tools, merge_prefixes=merge)
            trained = [r for s in samples for r in masked_runs(tok, s)]
            assert sorted(trained) == sorted(conversation_bodies(msgs, tools))  # each once, with its reasoning
            if not merge:  # unmerged: one sample per segment, each the template's rendering of its prefix
                ends = segment_ends(msgs)
                assert len(samples) == len(ends)
                for s, end in zip(samples, ends):
                    assert s["input_ids"] == tok.encode(template(hf, msgs[:end], tools=tools))
            checked += len(samples) > 1
        final = render_sft_samples(msgs, tok, tools=tools, train_on="final")
        assert len(final) == 1 and final[0]["input_ids"] == tok.encode(template(hf, msgs, tools=tools))
        off = render_sft_samples(msgs, tok, tools=tools, truncate_history_thinking=False)
        assert len(off) == 1 and sorted(masked_runs(tok, off[0])) == sorted(conversation_bodies(msgs, tools))
    assert checked > 10  # the random conversations did exercise multi-segment expansion


def test_segments_and_merging(tok):
    assert segment_ends(AGENT) == [5, 7]
    samples = render_sft_samples(AGENT, tok, merge_prefixes=True)
    assert len(samples) == 2  # the first segment's reasoning is truncated later: not a prefix, kept apart
    no_reasoning = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in AGENT]
    merged = render_sft_samples(no_reasoning, tok)
    assert len(merged) == 1 and len(masked_runs(tok, merged[0])) == 3  # nothing truncated: one sample
    assert render_sft_samples(no_reasoning, tok, merge_prefixes=False)[0]["input_ids"] == \
        merged[0]["input_ids"][:len(render_chat(no_reasoning[:5], tok)["input_ids"])]
    # a trailing user message after the last answer trains nothing and adds no sample
    tail = render_sft_samples(AGENT + [{"role": "user", "content": "bye"}], tok, train_on="final")
    assert tail[0]["input_ids"] == render_chat(AGENT, tok)["input_ids"]
    with pytest.raises(ValueError, match="train_on"):
        render_sft_samples(AGENT, tok, train_on="last")


def test_mode_is_that_of_each_rendered_prefix(hf, tok):
    """A later /no_think does not reach back: the first answer's sample is rendered (and trained) in the
    mode its prefix has, exactly as the template renders that prefix at inference time."""
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "reasoning_content": "r1", "content": "1"},
            {"role": "user", "content": "b /no_think"}, {"role": "assistant", "reasoning_content": "r2", "content": "2"}]
    first, second = render_sft_samples(msgs, tok)
    assert masked_runs(tok, first) == ["<think>\nr1\n</think>\n1<|im_end|>"]
    assert masked_runs(tok, second) == ["<think></think>2<|im_end|>"]
    assert first["input_ids"] == tok.encode(template(hf, msgs[:2]))
    assert second["input_ids"] == tok.encode(template(hf, msgs))


def test_template_file_is_what_the_tokenizer_ships():
    cfg = json.loads((SHIPPED_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == load_chat_template()


def test_bad_messages_raise(hf, tok):
    with pytest.raises(ValueError, match="unknown role"):
        render_chat([{"role": "bot", "content": "x"}], tok)
    with pytest.raises(ValueError, match="only allowed as the first"):
        render_chat([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], tok)
    with pytest.raises(Exception, match="only allowed as the first"):
        template(hf, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
