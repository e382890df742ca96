"""The ``structured`` environment: JSON output validated against a JSON Schema (the ``jsonschema`` library).

    {"prompt": "Give a user record with name (string) and age (integer >= 0) as JSON.",
     "task": "structured", "answer": "{\\"name\\": \\"Ada\\", \\"age\\": 36}",        # an example (checked in tests)
     "metadata": {"schema": {"type": "object", "required": ["name", "age"],
                             "properties": {"name": {"type": "string"},
                                            "age": {"type": "integer", "minimum": 0}},
                             "additionalProperties": false},
                  "json_only": true}}                     # optional: prose around the JSON fails

**Extraction** (text after the last ``</think>``; an unclosed reasoning block has no output): the last
```json (or untagged) fenced block; else the whole response; else the span from the first ``{``/``[`` to
the last ``}``/``]``. With ``json_only`` only the first two count (the response must be the JSON alone).

**Reward** 1 when the extracted JSON parses and is valid under ``metadata.schema`` (the dialect named by
its ``$schema``, Draft 2020-12 by default; ``format`` keywords checked where ``jsonschema`` has a
checker), else 0. Components: ``parsed`` (the JSON parsed) and ``schema_valid``, so parse errors and
schema violations are told apart; ``info`` has the first validation error's path and message. An invalid
*schema* is a ``ValueError`` naming the prompt (counted by the dispatcher as an environment error).
Validators are compiled once per distinct schema (cached).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Mapping

from .base import Environment, Verdict, register_environment
from .instructions import response_text

__all__ = ["StructuredEnv", "extract_json"]

_FENCE = re.compile(r"```([A-Za-z0-9_-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_json(text: str, json_only: bool = False) -> tuple[Any, str | None, str | None]:
    """``(value, method, parse_error)``: method ``fence`` / ``whole`` / ``span``; value None if nothing parsed."""
    blocks = [body for tag, body in _FENCE.findall(text) if tag.lower() in ("json", "")]
    candidates = []
    if blocks and (not json_only or re.fullmatch(r"\s*```[^\n]*\n.*```\s*", text, flags=re.DOTALL)):
        candidates.append(("fence", blocks[-1]))
    candidates.append(("whole", text))
    if not json_only:
        starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
        end = max(text.rfind("}"), text.rfind("]"))
        if starts and end > min(starts):
            candidates.append(("span", text[min(starts): end + 1]))
    error = None
    for method, body in candidates:
        try:
            return json.loads(body), method, None
        except ValueError as e:
            error = error or f"{method}: {e}"
    return None, None, error


@lru_cache(maxsize=256)
def _validator(schema_text: str):
    from jsonschema import FormatChecker, validators

    schema = json.loads(schema_text)
    cls = validators.validator_for(schema)
    cls.check_schema(schema)  # SchemaError for an invalid schema
    return cls(schema, format_checker=FormatChecker())


@register_environment("structured")
class StructuredEnv(Environment):
    """Reward 1 for JSON that parses and satisfies ``metadata.schema``; components ``parsed``, ``schema_valid``."""

    def prepare(self) -> None:
        import jsonschema  # noqa: F401

    def verify(self, sample: Mapping[str, Any], completion: str) -> Verdict:
        from jsonschema.exceptions import SchemaError

        meta = sample.get("metadata") or {}
        where = sample.get("where", "structured sample")
        schema = meta.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{where}: metadata.schema must be a JSON Schema object")
        try:
            validator = _validator(json.dumps(schema, sort_keys=True))
        except SchemaError as e:
            raise ValueError(f"{where}: metadata.schema is not a valid JSON Schema: {e.message}") from None
        text = response_text(completion)
        if text is None:
            return Verdict(0.0, {"parsed": 0.0, "schema_valid": 0.0}, {"error": "reasoning never closed"})
        value, method, parse_error = extract_json(text, json_only=bool(meta.get("json_only")))
        if method is None:
            return Verdict(0.0, {"parsed": 0.0, "schema_valid": 0.0}, {"error": "parse", "message": parse_error})
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        info = {"method": method}
        if errors:
            info.update(error="schema", path="/".join(map(str, errors[0].absolute_path)), message=errors[0].message)
        return Verdict(float(not errors), {"parsed": 1.0, "schema_valid": float(not errors)}, info)
