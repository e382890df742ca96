"""GenRM, a generative pairwise judge: its prompt, the parsing of its verdicts, its verifiable training reward,
and the comparison maths that turn its verdicts into per-rollout RLHF rewards (docs/RLHF.md).

    msgs = judge_messages(conversation, response_1, response_2)     # one user turn for the judge
    ids = render_prompt(msgs, tokenizer, enable_thinking=True)      # through the chat template
    j = parse_judgement(judge_completion)     # Judgement(score_1, score_2, ranking, reasoning, error, method)
    r = genrm_reward(j, (4, 2, 2), c1=10, c2=1)                    # the GRPO reward of one judge rollout

**Format** (the prompt lives with the data, :mod:`tandem.data_pipelines.preferences`, and is re-exported
here). The judge reads the conversation history, the new user turn and two candidate responses —
final answers only: reasoning (``reasoning_content``, ``<think>…</think>``) is stripped everywhere, so the
judge compares what a user would see. It answers with free reasoning, then one JSON object
``{"score_1": 1–5, "score_2": 1–5, "ranking": 1–6}`` (ranking 1 = response 1 much better … 3 = response 1
slightly better, 4 = response 2 slightly better … 6 = response 2 much better).

**Parsing** (:func:`parse_judgement`) looks at the text after the last ``</think>`` (an unclosed reasoning
block is a format error), and tries, last candidate first: fenced blocks (```json or untagged), then every
balanced ``{…}`` span. Each candidate is read as JSON, then — if that fails — after near-JSON repairs
(single quotes, unquoted keys, trailing commas, Python literals, ``=`` for ``:``). A candidate counts only
when it has the three keys as integers (or integral numbers / numeric strings) in range; the first that
does wins, so a later malformed object does not hide an earlier valid one. Anything else is a format
error, with the reason in ``Judgement.error``; :func:`with_default` turns it into the counted default
(score 3 / ranking 3.5) used by RLHF.

**Training reward** (GRPO on preference data, :mod:`tandem.trainer.rl.environments.genrm`):
``R = −C1·[format error] − |s1−ŝ1| − |s2−ŝ2| − C2·|rank−r̂ank|`` with C1 = 10, C2 = 1. A format error has no
scores to compare, so it scores ``−C1 − (4 + 4 + 5·C2)``: the formula with the largest distances, strictly
below every parseable judgement (with C1 = 10 a bare ``−C1`` would beat a parseable but wrong one).

**RLHF maths** (pure, batched over groups): :func:`comparison_pairs` (circular or all pairs of a group of G
rollouts), :func:`rollout_rewards` (tie-break ``adj = 3.5 − ranking`` when the two scores are equal, then
each rollout's reward = the mean of its comparison scores), and the optional group shaping
:func:`shortest_top_bonus` / :func:`length_penalty`.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tandem.data_pipelines.preferences import (
    RANKING_RANGE, SCORE_RANGE, final_answer, judge_messages, judge_prompt_text, swap_labels,
)

__all__ = [
    "SCORE_RANGE", "RANKING_RANGE", "DEFAULT_SCORE", "DEFAULT_RANKING", "Judgement", "ParseCounter",
    "final_answer", "judge_messages", "judge_prompt_text", "parse_judgement", "with_default", "swap_labels",
    "genrm_reward", "format_error_reward", "prefers", "swap_consistent",
    "comparison_pairs", "rollout_rewards", "shortest_top_bonus", "length_penalty", "PAIRINGS",
]

DEFAULT_SCORE = 3.0
DEFAULT_RANKING = 3.5  # the midpoint: "no preference", so the tie-break adds nothing
KEYS = ("score_1", "score_2", "ranking")


# --- parsing ---------------------------------------------------------------------------------------------

@dataclass
class Judgement:
    score_1: float | None = None
    score_2: float | None = None
    ranking: float | None = None
    reasoning: str = ""
    error: str | None = None  # None: parsed and in range
    method: str | None = None  # fence | span | fence+repair | span+repair

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ParseCounter:
    """Counts of judgements parsed / defaulted (logged as ``…/judge_format_error_frac``)."""

    total: int = 0
    errors: int = 0
    reasons: dict = field(default_factory=dict)

    def add(self, j: Judgement) -> None:
        self.total += 1
        if not j.ok:
            self.errors += 1
            key = j.error.split(":", 1)[0]
            self.reasons[key] = self.reasons.get(key, 0) + 1

    @property
    def error_frac(self) -> float:
        return self.errors / max(self.total, 1)


_FENCE = re.compile(r"```([A-Za-z0-9_-]*)[^\n]*\n(.*?)```", re.DOTALL)
_UNQUOTED_KEY = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_]*)\s*[:=]")
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _spans(text: str) -> list[tuple[int, str]]:
    """Every balanced ``{…}`` span of ``text`` (outermost ones), with its start offset."""
    out, depth, start = [], 0, -1
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                out.append((start, text[start: i + 1]))
    return out


def _repair(body: str) -> str:
    s = body.strip()
    s = _UNQUOTED_KEY.sub(lambda m: f'{m.group(1)}"{m.group(2)}":', s)
    s = re.sub(r"'([^'\n]*)'", r'"\1"', s)
    s = _TRAILING_COMMA.sub(r"\1", s)
    s = re.sub(r'("[A-Za-z_0-9]+")\s*=', r"\1:", s)
    return s


def _load(body: str) -> tuple[Any, bool]:
    """``(value, repaired)``; value None when neither JSON nor repaired near-JSON parses."""
    try:
        return json.loads(body), False
    except ValueError:
        pass
    fixed = _repair(body)
    for loader in (json.loads, ast.literal_eval):
        try:
            return loader(fixed), True
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
    return None, False


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    return None


def _check(obj: Any) -> tuple[tuple[int, int, int] | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"not an object: a JSON {type(obj).__name__}"
    missing = [k for k in KEYS if k not in obj]
    if missing:
        return None, f"missing key(s): {missing}"
    vals = []
    for k, (lo, hi) in zip(KEYS, (SCORE_RANGE, SCORE_RANGE, RANKING_RANGE)):
        v = _integer(obj[k])
        if v is None:
            return None, f"not an integer: {k}={obj[k]!r}"
        if not lo <= v <= hi:
            return None, f"out of range: {k}={v} (expected {lo}-{hi})"
        vals.append(v)
    return tuple(vals), None


def parse_judgement(text: str) -> Judgement:
    """The verdict of one judge completion (see the module doc); never raises."""
    if not isinstance(text, str):
        return Judgement(error=f"not text: {type(text).__name__}")
    if "</think>" in text:
        thought, answer = text.rsplit("</think>", 1)
        thought = thought.split("<think>", 1)[-1]
    elif "<think>" in text:
        return Judgement(reasoning=text.split("<think>", 1)[1].strip(), error="unclosed reasoning: no </think>")
    else:
        thought, answer = "", text
    fences = [(m.start(), m.group(2)) for m in _FENCE.finditer(answer) if m.group(1).lower() in ("json", "")]
    candidates = [("fence", s, b) for s, b in fences][::-1] + [("span", s, b) for s, b in _spans(answer)][::-1]
    if not candidates:
        return Judgement(reasoning=(thought + answer).strip(), error="no JSON object in the output")
    first_error = None
    for method, start, body in candidates:
        obj, repaired = _load(body)
        if obj is None:
            first_error = first_error or "unparseable: neither JSON nor repairable near-JSON"
            continue
        vals, why = _check(obj)
        if vals is None:
            first_error = first_error or why
            continue
        reasoning = (thought.strip() + "\n" + answer[:start].strip()).strip()
        return Judgement(*map(float, vals), reasoning=reasoning, method=method + ("+repair" if repaired else ""))
    return Judgement(reasoning=(thought + answer).strip(), error=first_error)


def with_default(j: Judgement) -> tuple[float, float, float]:
    """``(score_1, score_2, ranking)``, the default (3, 3, 3.5) for a format error."""
    if j.ok:
        return j.score_1, j.score_2, j.ranking
    return DEFAULT_SCORE, DEFAULT_SCORE, DEFAULT_RANKING


def prefers(ranking: float) -> int:
    """-1: response 1 preferred, +1: response 2, 0: no preference (the 3.5 default)."""
    return (ranking > 3.5) - (ranking < 3.5)


def agrees(score_1: float, score_2: float, ranking: float, label) -> bool:
    """A parsed verdict agrees with a label ``(ŝ1, ŝ2, r̂ank)``: it prefers the response the label prefers —
    or, when the label is a tie (equal scores and a "slightly" ranking, 3 or 4: the nearest the 1–6 scale
    has to one), it scores them alike too. Equal scores with a stronger ranking are a preference."""
    if label[0] == label[1] and label[2] in (3, 4):
        return score_1 == score_2
    return prefers(ranking) == prefers(label[2])


def swap_consistent(ranking: float, ranking_swapped: float) -> bool:
    """The judge prefers the same *response* whichever slot it is shown in."""
    return prefers(ranking) == -prefers(ranking_swapped) != 0


# --- the verifiable GenRM reward -----------------------------------------------------------------------

def format_error_reward(c1: float = 10.0, c2: float = 1.0) -> float:
    span_s, span_r = SCORE_RANGE[1] - SCORE_RANGE[0], RANKING_RANGE[1] - RANKING_RANGE[0]
    return -c1 - 2 * span_s - c2 * span_r


def genrm_reward(j: Judgement, label: Sequence[float], c1: float = 10.0, c2: float = 1.0) -> float:
    """``−C1·[format error] − |s1−ŝ1| − |s2−ŝ2| − C2·|rank−r̂ank|`` of judgement ``j`` against ``label`` =
    ``(ŝ1, ŝ2, r̂ank)``; a format error scores :func:`format_error_reward`."""
    if not j.ok:
        return format_error_reward(c1, c2)
    s1, s2, r = (float(x) for x in label)
    return -abs(j.score_1 - s1) - abs(j.score_2 - s2) - c2 * abs(j.ranking - r)


# --- RLHF: judge comparisons → per-rollout rewards (batched over groups) -------------------------------

PAIRINGS = ("circular", "all")


def comparison_pairs(G: int, pairing: str = "circular") -> torch.Tensor:
    """``[K, 2]`` rollout indices ``(first, second)`` compared within a group of ``G``: circular ``(i, i+1
    mod G)`` (K = G; for G = 2 both orders of the one pair) or all pairs ``i < j`` (K = G(G−1)/2)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if G < 2:
        return torch.zeros(0, 2, dtype=torch.long)
    if pairing == "circular":
        i = torch.arange(G)
        return torch.stack([i, (i + 1) % G], dim=1)
    return torch.combinations(torch.arange(G), r=2)


def rollout_rewards(score_1: torch.Tensor, score_2: torch.Tensor, ranking: torch.Tensor, pairs: torch.Tensor,
                    G: int, tie_break: bool = True) -> torch.Tensor:
    """Per-rollout rewards ``[N, G]`` from the verdicts ``[N, K]`` of ``pairs`` (``[K, 2]``) in N groups.

    On a tie (``score_1 == score_2``) the ranking decides: ``adj = 3.5 − ranking``, ``s1 += adj``,
    ``s2 −= adj``. Each rollout's reward is the mean of the scores it got in its comparisons (a rollout in
    no comparison gets 0). Several judge samples of a pair: repeat its column in ``pairs``."""
    s1, s2 = score_1.double().clone(), score_2.double().clone()
    if tie_break:
        adj = torch.where(s1 == s2, 3.5 - ranking.double(), torch.zeros_like(s1))
        s1, s2 = s1 + adj, s2 - adj
    N = s1.shape[0]
    total = torch.zeros(N, G, dtype=torch.float64)
    total.index_add_(1, pairs[:, 0], s1).index_add_(1, pairs[:, 1], s2)
    count = torch.zeros(G, dtype=torch.float64)
    count.index_add_(0, pairs.flatten(), torch.ones(pairs.numel(), dtype=torch.float64))
    return total / count.clamp(min=1)


def shortest_top_bonus(rewards: torch.Tensor, lengths: torch.Tensor, bonus: float) -> torch.Tensor:
    """Add ``bonus`` to the shortest of each group's top-reward rollouts (all of them on equal length)."""
    top = rewards == rewards.max(dim=1, keepdim=True).values
    masked = torch.where(top, lengths.double(), torch.full_like(lengths, float("inf"), dtype=torch.float64))
    shortest = top & (lengths.double() == masked.min(dim=1, keepdim=True).values)
    return rewards + bonus * shortest.to(rewards.dtype)


def length_penalty(rewards: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Zero-centred length shaping: ``r − scale·(L − mean L) / mean L`` per group (the group's mean reward is
    unchanged, so only the ordering within the group moves)."""
    L = lengths.double()
    mean = L.mean(dim=1, keepdim=True)
    return rewards - (scale * (L - mean) / mean.clamp(min=1.0)).to(rewards.dtype)
