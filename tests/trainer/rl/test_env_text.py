"""The instruction-following and structured-output environments on hand-made right / wrong / malformed
completions: per-constraint components, parse vs schema errors, bad prompt metadata."""

import pytest

from tandem.trainer.rl.environments import score_batch
from tandem.trainer.rl.environments.instructions import CONSTRAINTS, InstructionsEnv, check_constraint
from tandem.trainer.rl.environments.structured import StructuredEnv, extract_json

IF = InstructionsEnv()
SO = StructuredEnv()


@pytest.mark.parametrize("constraint, yes, no", [
    ({"type": "words", "min": 3, "max": 5}, "one two three four", "one two"),
    ({"type": "chars", "max": 5}, "short", "too long"),
    ({"type": "sentences", "min": 2}, "One. Two!", "Just one."),
    ({"type": "keywords", "include": ["cat", "Mat"]}, "The cat sat on the mat.", "The cat sat."),
    ({"type": "forbidden", "exclude": ["dog"]}, "dogma is a word", "a Dog barked"),  # whole words only
    ({"type": "keyword_count", "keyword": "ha", "min": 2, "max": 3}, "ha ha HA", "ha hahaha"),
    ({"type": "paragraphs", "count": 2}, "First.\n\nSecond.", "First.\nstill first."),
    ({"type": "bullets", "count": 2}, "Intro\n* a\n- b", "* a\n*b\nc"),
    ({"type": "sections", "headers": ["Summary", "Details"]}, "# Summary\nx\n## details\ny", "Summary: x\n# Details"),
    ({"type": "case", "mode": "lower"}, "all lower, 123.", "Not lower"),
    ({"type": "case", "mode": "upper"}, "ALL UPPER!", "ALMOST uPPER"),
    ({"type": "starts_with", "phrase": "Dear"}, "dear sir", "Hello, dear"),
    ({"type": "ends_with", "phrase": "Is there anything else?"}, "Done. is there anything else?", "Is there anything else? No."),
    ({"type": "json_only"}, '```json\n{"a": 1}\n```', 'Here: {"a": 1}'),
])
def test_each_constraint(constraint, yes, no):
    assert check_constraint(yes, constraint) is True
    assert check_constraint(no, constraint) is False


def test_every_constraint_type_is_tested():
    tested = {"words", "chars", "sentences", "keywords", "forbidden", "keyword_count", "paragraphs", "bullets",
              "sections", "case", "starts_with", "ends_with", "json_only"}
    assert tested == set(CONSTRAINTS)


def test_instructions_fraction_and_components():
    sample = {"task": "instructions", "answer": "", "metadata": {"constraints": [
        {"type": "paragraphs", "count": 2}, {"type": "case", "mode": "lower"},
        {"type": "keyword_count", "keyword": "whiskers", "min": 2}]}}
    right = IF.verify(sample, "<think>plan</think>the cat has whiskers.\n\nlong whiskers indeed.")
    assert right.reward == 1.0 and right.components == {"0:paragraphs": 1.0, "1:case": 1.0, "2:keyword_count": 1.0}
    wrong = IF.verify(sample, "<think></think>The cat has whiskers.")
    assert wrong.reward == pytest.approx(0.0) and wrong.info["failed"] == ["paragraphs", "case", "keyword_count"]
    part = IF.verify(sample, "the cat.\n\nthe whiskers, once.")  # two of three: one whiskers only
    assert part.reward == pytest.approx(2 / 3) and part.components["2:keyword_count"] == 0.0
    cut = IF.verify(sample, "<think>the budget ran out before an answer")  # unclosed reasoning: nothing holds
    assert cut.reward == 0.0 and cut.info["answered"] is False


def test_instructions_bad_metadata_is_named():
    with pytest.raises(ValueError, match=r"p.jsonl:3: metadata.constraints\[0\]: unknown constraint type 'rhyme'"):
        IF.verify({"where": "p.jsonl:3", "metadata": {"constraints": [{"type": "rhyme"}]}}, "x")
    with pytest.raises(ValueError, match=r"constraints\[0\]: constraint 'words': needs 'min' and/or 'max'"):
        IF.verify({"where": "p", "metadata": {"constraints": [{"type": "words"}]}}, "x")
    with pytest.raises(ValueError, match="non-empty list"):
        IF.verify({"where": "p", "metadata": {}}, "x")


SCHEMA = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                         "email": {"type": "string", "format": "email"}}}
REC = {"task": "structured", "answer": "", "metadata": {"schema": SCHEMA}}


@pytest.mark.parametrize("completion, reward, parsed, method", [
    ('<think>x</think>{"name": "Ada", "age": 36}', 1.0, 1.0, "whole"),
    ('Sure:\n```json\n{"name": "Ada", "age": 36}\n```\nDone.', 1.0, 1.0, "fence"),
    ('The record is {"name": "Ada", "age": 36} as asked.', 1.0, 1.0, "span"),
    ('{"name": "Ada", "age": -1}', 0.0, 1.0, "whole"),  # schema: minimum
    ('{"name": "Ada"}', 0.0, 1.0, "whole"),  # schema: required
    ('{"name": "Ada", "age": 3, "extra": 1}', 0.0, 1.0, "whole"),  # schema: additionalProperties
    ('{"name": "Ada", "age": 3, "email": "not-an-email"}', 0.0, 1.0, "whole"),  # format checked
    ('{"name": "Ada", "age": 36', 0.0, 0.0, None),  # malformed JSON
    ("no json here", 0.0, 0.0, None),
    ('<think>{"name": "Ada", "age": 36}', 0.0, 0.0, None),  # reasoning never closed
])
def test_structured(completion, reward, parsed, method):
    v = SO.verify(REC, completion)
    assert (v.reward, v.components["parsed"], v.info.get("method")) == (reward, parsed, method), v
    assert v.components["schema_valid"] == reward


def test_structured_error_detail_and_json_only():
    v = SO.verify(REC, '{"name": 5, "age": 1}')
    assert v.info["error"] == "schema" and v.info["path"] == "name" and "is not of type 'string'" in v.info["message"]
    strict = {**REC, "metadata": {"schema": SCHEMA, "json_only": True}}
    assert SO.verify(strict, '{"name": "A", "age": 1}').reward == 1.0
    assert SO.verify(strict, '```json\n{"name": "A", "age": 1}\n```').reward == 1.0
    assert SO.verify(strict, 'Here you go: {"name": "A", "age": 1}').components["parsed"] == 0.0
    assert extract_json("[1, 2] and more")[0] == [1, 2]


def test_structured_bad_schema_is_an_error_counted_by_the_dispatcher():
    bad = {"task": "structured", "answer": "", "where": "s.jsonl:9", "metadata": {"schema": {"type": "nonsense"}}}
    with pytest.raises(ValueError, match="s.jsonl:9: metadata.schema is not a valid JSON Schema"):
        SO.verify(bad, "{}")
    verdicts, stats = score_batch([(bad, "{}"), (REC, '{"name": "A", "age": 1}')], timeout_s=5)
    assert [v.reward for v in verdicts] == [0.0, 1.0] and stats.errors == 1
