"""Synthetic verifiable RL prompts for the tiny CPU model, and a noisy SFT warm-up set for them.

    python -m tandem.data_pipelines.rl_synthetic --out runs/grpo/prompts.jsonl --prompts 2000 --seed 0 \\
        [--sft-out runs/grpo/warmup.jsonl --sft-samples 2000 --sft-accuracy 0.5] [--kinds copy,max]

Prompt rows follow :mod:`.rl_prompts` (``prompt``, ``task: "math"``, ``answer``, ``metadata.kind``); the
``math`` environment scores them (the last number of the answer, 1/0). Kinds:

- ``copy``: "Repeat the number: 47" → ``47``;
- ``max``: "Which is larger, 3 or 8?" → ``8``;
- ``arith``: the smoke SFT problems (:mod:`.sft_synthetic`: "What is 12 + 34?" → ``46``), for GRPO on the
  smoke SFT checkpoint (``recipes/smoke_grpo.yaml``).

The warm-up conversations (SFT schema, reasoning OFF) answer "The answer is X." with the right X in a
fraction ``accuracy`` of them and a distractor otherwise (another number for ``copy``, the smaller one for
``max``), so an SFT-warm model knows the format but is right only part of the time: the room GRPO has to
improve held-out reward.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

__all__ = ["KINDS", "problem", "prompts", "warmup_conversations", "write_prompts", "write_warmup"]

KINDS = ("copy", "max", "arith")


def problem(rng: random.Random, kind: str) -> tuple[str, str, str]:
    """``(question, answer, distractor)`` of one problem of ``kind``."""
    if kind == "copy":
        x = rng.randint(0, 99)
        other = rng.choice([y for y in range(100) if y != x])
        return f"Repeat the number: {x}", str(x), str(other)
    if kind == "max":
        a, b = rng.sample(range(10), 2)
        return f"Which is larger, {a} or {b}?", str(max(a, b)), str(min(a, b))
    if kind == "arith":
        from .sft_synthetic import problem as arithmetic

        q, _, a = arithmetic(rng)
        return q, a, str(int(a) + rng.choice([-10, -1, 1, 10]))
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def prompts(n: int, seed: int = 0, kinds=("copy", "max")) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        q, a, _ = problem(rng, kind)
        out.append({"prompt": q, "task": "math", "answer": a, "metadata": {"kind": kind}})
    return out


def warmup_conversations(n: int, seed: int = 0, accuracy: float = 0.5, kinds=("copy", "max")) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, a, wrong = problem(rng, kinds[i % len(kinds)])
        x = a if rng.random() < accuracy else wrong
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {x}."}],
                    "enable_thinking": False})
    return out


def _write(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prompts(path, n: int, seed: int = 0, kinds=("copy", "max")) -> Path:
    return _write(path, prompts(n, seed, kinds))


def write_warmup(path, n: int, seed: int = 0, accuracy: float = 0.5, kinds=("copy", "max")) -> Path:
    return _write(path, warmup_conversations(n, seed, accuracy, kinds))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="copy,max")
    ap.add_argument("--sft-out")
    ap.add_argument("--sft-samples", type=int, default=2000)
    ap.add_argument("--sft-accuracy", type=float, default=0.5)
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise SystemExit(f"rl_synthetic: --kinds must be a comma list of {KINDS}, got {args.kinds!r}")
    print(write_prompts(args.out, args.prompts, args.seed, kinds))
    if args.sft_out:
        print(write_warmup(args.sft_out, args.sft_samples, args.seed + 1, args.sft_accuracy, kinds))


if __name__ == "__main__":
    main()
