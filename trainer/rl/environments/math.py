"""The ``math`` environment: extract the final answer of a completion, compare it with ``answer`` using
`math-verify <https://github.com/huggingface/Math-Verify>`_ (symbolic and numeric equivalence, so
``\\frac{1}{2}`` equals ``0.5`` and ``\\sqrt{4}`` equals ``2``). Reward 1 if equivalent, else 0.

Extraction (:func:`extract_answer`), on the text after the last ``</think>`` (a completion whose
reasoning never closed has no answer: the budget cut it off):

1. the last ``\\boxed{...}`` / ``\\fbox{...}``, braces nested to any depth (``\\boxed{\\frac{1}{2}}``);
2. else the last "answer is X" / "answer: X" (``The final answer is 42.``);
3. else the last number in the text (``-3``, ``1,000``, ``2.5``, ``3/4``).

Components: ``extracted`` (1 if any answer was found) and ``format_ok`` (1 if it came from ``\\boxed``,
the format the prompts ask for). ``info``: the extracted text, how it was found, the gold answer.

math-verify bounds its own parsing/comparison time with ``signal.alarm``, which only works on a
process's main thread; off the main thread (the dispatcher's ``thread`` backend) that is switched off and
the dispatcher's per-call timeout is the bound.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Mapping

from .base import Environment, Verdict, register_environment

__all__ = ["MathEnv", "extract_answer", "extract_boxed", "answers_match"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces matched), or None (also if it never closes)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _clean_tail(s: str) -> str:
    """Drop markdown bold, math dollars and a final full stop around an "answer is" tail, in any order."""
    prev = None
    while s != prev:
        prev, s = s, s.strip().strip("*$").rstrip(".")
    return s


def extract_answer(completion: str) -> tuple[str | None, str | None]:
    """``(answer text, method)`` with method ``"boxed"``, ``"answer_is"`` or ``"last_number"``; ``(None, None)``."""
    text = completion
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return None, None
    boxed = extract_boxed(text)
    if boxed:
        return boxed, "boxed"
    lines = [m.group(1) for m in _ANSWER_IS.finditer(text)]
    if lines:
        ans = _clean_tail(lines[-1].splitlines()[0])
        if ans:
            return ans, "answer_is"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "").replace(" ", ""), "last_number"
    return None, None


def answers_match(gold: Any, predicted: str) -> bool:
    """math-verify equivalence of the gold answer and a predicted answer text (both read as LaTeX)."""
    from math_verify import parse, verify  # lazy: sympy and the ANTLR parser take ~1 s to import

    main = threading.current_thread() is threading.main_thread()
    limit = 5 if main else None  # signal.alarm only works on the main thread (see the module doc)
    # Wrapping both in \boxed{} makes math-verify read exactly this expression instead of searching it.
    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=limit)
    p = parse(f"\\boxed{{{predicted}}}", parsing_timeout=limit)
    if g and p and verify(g, p, timeout_seconds=limit):
        return True
    # unparseable answers (names, words): compare the normalised text
    norm = lambda s: re.sub(r"\s+", "", str(s)).rstrip(".").lower()  # noqa: E731
    return norm(gold) == norm(predicted) and norm(gold) != ""


@register_environment("math")
class MathEnv(Environment):
    """Reward 1 when the extracted answer is equivalent to ``sample["answer"]``, else 0."""

    def prepare(self) -> None:
        import math_verify  # noqa: F401  (sympy + the LaTeX grammar: ~1 s, not part of a call's timeout)

    def verify(self, sample: Mapping[str, Any], completion: str) -> Verdict:
        gold = sample["answer"]
        answer, method = extract_answer(completion)
        correct = answer is not None and answers_match(gold, answer)
        return Verdict(
            reward=1.0 if correct else 0.0,
            components={"extracted": float(answer is not None), "format_ok": float(method == "boxed")},
            info={"extracted": answer, "method": method, "gold": gold},
        )
