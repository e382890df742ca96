"""Synthetic reasoning SFT data for the smoke recipe: small arithmetic with step-by-step reasoning.

    python -m tandem.data_pipelines.sft_synthetic --out /tmp/sft.jsonl --samples 2000 --seed 0

Half the conversations have reasoning ON (``enable_thinking: true``, a ``reasoning_content`` that works the
sum digit by digit), half OFF (``enable_thinking: false``, no reasoning); about a quarter are two-turn. The
vocabulary is digits and a few words, so the tiny model can learn the format and the answers. The rows
follow the SFT schema (``data_pipelines/sft.py``). ``eval_prompts`` gives held-out prompts (messages,
mode, expected answer) for a generation check; ``answer_of`` pulls the final answer out of a completion.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEMS = ["", "", "You are a math helper.", "Answer with a number."]


def _digits(x: int) -> list[int]:
    return [int(c) for c in reversed(str(x))]


def problem(rng: random.Random) -> tuple[str, str, str]:
    """(question, reasoning, answer) for a random two-number sum, difference or small product."""
    kind = rng.choice(["add", "add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        steps, carry = [], 0
        da, db = _digits(a), _digits(b)
        for place in range(max(len(da), len(db))):
            x = da[place] if place < len(da) else 0
            y = db[place] if place < len(db) else 0
            s = x + y + carry
            name = "ones" if place == 0 else "tens"
            plus_carry = f" + {carry}" if carry else ""
            steps.append(f"{name}: {x} + {y}{plus_carry} = {s}" + (", carry 1" if s >= 10 else ""))
            carry = s // 10
        if carry:
            steps.append("hundreds: 1")
        return f"What is {a} + {b}?", "\n".join(steps + [f"So {a} + {b} = {a + b}."]), str(a + b)
    if kind == "sub":
        a, b = sorted((rng.randint(1, 99), rng.randint(1, 99)), reverse=True)
        reasoning = (f"{a} - {b}: take {b // 10 * 10} from {a} to get {a - b // 10 * 10}, "
                     f"then take {b % 10} to get {a - b}.\nSo {a} - {b} = {a - b}.")
        return f"What is {a} - {b}?", reasoning, str(a - b)
    # Products through a multiple of ten: a fixed number of short steps (a repeated-addition chain would
    # ask a tiny model to count its own repetitions, and greedy decoding then loops).
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    if b == 10:
        step = f"{a} * 10 = {10 * a}"
    elif b < 10:
        step = f"{a} * 10 = {10 * a}, minus {a} * {10 - b} = {a * (10 - b)}, gives {a * b}"
    else:
        step = f"{a} * 10 = {10 * a}, plus {a} * {b - 10} = {a * (b - 10)}, gives {a * b}"
    return f"What is {a} * {b}?", f"{a} * {b}: {step}.\nSo {a} * {b} = {a * b}.", str(a * b)


def conversation(rng: random.Random, thinking: bool, turns: int = 1) -> dict:
    system = rng.choice(SYSTEMS)
    messages = [{"role": "system", "content": system}] if system else []
    for _ in range(turns):
        q, reasoning, answer = problem(rng)
        messages.append({"role": "user", "content": q})
        turn = {"role": "assistant", "content": f"The answer is {answer}."}
        if thinking:
            turn["reasoning_content"] = reasoning
        messages.append(turn)
    return {"messages": messages, "enable_thinking": thinking}


def generate(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows: even rows reasoning ON, odd rows OFF; about one in four has two turns."""
    rng = random.Random(seed)
    return [conversation(rng, thinking=i % 2 == 0, turns=2 if rng.random() < 0.25 else 1) for i in range(n)]


def write(path: str | Path, n: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in generate(n, seed):
            f.write(json.dumps(row) + "\n")
    return path


def eval_prompts(n: int = 8, seed: int = 10_000) -> list[dict]:
    """Prompts for a smoke generation check: ``{"messages", "enable_thinking", "answer"}``, half per mode.
    Render with ``chat.render_prompt(p["messages"], tok, enable_thinking=p["enable_thinking"])``. The default
    seed differs from the training data's, but with a tiny problem space some prompts may also occur there."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, _, answer = problem(rng)
        out.append({"messages": [{"role": "user", "content": q}], "enable_thinking": i % 2 == 0, "answer": answer})
    return out


def answer_of(completion: str) -> str | None:
    """The number in "The answer is N." after the reasoning (``</think>``) of a decoded completion."""
    text = completion.split("</think>")[-1].split("<|im_end|>")[0]
    marker = "The answer is "
    if marker not in text:
        return None
    tail = text.split(marker, 1)[1]
    num = ""
    for c in tail:
        if not (c.isdigit() or (c == "-" and not num)):
            break
        num += c
    return num or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"wrote {args.samples} conversations to {write(args.out, args.samples, args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
