"""The ``instructions`` environment: verifiable instruction following (IFEval-style constraints).

A prompt lists its constraints in ``metadata.constraints``; the reward is the fraction satisfied and each
constraint's result is a component ``"<i>:<type>"`` (1/0)::

    {"prompt": "Describe a cat in two paragraphs, all lowercase, mentioning 'whiskers' at least twice.",
     "task": "instructions", "answer": "",
     "metadata": {"constraints": [{"type": "paragraphs", "count": 2}, {"type": "case", "mode": "lower"},
                                  {"type": "keyword_count", "keyword": "whiskers", "min": 2}]}}

The response checked is the text after the last ``</think>`` (stripped); an unclosed reasoning block
satisfies nothing. Constraint types (:data:`CONSTRAINTS`; ``min``/``max`` are inclusive and optional):

| type | parameters | satisfied when |
|---|---|---|
| ``words`` | ``min``, ``max`` | the number of words (``\\w+`` runs) is in range |
| ``chars`` | ``min``, ``max`` | the number of characters is in range |
| ``sentences`` | ``min``, ``max`` | sentences (ending in ``.``, ``!``, ``?``) in range |
| ``keywords`` | ``include: [..]`` | every keyword occurs (case-insensitive, whole words) |
| ``forbidden`` | ``exclude: [..]`` | none occurs (case-insensitive, whole words) |
| ``keyword_count`` | ``keyword``, ``min``, ``max`` | its occurrence count is in range |
| ``paragraphs`` | ``count`` | exactly that many paragraphs (blocks separated by blank lines) |
| ``bullets`` | ``count`` | exactly that many bullet lines (``* `` or ``- ``) |
| ``sections`` | ``headers: [..]`` | each is a Markdown heading line (``# Title`` .. ``###### Title``) |
| ``case`` | ``mode``: ``lower`` / ``upper`` | no letter of the other case |
| ``starts_with`` / ``ends_with`` | ``phrase`` | the response starts / ends with it (case-insensitive) |
| ``json_only`` | — | the whole response is one JSON value (a ```json fence around it allowed) |

An unknown type or a missing parameter is a ``ValueError`` naming the prompt (``where``) — the dispatcher
counts it as an environment error; the prompt sets this project writes are checked against their own
example answers in the tests.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

from .base import Environment, Verdict, register_environment

__all__ = ["InstructionsEnv", "CONSTRAINTS", "check_constraint", "response_text"]


def response_text(completion: str) -> str | None:
    """The answer after the reasoning (None when the reasoning never closed)."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1].strip()
    if "<think>" in completion:
        return None
    return completion.strip()


def _in_range(n: int, c: Mapping) -> bool:
    lo, hi = c.get("min"), c.get("max")
    if lo is None and hi is None:
        raise ValueError("needs 'min' and/or 'max'")
    return (lo is None or n >= int(lo)) and (hi is None or n <= int(hi))


def _count(text: str, word: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE))


def _paragraphs(text: str) -> int:
    return len([p for p in re.split(r"\n\s*\n", text) if p.strip()])


def _json_only(text: str) -> bool:
    m = re.fullmatch(r"```(?:json)?\s*\n(.*?)\n?```", text, flags=re.DOTALL)
    try:
        json.loads(m.group(1) if m else text)
        return True
    except ValueError:
        return False


def _need(c: Mapping, key: str):
    if key not in c:
        raise ValueError(f"needs '{key}'")
    return c[key]


CONSTRAINTS: dict[str, Callable[[str, Mapping], bool]] = {
    "words": lambda t, c: _in_range(len(re.findall(r"\w+", t)), c),
    "chars": lambda t, c: _in_range(len(t), c),
    "sentences": lambda t, c: _in_range(len(re.findall(r"[^.!?]*\w[^.!?]*[.!?]+", t)), c),
    "keywords": lambda t, c: all(_count(t, k) > 0 for k in _need(c, "include")),
    "forbidden": lambda t, c: all(_count(t, k) == 0 for k in _need(c, "exclude")),
    "keyword_count": lambda t, c: _in_range(_count(t, _need(c, "keyword")), c),
    "paragraphs": lambda t, c: _paragraphs(t) == int(_need(c, "count")),
    "bullets": lambda t, c: len(re.findall(r"^\s*[*-] \S", t, flags=re.MULTILINE)) == int(_need(c, "count")),
    "sections": lambda t, c: all(re.search(rf"^#{{1,6}}\s+{re.escape(h)}\s*$", t, flags=re.MULTILINE | re.IGNORECASE)
                                 for h in _need(c, "headers")),
    "case": lambda t, c: {"lower": not re.search(r"[A-Z]", t), "upper": not re.search(r"[a-z]", t)}[_need(c, "mode")],
    "starts_with": lambda t, c: t.lower().startswith(str(_need(c, "phrase")).lower()),
    "ends_with": lambda t, c: t.lower().endswith(str(_need(c, "phrase")).lower()),
    "json_only": lambda t, c: _json_only(t),
}


def check_constraint(text: str, constraint: Mapping[str, Any]) -> bool:
    """Whether ``text`` satisfies one constraint (ValueError for an unknown type or bad parameters)."""
    kind = constraint.get("type")
    if kind not in CONSTRAINTS:
        raise ValueError(f"unknown constraint type {kind!r}; known: {sorted(CONSTRAINTS)}")
    try:
        return bool(CONSTRAINTS[kind](text, constraint))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"constraint {kind!r}: {e}") from None


@register_environment("instructions")
class InstructionsEnv(Environment):
    """Reward = fraction of ``metadata.constraints`` satisfied; one component per constraint."""

    def verify(self, sample: Mapping[str, Any], completion: str) -> Verdict:
        where = sample.get("where", "instructions sample")
        constraints = (sample.get("metadata") or {}).get("constraints")
        if not constraints or not isinstance(constraints, list):
            raise ValueError(f"{where}: metadata.constraints must be a non-empty list")
        text = response_text(completion)
        comps, failed = {}, []
        for i, c in enumerate(constraints):
            try:
                ok = text is not None and check_constraint(text, c)
            except ValueError as e:
                raise ValueError(f"{where}: metadata.constraints[{i}]: {e}") from None
            comps[f"{i}:{c['type']}"] = float(ok)
            if not ok:
                failed.append(c["type"])
        reward = sum(comps.values()) / len(comps)
        return Verdict(reward, comps, {"failed": failed, "answered": text is not None})
