"""The ``genrm`` environment: GRPO training of a generative pairwise judge with the verifiable reward.

    {"messages": [{"role": "user", "content": "<judge prompt: history, turn, response 1, response 2>"}],
     "task": "genrm", "answer": [4, 2, 2],                 # the labels (ŝ1, ŝ2, r̂ank) in the order shown
     "metadata": {"pair": "prefs.jsonl:7", "swapped": false}}

Rows like this are made from preference data by ``python -m tandem.data_pipelines.preferences`` (every pair
also presented swapped). ``verify`` parses the judge's completion (:func:`tandem.trainer.rl.genrm.parse_judgement`)
and scores ``R = −C1·[format error] − |s1−ŝ1| − |s2−ŝ2| − C2·|rank−r̂ank|`` (:func:`genrm_reward`).

Options (``stage.grpo.environments[].options``): ``c1`` (default 10) and ``c2`` (default 1), both ≥ 0.

Components: ``format_error`` (1/0), ``score_error`` (|s1−ŝ1| + |s2−ŝ2|), ``ranking_error`` (|rank−r̂ank|) and
``agree`` (1 when the judge prefers the response the label prefers, or scores both alike where the label does:
:func:`~tandem.trainer.rl.genrm.agrees`); ``info`` has the parsed verdict or the
format error's reason.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..genrm import RANKING_RANGE, SCORE_RANGE, agrees, genrm_reward, parse_judgement
from .base import Environment, Verdict, register_environment

__all__ = ["GenRMEnv", "check_label"]


def check_label(answer: Any, where: str = "genrm sample") -> tuple[float, float, float]:
    """The ``(ŝ1, ŝ2, r̂ank)`` of a sample's ``answer``; ValueError naming the sample otherwise."""
    if not isinstance(answer, (list, tuple)) or len(answer) != 3:
        raise ValueError(f"{where}: answer must be [score_1, score_2, ranking], got {answer!r}")
    out = []
    for name, v, (lo, hi) in zip(("score_1", "score_2", "ranking"), answer, (SCORE_RANGE, SCORE_RANGE, RANKING_RANGE)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"{where}: answer {name} must be a number in {lo}-{hi}, got {v!r}")
        out.append(float(v))
    return tuple(out)


@register_environment("genrm")
class GenRMEnv(Environment):
    """The GenRM verifiable reward (C1 = 10, C2 = 1 unless configured)."""

    components = ("agree", "format_error", "score_error", "ranking_error")  # held-out agreement: grpo/val/genrm/agree

    def __init__(self, c1: float = 10.0, c2: float = 1.0):
        for key, value in (("c1", c1), ("c2", c2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"genrm option {key} must be a number >= 0, got {value!r}")
        self.c1, self.c2 = float(c1), float(c2)

    def verify(self, sample: Mapping[str, Any], completion: str) -> Verdict:
        label = check_label(sample.get("answer"), sample.get("where", "genrm sample"))
        j = parse_judgement(completion)
        reward = genrm_reward(j, label, self.c1, self.c2)
        if not j.ok:
            return Verdict(reward, {"format_error": 1.0, "agree": 0.0}, {"error": "format", "message": j.error})
        comps = {"format_error": 0.0, "score_error": abs(j.score_1 - label[0]) + abs(j.score_2 - label[1]),
                 "ranking_error": abs(j.ranking - label[2]), "agree": float(agrees(j.score_1, j.score_2, j.ranking, label))}
        return Verdict(reward, comps, {"verdict": [j.score_1, j.score_2, j.ranking], "method": j.method})
