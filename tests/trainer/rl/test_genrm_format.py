"""GenRM judge format: the prompt (reasoning stripped, through the chat template) and verdict parsing on
well-formed, near-JSON and malformed judge outputs."""

import pytest

from tandem.data_pipelines.chat import render_text
from tandem.trainer.rl.genrm import (
    DEFAULT_RANKING, DEFAULT_SCORE, ParseCounter, final_answer, judge_messages, parse_judgement, prefers,
    swap_consistent, swap_labels, with_default,
)

CONV = [
    {"role": "user", "content": "Hi, can you help with maths?"},
    {"role": "assistant", "content": "<think>be nice</think>Of course.", "reasoning_content": "SECRET-HISTORY"},
    {"role": "user", "content": "Which is larger, 3 or 8?"},
]


def test_judge_prompt_holds_history_turn_and_final_answers_only():
    msgs = judge_messages(CONV, "<think>3 < 8 so SECRET-A</think>The answer is 8.", "The answer is 3.")
    assert [m["role"] for m in msgs] == ["user"]
    text = msgs[0]["content"]
    for piece in ("Hi, can you help with maths?", "Of course.", "Which is larger, 3 or 8?", "The answer is 8.",
                  "The answer is 3.", "[Response 1]", "[Response 2]", '"score_1"', '"ranking"'):
        assert piece in text
    assert "SECRET" not in text and "<think>" not in text and "be nice" not in text
    assert text.index("The answer is 8.") < text.index("[Response 2]") < text.index("The answer is 3.")
    rendered = render_text(msgs, enable_thinking=True, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system") and rendered.endswith("<|im_start|>assistant\n<think>\n")


def test_judge_prompt_rejects_a_conversation_not_ending_with_user():
    with pytest.raises(ValueError, match="end with the user turn"):
        judge_messages(CONV[:2], "a", "b")


def test_final_answer():
    assert final_answer("<think>x</think> y ") == "y"
    assert final_answer("<think>never closed") == ""
    assert final_answer("plain") == "plain"


GOOD = [
    ('<think>r1 is right</think>{"score_1": 5, "score_2": 2, "ranking": 1}', (5, 2, 1), "span"),
    ('Response 1 is right.\n```json\n{"score_1": 4, "score_2": 2, "ranking": 2}\n```\nDone.', (4, 2, 2), "fence"),
    ('thinking...\n```\n{"score_1": 1, "score_2": 5, "ranking": 6}\n```', (1, 5, 6), "fence"),
    ('{"score_1": 3, "score_2": 4, "ranking": 4} and that is my final verdict!', (3, 4, 4), "span"),
    ("{'score_1': 4, 'score_2': 3, 'ranking': 3}", (4, 3, 3), "span+repair"),                # single quotes
    ('{score_1: 2, score_2: 4, ranking: 5}', (2, 4, 5), "span+repair"),                       # unquoted keys
    ('{"score_1": 5, "score_2": 1, "ranking": 1,}', (5, 1, 1), "span+repair"),                # trailing comma
    ('{"score_1" = 4, "score_2" = 4, "ranking" = 3}', (4, 4, 3), "span+repair"),              # = for :
    ('{"score_1": "4", "score_2": 2.0, "ranking": "2"}', (4, 2, 2), "span"),                  # numeric strings
    ('draft {"score_1": 9} no wait. {"score_1": 2, "score_2": 3, "ranking": 4}', (2, 3, 4), "span"),
    ('{"score_1": 5, "score_2": 1, "ranking": 1, "note": {"why": "correct"}}', (5, 1, 1), "span"),  # nested
    ('{"score_1": 4, "score_2": 2, "ranking": 2} then a broken {"score_1": ', (4, 2, 2), "span"),
]


@pytest.mark.parametrize("text,want,method", GOOD)
def test_parse_well_formed_and_near_json(text, want, method):
    j = parse_judgement(text)
    assert j.ok, j.error
    assert (j.score_1, j.score_2, j.ranking) == want and j.method == method


def test_parse_keeps_the_reasoning():
    j = parse_judgement('<think>I compare them</think>Response 1 wins.\n{"score_1": 5, "score_2": 2, "ranking": 1}')
    assert "I compare them" in j.reasoning and "Response 1 wins." in j.reasoning and "score_1" not in j.reasoning


MALFORMED = [
    ("", "no JSON"),
    ("Response 1 is better.", "no JSON"),
    ("<think>still thinking about {\"score_1\": 5, \"score_2\": 1, \"ranking\": 1}", "unclosed reasoning"),
    ('{"score_1": 5, "score_2": 1}', "missing key"),
    ('{"score_1": 6, "score_2": 1, "ranking": 1}', "out of range"),
    ('{"score_1": 0, "score_2": 1, "ranking": 1}', "out of range"),
    ('{"score_1": 5, "score_2": 1, "ranking": 7}', "out of range"),
    ('{"score_1": 4.5, "score_2": 1, "ranking": 1}', "not an integer"),
    ('{"score_1": true, "score_2": 1, "ranking": 1}', "not an integer"),
    ('{"score_1": "good", "score_2": 1, "ranking": 1}', "not an integer"),
    ('{"score_1": null, "score_2": 1, "ranking": 1}', "not an integer"),
    ('{"score_1": 5, "score_2": 1, "ranking": 1', "no JSON"),                 # never closed
    ('[5, 1, 1]', "no JSON"),
    ('```json\n"score_1: 5, score_2: 1, ranking: 1"\n```', "not an object"),
    ('{"score_1": 5 "score_2": 1 "ranking": 1}', "unparseable"),             # missing commas
    ('{"Score 1": 5, "Score 2": 1, "Ranking": 1}', "missing key"),
    ('{{{{', "no JSON"),
    ('{"score_1": [5], "score_2": 1, "ranking": 1}', "not an integer"),
    ('{"score_1": 5, "score_2": 1, "ranking": -1}', "out of range"),
]


@pytest.mark.parametrize("text,why", MALFORMED)
def test_parse_malformed_gives_a_counted_default(text, why):
    j = parse_judgement(text)
    assert not j.ok and why in j.error, j.error
    assert with_default(j) == (DEFAULT_SCORE, DEFAULT_SCORE, DEFAULT_RANKING)


def test_parse_counter_and_non_text():
    c = ParseCounter()
    for text, _ in MALFORMED:
        c.add(parse_judgement(text))
    for text, _, _ in GOOD:
        c.add(parse_judgement(text))
    c.add(parse_judgement(None))
    assert (c.total, c.errors) == (len(MALFORMED) + len(GOOD) + 1, len(MALFORMED) + 1)
    assert c.reasons["out of range"] == 4 and c.error_frac == pytest.approx(c.errors / c.total)


def test_swap_labels_and_consistency():
    assert swap_labels(5, 2, 1) == (2, 5, 6) and swap_labels(*swap_labels(4, 3, 3)) == (4, 3, 3)
    assert [prefers(r) for r in (1, 3, 3.5, 4, 6)] == [-1, -1, 0, 1, 1]
    assert swap_consistent(2, 5) and swap_consistent(3, 4) and not swap_consistent(2, 2)
    assert not swap_consistent(3.5, 3.5)
