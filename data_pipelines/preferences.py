"""Pairwise preference data for GenRM training: the row schema, the judge prompt, the conversion to RL prompt
rows (with position-swap augmentation), and a synthetic, checkable preference set for the tiny CPU model.

    python -m tandem.data_pipelines.preferences --synthetic 2000 --seed 0 --out prefs.jsonl
    python -m tandem.data_pipelines.preferences --in prefs.jsonl --judge-out judge.jsonl   # RL prompts, task genrm
    python -m tandem.data_pipelines.preferences --synthetic 2000 --out prefs.jsonl --judge-out judge.jsonl \
        [--sft-out warmup.jsonl --sft-accuracy 0.5]          # + verdict-format SFT warm-up conversations

Row schema (JSONL line / Parquet row / HF dataset row; sources as in :mod:`.readers`)::

    {"messages": [{"role": ..., "content": str}, ...],   # history + the new user turn (ends with "user")
     "response_1": str, "response_2": str,               # the two candidates (reasoning is stripped)
     "score_1": int 1-5, "score_2": int 1-5,             # labelled helpfulness of each response
     "ranking": int 1-6,                                  # 1 = response 1 much better ... 6 = response 2 much better
     "id": str | int,                                     # optional; default: the row's file:line
     "metadata": {...}}                                   # optional, kept

Every invalid row is a ``BadRecordError`` starting with ``file:line`` and naming the key.

**Judge prompt** (:func:`judge_messages`): one user turn holding the judging instructions, the conversation
history, the new user turn and both responses — final answers only (``reasoning_content`` and
``<think>…</think>`` dropped everywhere), so the judge sees what the user saw. It is rendered by the
trainer through the chat template (``chat.render_prompt``) like every RL prompt.

**Conversion** (:func:`judge_rows`): each preference row becomes an RL prompt row of task ``genrm`` whose
``answer`` is ``[score_1, score_2, ranking]``; with ``swap=True`` (default) the pair is also presented in
the other order with its labels swapped (scores exchanged, ranking ``7 − ranking``), both rows sharing
``metadata.pair`` and told apart by ``metadata.swapped`` — so a judge cannot earn reward by favouring a slot.

**Synthetic preferences** (:func:`synthetic_preferences`): questions of :mod:`.rl_synthetic` (copy, max,
arith) answered in four styles — correct & concise (score 5), correct & rambling (3), wrong & concise (2),
wrong & rambling (1) — two different styles per row, in random order; ``ranking`` follows from the score
difference. The preference is checkable without a judge: the preferred response is the correct one, or, if
both are correct, the shorter (``metadata``: ``answer``, ``styles``). Some rows carry one turn of history
and responses with reasoning, to exercise the stripping. Seeded and offline.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from .readers import MISSING, check_text, iter_records
from .rl_prompts import rl_prompt_schema
from .rl_synthetic import ramble

__all__ = [
    "SCORE_RANGE", "RANKING_RANGE", "JUDGE_INSTRUCTIONS", "JUDGE_TEMPLATES", "final_answer", "judge_prompt_text", "judge_messages",
    "swap_labels", "ranking_from_scores", "preference_schema", "iter_preferences", "load_preferences",
    "judge_rows", "synthetic_preferences", "STYLES", "main", "verdict_text", "warmup_conversations",
]

SCORE_RANGE = (1, 5)
RANKING_RANGE = (1, 6)

JUDGE_INSTRUCTIONS = (
    "You are judging two candidate responses to the last user turn of the conversation below. Think about "
    "how helpful, correct and concise each one is, then give your verdict as a JSON object on the last line:\n"
    '{"score_1": <1-5>, "score_2": <1-5>, "ranking": <1-6>}\n'
    "score_i rates response i from 1 (very poor) to 5 (excellent). ranking compares them: 1 = response 1 is "
    "much better, 2 = better, 3 = slightly better, 4 = response 2 is slightly better, 5 = better, 6 = much better."
)

#: judging instructions by name. ``full`` spells the scales out (what a capable judge is trained and prompted
#: with); ``compact`` states the same format in a fraction of the tokens, for small judges whose prompt length
#: is their training cost (the smoke judge). A judge is trained and used with the same template.
JUDGE_TEMPLATES = {
    "full": JUDGE_INSTRUCTIONS,
    "compact": "Reply JSON: score_1, score_2 (1-5), ranking (1-6; 1-3 = response 1 better).",
}


def _instructions(name: str) -> str:
    if name not in JUDGE_TEMPLATES:
        raise ValueError(f"unknown judge instructions {name!r}; expected one of {sorted(JUDGE_TEMPLATES)}")
    return JUDGE_TEMPLATES[name]


# --- the judge prompt ----------------------------------------------------------------------------------

def final_answer(text: str) -> str:
    """``text`` without its reasoning: what follows the last ``</think>``; an unclosed ``<think>`` block
    leaves only what came before it (the response never reached its answer)."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    if "<think>" in text:
        return text.split("<think>", 1)[0].strip()
    return text.strip()


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return final_answer(content if isinstance(content, str) else "")


def judge_prompt_text(conversation: Sequence[Mapping[str, Any]], response_1: str, response_2: str,
                      instructions: str = "full") -> str:
    """The judge's user turn: instructions (a :data:`JUDGE_TEMPLATES` name), history, the new user turn, both
    responses (final answers only). System messages are shown as context, ``tool`` messages as tool output;
    ``reasoning_content`` is never shown."""
    text = _instructions(instructions)
    if not conversation or conversation[-1].get("role") != "user":
        raise ValueError("a GenRM conversation must end with the user turn the two responses answer")
    names = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
    history = [f"{names.get(m.get('role'), str(m.get('role')))}: {_content(m)}" for m in conversation[:-1]]
    parts = [text, ""]
    if history:
        parts += ["[Conversation history]", *history, ""]
    parts += ["[User turn]", _content(conversation[-1]), "", "[Response 1]", final_answer(response_1), "",
              "[Response 2]", final_answer(response_2)]
    return "\n".join(parts)


def judge_messages(conversation: Sequence[Mapping[str, Any]], response_1: str, response_2: str,
                   instructions: str = "full") -> list[dict]:
    """The judge's chat input (one user turn); render it with :func:`.chat.render_prompt`."""
    return [{"role": "user", "content": judge_prompt_text(conversation, response_1, response_2, instructions)}]


def swap_labels(score_1: float, score_2: float, ranking: float) -> tuple[float, float, float]:
    """The labels of the same pair shown in the other order (ranking mirrored: 1 ↔ 6, 2 ↔ 5, 3 ↔ 4)."""
    return score_2, score_1, 7 - ranking


def ranking_from_scores(score_1: int, score_2: int) -> int:
    """A 1–6 ranking from two different scores: a gap of 3+ is "much", 2 "better", 1 "slightly"."""
    d = score_1 - score_2
    if d == 0:
        raise ValueError("equal scores have no 1-6 ranking (3.5 means no preference)")
    strength = min(abs(d), 3)  # 1 slightly, 2 better, 3 much
    return 4 - strength if d > 0 else 3 + strength


# --- schema and readers --------------------------------------------------------------------------------

_rl_row = rl_prompt_schema(default_task="genrm")  # its checks of 'messages' (roles, text) are the ones used here


def _present(row: dict, key: str) -> bool:
    # Parquet / HF tables have every column in every row; a null there means "absent"
    return row.get(key, MISSING) not in (MISSING, None)


def _int_in(row: dict, key: str, lo: int, hi: int) -> str | None:
    if not _present(row, key):
        return f"missing field {key!r}"
    v = row[key]
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        return f"field {key!r} must be an integer {lo}-{hi}, got {v!r}"
    if not lo <= v <= hi:
        return f"field {key!r} must be in {lo}-{hi}, got {v!r}"
    return None


def preference_schema():
    """A :mod:`.readers` schema hook for the row schema above."""

    def check(row: dict) -> str | None:
        if not _present(row, "messages"):
            return "missing field 'messages' (the conversation, ending with the user turn both responses answer)"
        msg = _rl_row({"messages": row["messages"], "answer": ""})
        if msg:
            return msg
        if row["messages"][-1]["role"] != "user":
            return "field 'messages' must end with a user turn (the one both responses answer)"
        for key in ("response_1", "response_2"):
            try:
                if not check_text(row.get(key, MISSING), key).strip():
                    return f"field {key!r} is empty"
            except ValueError as e:
                return str(e)
        for key, (lo, hi) in (("score_1", SCORE_RANGE), ("score_2", SCORE_RANGE), ("ranking", RANKING_RANGE)):
            msg = _int_in(row, key, lo, hi)
            if msg:
                return msg
        if _present(row, "id") and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
            return f"field 'id' must be a string or integer, got {type(row['id']).__name__}"
        if _present(row, "metadata") and not isinstance(row["metadata"], dict):
            return f"field 'metadata' must be an object, got {type(row['metadata']).__name__}"
        return None

    return check


def iter_preferences(path, *, split: str | None = None, bad_rows: str = "raise", stats=None):
    """Validated preference rows (dicts, with ``where``: ``file:line``) in file order."""
    for rec in iter_records(path, schema=preference_schema(), split=split, bad_rows=bad_rows, stats=stats):
        row = rec.data
        yield {"messages": [{k: m[k] for k in ("role", "content")} for m in row["messages"]],
               "response_1": row["response_1"], "response_2": row["response_2"],
               "score_1": int(row["score_1"]), "score_2": int(row["score_2"]), "ranking": int(row["ranking"]),
               "id": row["id"] if _present(row, "id") else rec.where,
               "metadata": dict(row["metadata"]) if _present(row, "metadata") else {}, "where": rec.where}


def load_preferences(path, **kwargs) -> list[dict]:
    out = list(iter_preferences(path, **kwargs))
    if not out:
        raise ValueError(f"{path}: no preference rows")
    return out


def judge_rows(prefs: Sequence[Mapping[str, Any]], swap: bool = True, task: str = "genrm",
               instructions: str = "full") -> list[dict]:
    """RL prompt rows (:mod:`.rl_prompts` schema) of ``prefs``: each pair as shown, then (``swap``) mirrored."""
    _instructions(instructions)
    out = []
    for p in prefs:
        label = (p["score_1"], p["score_2"], p["ranking"])
        views = [(False, p["response_1"], p["response_2"], label)]
        if swap:
            views.append((True, p["response_2"], p["response_1"], swap_labels(*label)))
        for swapped, r1, r2, (s1, s2, rank) in views:
            out.append({"messages": judge_messages(p["messages"], r1, r2, instructions), "task": task, "answer": [s1, s2, rank],
                        "metadata": {"pair": str(p.get("id", p.get("where", ""))), "swapped": swapped}})
    return out


# --- synthetic, checkable preferences ------------------------------------------------------------------

#: style → (correct, concise, score)
STYLES = {"correct_concise": (True, True, 5), "correct_rambling": (True, False, 3),
          "wrong_concise": (False, True, 2), "wrong_rambling": (False, False, 1)}



def _response(rng: random.Random, value: str, concise: bool, reasoning: bool) -> str:
    text = f"The answer is {value}."
    if not concise:
        text = ramble(rng, text)  # the filler rl_synthetic's warm-up uses: short, so judge prompts stay cheap
    if reasoning:
        text = f"<think>I should check {value} again.</think>" + text
    return text


def synthetic_preferences(n: int, seed: int = 0, kinds=("max", "copy"), history_frac: float = 0.25,
                          reasoning_frac: float = 0.25, styles: Sequence[str] = tuple(STYLES),
                          same_style_frac: float = 0.0) -> list[dict]:
    """``n`` preference rows of the row schema (see the module doc), each pairing two different ``styles``
    (:data:`STYLES` names; e.g. only the two correct ones for a judge that should learn concision); seeded,
    offline. ``same_style_frac``: the share of rows whose two responses have the *same* style (equal scores,
    ranking 3 or 4 at random: "slightly", the nearest the 1–6 scale has to a tie), so the judge's scores are
    absolute — two good answers both score high — and a policy's mean judged score can rise, not only the
    share of comparisons it wins."""
    if not 0.0 <= same_style_frac <= 1.0:
        raise ValueError(f"same_style_frac must be in [0, 1], got {same_style_frac}")
    from .rl_synthetic import problem

    names = list(dict.fromkeys(styles))
    unknown = [s for s in names if s not in STYLES]
    if unknown or len(names) < 2:
        raise ValueError(f"styles must name at least two of {list(STYLES)}, got {list(styles)}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        q, answer, wrong = problem(rng, kind)
        same = same_style_frac > 0 and rng.random() < same_style_frac
        a, b = (rng.choice(names),) * 2 if same else rng.sample(names, 2)
        responses, scores = [], []
        for style in (a, b):
            correct, concise, score = STYLES[style]
            responses.append(_response(rng, answer if correct else wrong, concise, rng.random() < reasoning_frac))
            scores.append(score)
        messages = [{"role": "user", "content": q}]
        if rng.random() < history_frac:
            hq, ha, _ = problem(rng, kind)
            messages = [{"role": "user", "content": hq},
                        {"role": "assistant", "content": f"The answer is {ha}.", "reasoning_content": "checked"},
                        *messages]
        rows.append({"messages": messages, "response_1": responses[0], "response_2": responses[1],
                     "score_1": scores[0], "score_2": scores[1],
                     "ranking": rng.choice((3, 4)) if same else ranking_from_scores(*scores),
                     "id": f"syn-{seed}-{i}", "metadata": {"kind": kind, "answer": answer, "styles": [a, b]}})
    return rows


def verdict_text(score_1: int, score_2: int, ranking: int) -> str:
    """The judge's JSON verdict as the format asks for it."""
    return json.dumps({"score_1": int(score_1), "score_2": int(score_2), "ranking": int(ranking)})


def warmup_conversations(prefs: Sequence[Mapping[str, Any]], accuracy: float = 0.5, seed: int = 0,
                         swap: bool = True, instructions: str = "full") -> list[dict]:
    """SFT conversations (the :mod:`.sft` schema, reasoning OFF) that teach a small judge the verdict format:
    each judge prompt of :func:`judge_rows` answered with its labels in a fraction ``accuracy`` of the rows
    and with the mirrored verdict (the other response preferred) otherwise — the model learns the format but
    not which response is better, the room GenRM training has to improve agreement."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    rng = random.Random(seed)
    out = []
    for row in judge_rows(prefs, swap=swap, instructions=instructions):
        s1, s2, rank = row["answer"]
        verdict = (s1, s2, rank) if rng.random() < accuracy else swap_labels(s1, s2, rank)
        out.append({"messages": row["messages"] + [{"role": "assistant", "content": verdict_text(*verdict)}],
                    "enable_thinking": False})
    return out


def _write(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # never a half-written file under the final name
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic preference rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="max,copy", help="question kinds of the synthetic rows (rl_synthetic.KINDS)")
    ap.add_argument("--out", help="where to write the synthetic preference rows (JSONL)")
    ap.add_argument("--in", dest="inputs", action="append", default=[],
                    help="preference rows to convert (JSONL / Parquet / HF dataset; repeatable)")
    ap.add_argument("--judge-out", help="write the GenRM RL prompt rows (task genrm) here")
    ap.add_argument("--styles", default=",".join(STYLES),
                    help="response styles the synthetic pairs draw from (two different per pair)")
    ap.add_argument("--same-style", type=float, default=0.0, metavar="FRAC",
                    help="share of synthetic pairs whose two responses share a style (equal scores)")
    ap.add_argument("--instructions", default="full", choices=sorted(JUDGE_TEMPLATES),
                    help="the judging instructions in the judge prompts (a judge is used with the ones it was trained on)")
    ap.add_argument("--no-swap", action="store_true", help="do not add the position-swapped copy of each pair")
    ap.add_argument("--sft-out", help="also write verdict-format SFT warm-up conversations of the rows here")
    ap.add_argument("--sft-accuracy", type=float, default=0.5, help="share of warm-up verdicts that match the labels")
    args = ap.parse_args(argv)
    if (args.synthetic is None) == (not args.inputs):
        raise SystemExit("preferences: give exactly one of --synthetic N and --in PATH")
    if args.synthetic is not None:
        if args.synthetic < 1 or not args.out:
            raise SystemExit("preferences: --synthetic needs N >= 1 and --out")
        kinds = tuple(k for k in args.kinds.split(",") if k)
        if not 0.0 <= args.same_style <= 1.0:
            raise SystemExit(f"preferences: --same-style must be in [0, 1], got {args.same_style}")
        try:
            prefs = synthetic_preferences(args.synthetic, args.seed, kinds,
                                          styles=tuple(s for s in args.styles.split(",") if s),
                                          same_style_frac=args.same_style)
        except ValueError as e:
            raise SystemExit(f"preferences: --styles: {e}") from None
        print(_write(args.out, prefs))
    else:
        if not args.judge_out and not args.sft_out:
            raise SystemExit("preferences: --in needs --judge-out and/or --sft-out")
        try:
            prefs = load_preferences(args.inputs)
        except ValueError as e:
            raise SystemExit(f"preferences: {e}") from None
    if args.judge_out:
        print(_write(args.judge_out, judge_rows(prefs, swap=not args.no_swap, instructions=args.instructions)))
    if args.sft_out:
        if not 0.0 <= args.sft_accuracy <= 1.0:
            raise SystemExit(f"preferences: --sft-accuracy must be in [0, 1], got {args.sft_accuracy}")
        print(_write(args.sft_out, warmup_conversations(prefs, args.sft_accuracy, args.seed + 1, swap=not args.no_swap,
                                                       instructions=args.instructions)))


if __name__ == "__main__":
    main()
