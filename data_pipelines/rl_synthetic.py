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
improve held-out reward. With ``ramble`` (``--sft-ramble``) that fraction of the answers is wrapped in filler
(:func:`ramble`: "Let me think step by step. … The answer is X. I hope this helps.") — a style a judge that
prefers concise answers can train away (the smoke RLHF stage).

**One prompt set per environment** (``--envs``, :data:`ENV_SETS`; each row also carries
``metadata.example``, a completion its environment scores 1 — the tests check every generated row with it):

- ``math``: the kinds above;
- ``code``: small stdin/stdout programs (sum, maximum, reverse, vowels, Fibonacci, digit sum) with 3 test
  cases each and the reference program as ``answer``;
- ``instructions``: a short text on a topic under 2-4 verifiable constraints (keywords, forbidden word,
  paragraphs, lowercase, start/end phrase, word range);
- ``structured``: a JSON object under a JSON Schema (required fields, types, bounds, no extra keys);
- ``tools``: calculator + key-value tasks (compute and store; read, compute, store), answer and final state.

    python -m tandem.data_pipelines.rl_synthetic --out mix.jsonl --envs math,code,instructions,structured,tools \
        --prompts 200        # 200 prompts of each environment, shuffled together
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

__all__ = ["KINDS", "ENV_SETS", "problem", "prompts", "warmup_conversations", "write_prompts", "write_warmup",
           "code_prompts", "instruction_prompts", "structured_prompts", "tool_prompts", "env_prompts"]

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


#: filler a rambling answer opens with (two of these, in random order) and closes with :data:`RAMBLE_END`
RAMBLE_OPENINGS = ("Let me think step by step.", "What an interesting question.", "Let me restate it and check twice.")
RAMBLE_END = "I hope this helps."


def ramble(rng: random.Random, text: str) -> str:
    """``text`` wrapped in filler: two :data:`RAMBLE_OPENINGS` before it, :data:`RAMBLE_END` after it."""
    return " ".join([*rng.sample(RAMBLE_OPENINGS, 2), text, RAMBLE_END])


def is_rambling(text: str) -> bool:
    """Whether ``text`` carries the filler of :func:`ramble` (any opening or the closing line)."""
    return RAMBLE_END in text or any(o in text for o in RAMBLE_OPENINGS)


def warmup_conversations(n: int, seed: int = 0, accuracy: float = 0.5, kinds=("copy", "max"),
                         ramble_frac: float = 0.0) -> list[dict]:
    if not (0.0 <= accuracy <= 1.0 and 0.0 <= ramble_frac <= 1.0):
        raise ValueError(f"accuracy and ramble must be in [0, 1], got {accuracy} and {ramble_frac}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, a, wrong = problem(rng, kinds[i % len(kinds)])
        x = a if rng.random() < accuracy else wrong
        text = f"The answer is {x}."
        if ramble_frac and rng.random() < ramble_frac:
            text = ramble(rng, text)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": text}],
                    "enable_thinking": False})
    return out


def _write(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prompts(path, n: int, seed: int = 0, kinds=("copy", "max")) -> Path:
    return _write(path, prompts(n, seed, kinds))


def write_warmup(path, n: int, seed: int = 0, accuracy: float = 0.5, kinds=("copy", "max"),
                 ramble_frac: float = 0.0) -> Path:
    return _write(path, warmup_conversations(n, seed, accuracy, kinds, ramble_frac))


# --- one prompt set per environment ------------------------------------------------------------------

_CODE_TASKS = {
    # name: (statement, input maker, reference program)
    "sum": ("Read two integers from one line of standard input and print their sum.",
            lambda r: f"{r.randint(-99, 99)} {r.randint(-99, 99)}", "a, b = map(int, input().split())\nprint(a + b)"),
    "max": ("Read integers separated by spaces from standard input and print the largest.",
            lambda r: " ".join(str(r.randint(-50, 50)) for _ in range(r.randint(1, 6))), "print(max(map(int, input().split())))"),
    "reverse": ("Read one word from standard input and print it reversed.",
                lambda r: "".join(r.choice("abcdefghij") for _ in range(r.randint(1, 8))), "print(input().strip()[::-1])"),
    "vowels": ("Read one line of lowercase text and print how many vowels (a, e, i, o, u) it has.",
               lambda r: " ".join(r.choice(["tea", "sky", "audio", "rhythm", "queue", "cat"]) for _ in range(3)),
               "print(sum(c in 'aeiou' for c in input()))"),
    "fib": ("Read n (0 <= n <= 30) from standard input and print the n-th Fibonacci number (F0 = 0, F1 = 1).",
            lambda r: str(r.randint(0, 30)), "n = int(input())\na, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nprint(a)"),
    "digits": ("Read a non-negative integer from standard input and print the sum of its digits.",
               lambda r: str(r.randint(0, 10 ** 9)), "print(sum(map(int, input().strip())))"),
}


def _run_reference(program: str, stdin: str) -> str:
    """The reference's output (trusted code written here, so plain ``exec`` with a fake stdin)."""
    import contextlib
    import io

    out, it = io.StringIO(), iter(stdin.splitlines())
    with contextlib.redirect_stdout(out):
        exec(program, {"input": lambda *a: next(it)})  # noqa: S102 — the project's own reference programs
    return out.getvalue()


def code_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names = sorted(_CODE_TASKS)
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        statement, make, ref = _CODE_TASKS[name]
        tests = []
        for _ in range(3):
            stdin = make(rng) + "\n"
            tests.append({"input": stdin, "output": _run_reference(ref, stdin)})
        rows.append({"prompt": f"{statement} Answer with the program in one ```python block.", "task": "code",
                     "answer": ref, "metadata": {"kind": name, "tests": tests,
                                                  "example": f"```python\n{ref}\n```"}})
    return rows


_TOPICS = ["rivers", "bread", "winter", "robots", "music", "gardens", "trains", "the moon"]
_EXTRA = ["water", "light", "time", "stone", "color", "sound"]


def instruction_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic, extra = rng.choice(_TOPICS), rng.choice(_EXTRA)
        paras = rng.randint(1, 3)
        start, end = rng.choice(["in short,", "dear reader,", "first of all,"]), rng.choice(["that is all.", "the end."])
        body = [f"{topic} and {extra} go together." for _ in range(paras)]
        body[0] = f"{start} {body[0]}"
        body[-1] = f"{body[-1]} {end}"
        example = "\n\n".join(body)
        words = len(example.split())
        pool = [
            ({"type": "keywords", "include": [topic.split()[-1], extra]}, f"mention '{topic.split()[-1]}' and '{extra}'"),
            ({"type": "forbidden", "exclude": ["banana"]}, "never use the word 'banana'"),
            ({"type": "paragraphs", "count": paras}, f"write exactly {paras} paragraph{'s' if paras > 1 else ''} separated by blank lines"),
            ({"type": "case", "mode": "lower"}, "use only lowercase letters"),
            ({"type": "starts_with", "phrase": start}, f"start with '{start}'"),
            ({"type": "ends_with", "phrase": end}, f"end with '{end}'"),
            ({"type": "words", "min": max(1, words - 10), "max": words + 30}, f"use between {max(1, words - 10)} and {words + 30} words"),
        ]
        chosen = rng.sample(pool, rng.randint(2, 4))
        rows.append({"prompt": f"Write about {topic}. Rules: " + "; ".join(t for _, t in chosen) + ".",
                     "task": "instructions", "answer": "",
                     "metadata": {"constraints": [c for c, _ in chosen], "example": example}})
    return rows


def structured_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    kinds = ["person", "point", "tags", "order"]
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "person":
            name, age = rng.choice(["Ada", "Alan", "Grace", "Linus"]), rng.randint(1, 99)
            schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
                      "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer", "minimum": 0}}}
            text, example = f"a person called {name} aged {age}: fields name (string) and age (integer >= 0)", {"name": name, "age": age}
        elif kind == "point":
            x, y = rng.randint(-9, 9), rng.randint(-9, 9)
            schema = {"type": "object", "required": ["x", "y"], "additionalProperties": False,
                      "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}
            text, example = f"the point ({x}, {y}): fields x and y (numbers)", {"x": x, "y": y}
        elif kind == "tags":
            k = rng.randint(2, 4)
            tags = rng.sample(["red", "green", "blue", "small", "large", "new"], k)
            schema = {"type": "object", "required": ["tags"], "additionalProperties": False,
                      "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": k, "maxItems": k,
                                              "uniqueItems": True}}}
            text, example = f"exactly {k} distinct tags from {tags}: field tags (array of strings)", {"tags": tags}
        else:
            qty, item = rng.randint(1, 9), rng.choice(["apple", "pen", "cup"])
            schema = {"type": "object", "required": ["item", "quantity", "express"], "additionalProperties": False,
                      "properties": {"item": {"enum": ["apple", "pen", "cup"]}, "quantity": {"type": "integer", "minimum": 1},
                                     "express": {"type": "boolean"}}}
            text, example = (f"an order of {qty} {item}(s), not express: fields item (apple|pen|cup), quantity (integer >= 1), "
                             f"express (boolean)"), {"item": item, "quantity": qty, "express": False}
        rows.append({"prompt": f"Reply with only a JSON object for {text}.", "task": "structured", "answer": json.dumps(example),
                     "metadata": {"kind": kind, "schema": schema, "example": json.dumps(example)}})
    return rows


def _tool_call(name: str, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def tool_prompts(n: int, seed: int = 0) -> list[dict]:
    """Tool-world tasks with a scripted example episode (``metadata.example``: the transcript as scored)."""
    rng = random.Random(seed)
    turn = "<|im_end|>\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think></think>"
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        key = rng.choice(["result", "total", "answer"])
        if i % 2 == 0:
            value = a * b
            prompt = f"Use the calculator to compute {a}*{b}, store the result under the key '{key}', then say the value."
            initial = {}
            steps = [(_tool_call("calculator", expression=f"{a}*{b}"), {"result": value}),
                     (_tool_call("kv_set", key=key, value=value), {"ok": True})]
        else:
            value = a + b
            prompt = (f"The store holds a number under 'x'. Read it, add {b} with the calculator, store the sum under "
                      f"'{key}', then say the sum.")
            initial = {"x": a}
            steps = [(_tool_call("kv_get", key="x"), {"value": a}),
                     (_tool_call("calculator", expression=f"{a}+{b}"), {"result": value}),
                     (_tool_call("kv_set", key=key, value=value), {"ok": True})]
        example = "<think></think>" + "".join(call + turn.format(json.dumps(out)) for call, out in steps) + f"The value is {value}."
        rows.append({"prompt": prompt, "task": "tools", "answer": str(value),
                     "metadata": {"initial": initial, "expect_state": {key: value}, "example": example}})
    return rows


#: environment -> generator(n, seed) of its prompt set
ENV_SETS = {
    "math": lambda n, seed: [{**r, "metadata": {**r["metadata"], "example": f"The answer is {r['answer']}."}}
                             for r in prompts(n, seed, kinds=KINDS)],
    "code": code_prompts, "instructions": instruction_prompts, "structured": structured_prompts, "tools": tool_prompts,
}


def env_prompts(n: int, seed: int = 0, envs=tuple(ENV_SETS)) -> list[dict]:
    """``n`` prompts of each environment in ``envs``, shuffled together (seeded)."""
    bad = [e for e in envs if e not in ENV_SETS]
    if bad:
        raise ValueError(f"no prompt set for {bad}; sets: {sorted(ENV_SETS)}")
    rows = [r for k, e in enumerate(envs) for r in ENV_SETS[e](n, seed * 1000 + k)]
    random.Random(seed).shuffle(rows)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="copy,max")
    ap.add_argument("--envs", help=f"comma list of {tuple(ENV_SETS)}: --prompts of each (instead of --kinds)")
    ap.add_argument("--sft-out")
    ap.add_argument("--sft-samples", type=int, default=2000)
    ap.add_argument("--sft-accuracy", type=float, default=0.5)
    ap.add_argument("--sft-ramble", type=float, default=0.0, help="share of warm-up answers wrapped in filler")
    args = ap.parse_args(argv)
    if args.envs:
        envs = tuple(e for e in args.envs.split(",") if e)
        if not envs or any(e not in ENV_SETS for e in envs):
            raise SystemExit(f"rl_synthetic: --envs must be a comma list of {tuple(ENV_SETS)}, got {args.envs!r}")
        print(_write(args.out, env_prompts(args.prompts, args.seed, envs)))
        return
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise SystemExit(f"rl_synthetic: --kinds must be a comma list of {KINDS}, got {args.kinds!r}")
    print(write_prompts(args.out, args.prompts, args.seed, kinds))
    if args.sft_out:
        print(write_warmup(args.sft_out, args.sft_samples, args.seed + 1, args.sft_accuracy, kinds, args.sft_ramble))


if __name__ == "__main__":
    main()
