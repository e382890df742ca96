"""Reasoning-mode check of a chat checkpoint: does it follow the template in both modes?

    python -m tandem.trainer.inference.chat_eval runs/smoke/sft --prompts 40 --out runs/smoke/sft/chat_eval.json

For each prompt (the arithmetic problems of :mod:`tandem.data_pipelines.sft_synthetic`, half with reasoning ON and
half OFF) the checkpoint generates a reply from the template's generation prompt, and the reply is
classified:

- ON (prompt ends in ``<think>\\n``): well-formed when the reply has non-empty reasoning, exactly one
  ``</think>`` and no ``<think>``, then a non-empty answer, and ends with ``<|im_end|>``.
- OFF (prompt ends in ``<think></think>``): well-formed when the reply has no ``<think>``/``</think>`` at
  all, a non-empty answer, and ends with ``<|im_end|>``.

It prints one line per mode (well-formed rate, answer accuracy) and writes the replies and rates as JSON.
With ``--min-well-formed R`` the exit status is 1 when either mode's rate is below ``R``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tandem.data_pipelines.chat import render_prompt
from tandem.data_pipelines.sft_synthetic import answer_of, eval_prompts
from tandem.data_pipelines.tokenizer import load_tokenizer

from .cli import chat_stop_tokens, checkpoint_tokenizer, load_model
from .engine import GenerationEngine, SamplingParams, ThinkTokens


def classify(tokens: list[int], thinking: bool, think: ThinkTokens, im_end: int, decode) -> dict:
    """Template conformance of one generated reply (``tokens`` as returned, stop token included)."""
    ended = bool(tokens) and tokens[-1] == im_end
    body = tokens[:-1] if ended else tokens
    opens, closes = body.count(think.think_start), body.count(think.think_end)
    if thinking:
        cut = body.index(think.think_end) if closes else len(body)
        reasoning, answer = decode(body[:cut]).strip(), decode(body[cut + 1:]).strip()
        ok = ended and opens == 0 and closes == 1 and bool(reasoning) and bool(answer)
    else:
        reasoning, answer = "", decode(body).strip()
        ok = ended and opens == 0 and closes == 0 and bool(answer)
    return {"well_formed": ok, "reasoning": reasoning, "answer_text": answer, "ended": ended}


def evaluate(checkpoint: str | Path, *, prompts: int = 40, seed: int = 10_000, tokenizer: str | None = None,
             max_new_tokens: int = 160, temperature: float = 0.0, max_batch: int = 8, device: str = "cpu") -> dict:
    """Generate for ``prompts`` eval prompts (greedy when ``temperature`` is 0) and score the replies."""
    tok = load_tokenizer(tokenizer or checkpoint_tokenizer(checkpoint))  # default: the one saved with the weights
    think = ThinkTokens.from_tokenizer(tok)
    im_end = tok.token_to_id("<|im_end|>")
    model = load_model(checkpoint, device=device, dtype=torch.float32)
    cases = eval_prompts(prompts, seed=seed)
    ids = [render_prompt(c["messages"], tok, enable_thinking=c["enable_thinking"]) for c in cases]
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=temperature == 0.0, temperature=temperature or 1.0,
                            seed=seed, stop_token_ids=chat_stop_tokens(tok))
    results = GenerationEngine(model, max_batch=max_batch).generate(ids, params, think_ids=think)
    replies, summary = [], {}
    for case, res in zip(cases, results):
        verdict = classify(list(res.tokens), case["enable_thinking"], think, im_end, tok.decode)
        verdict.update(mode="on" if case["enable_thinking"] else "off", question=case["messages"][-1]["content"],
                       expected=case["answer"], correct=answer_of(tok.decode(res.tokens)) == case["answer"],
                       finish_reason=res.finish_reason, text=tok.decode(res.tokens))
        replies.append(verdict)
    for mode in ("on", "off"):
        mine = [r for r in replies if r["mode"] == mode]
        summary[mode] = {
            "prompts": len(mine),
            "well_formed": sum(r["well_formed"] for r in mine) / max(len(mine), 1),
            "accuracy": sum(r["correct"] for r in mine) / max(len(mine), 1),
        }
    return {"checkpoint": str(checkpoint), "summary": summary, "replies": replies}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.trainer.inference.chat_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a tandem run (its latest checkpoint) or an HF-layout directory")
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--out", default=None, help="write the replies and rates here (JSON)")
    p.add_argument("--min-well-formed", type=float, default=None)
    args = p.parse_args(argv)
    report = evaluate(args.checkpoint, prompts=args.prompts, seed=args.seed, tokenizer=args.tokenizer,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    for mode, s in report["summary"].items():
        print(f"reasoning {mode.upper():3s}: {s['well_formed']:.0%} well-formed, {s['accuracy']:.0%} correct "
              f"({s['prompts']} prompts)")
    for r in report["replies"][:2]:
        print(f"  e.g. [{r['mode']}] {r['question']!r} → {r['text']!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.min_well_formed is not None and min(s["well_formed"] for s in report["summary"].values()) < args.min_well_formed:
        print(f"chat_eval: well-formed rate below {args.min_well_formed:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
