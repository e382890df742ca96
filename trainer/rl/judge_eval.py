"""A GenRM judge against held-out preference labels: agreement, swap consistency, format errors, reward.

    python -m tandem.trainer.rl.judge_eval --judge runs/genrm --prefs prefs_valid.jsonl [--max-new-tokens 48]
        [--enable-thinking] [--sampled --seed 0] [--out eval.json]

Each preference pair is judged in both orders (the position swap). Reported (one JSON object):

- ``agreement``: the fraction of judgements (both orders) that prefer the response the label prefers (or, where the label scores both alike, score them alike);
- ``swap_consistency``: the fraction of pairs whose two judgements prefer the same response;
- ``format_error_frac``: judgements that do not parse (they count as disagreeing and inconsistent);
- ``reward_mean``: the mean GenRM training reward (C1 = 10, C2 = 1 unless given) of the judgements.

Greedy by default, so two runs on the same weights give the same numbers (the training metrics sample).
The judge reads the tokenizer saved with its weights (or ``--tokenizer``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

from tandem.data_pipelines.chat import render_prompt
from tandem.data_pipelines.preferences import JUDGE_TEMPLATES, judge_rows, load_preferences

from .genrm import agrees, genrm_reward, parse_judgement, swap_consistent

__all__ = ["judge_metrics", "evaluate_judge", "main"]


def judge_metrics(rows: Sequence[dict], outputs: Sequence[str], c1: float = 10.0, c2: float = 1.0) -> dict:
    """The metrics of judge ``outputs`` (completion texts) for ``rows`` (:func:`judge_rows` with ``swap=True``:
    each pair as shown, then swapped)."""
    if len(rows) != len(outputs) or len(rows) % 2:
        raise ValueError(f"need the two orders of every pair: {len(rows)} rows, {len(outputs)} outputs")
    js = [parse_judgement(o) for o in outputs]
    agree = [j.ok and agrees(j.score_1, j.score_2, j.ranking, r["answer"]) for j, r in zip(js, rows)]
    consistent = [a.ok and b.ok and swap_consistent(a.ranking, b.ranking) for a, b in zip(js[0::2], js[1::2])]
    rewards = [genrm_reward(j, r["answer"], c1, c2) for j, r in zip(js, rows)]
    n = len(rows)
    return {"pairs": n // 2, "judgements": n, "agreement": sum(agree) / n,
            "swap_consistency": sum(consistent) / (n // 2), "format_error_frac": sum(not j.ok for j in js) / n,
            "reward_mean": sum(rewards) / n}


def evaluate_judge(generate: Callable[[list[list[int]]], list[str]], prefs: Sequence[dict], tokenizer, *,
                   enable_thinking: bool = False, c1: float = 10.0, c2: float = 1.0,
                   instructions: str = "full") -> dict:
    """:func:`judge_metrics` of ``generate`` (judge prompt ids → completion texts, the think opening
    included) on ``prefs`` judged in both orders."""
    rows = judge_rows(prefs, swap=True, instructions=instructions)
    prompts = [render_prompt(r["messages"], tokenizer, enable_thinking=enable_thinking) for r in rows]
    return judge_metrics(rows, generate(prompts), c1, c2)


def main(argv=None) -> None:
    import torch

    from tandem.data_pipelines.tokenizer import load_tokenizer
    from tandem.model import HybridLM

    from ..checkpoint.manager import weights_dir
    from ..checkpoint.tokenizer_files import saved_tokenizer
    from ..inference.engine import GenerationEngine, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", required=True, help="a tandem run / checkpoint or an HF NemotronH folder")
    ap.add_argument("--prefs", required=True, action="append", help="preference rows (JSONL / Parquet / HF)")
    ap.add_argument("--tokenizer", help="default: the one saved with the judge, else tandem's own")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--enable-thinking", action="store_true")
    ap.add_argument("--instructions", default="full", choices=sorted(JUDGE_TEMPLATES),
                    help="the judging instructions the judge was trained with")
    ap.add_argument("--sampled", action="store_true", help="sample (temperature 1) instead of greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--c1", type=float, default=10.0)
    ap.add_argument("--c2", type=float, default=1.0)
    ap.add_argument("--out", help="also write the metrics (JSON) here")
    args = ap.parse_args(argv)
    try:
        prefs = load_preferences(args.prefs)
        folder = weights_dir(args.judge)
    except ValueError as e:
        raise SystemExit(f"judge_eval: {e}") from None
    tok = load_tokenizer(args.tokenizer or (str(folder) if saved_tokenizer(folder) is not None else None))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine = GenerationEngine(HybridLM.from_pretrained(folder, device=device).eval(), max_batch=args.batch)
    stop = (tok.token_to_id("<|im_end|>"),)
    head = "<think>\n" if args.enable_thinking else "<think></think>"

    def generate(prompts):
        params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=not args.sampled, seed=args.seed,
                                stop_token_ids=stop)
        return [head + tok.decode([t for t in r.tokens if t not in stop]) for r in engine.generate(prompts, params)]

    metrics = {"judge": str(folder), **evaluate_judge(generate, prefs, tok, enable_thinking=args.enable_thinking,
                                                      c1=args.c1, c2=args.c2, instructions=args.instructions)}
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
