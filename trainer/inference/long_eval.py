"""Long-context evaluation: synthetic retrieval / multi-hop / aggregation accuracy by context length and depth.

    python -m tandem.trainer.inference.long_eval runs/smoke/cpt --lengths 128,256,512,1024 --per-cell 4
    python -m tandem.trainer.inference.long_eval runs/smoke/cpt --check --task needle --min-gain 0.2

The examples are :mod:`tandem.data_pipelines.long_context`'s generators (``needle``, ``kv_retrieval``,
``multi_hop``, ``aggregation``), seeded, so the same settings score the same prompts for every checkpoint:
``per_cell`` examples for every (length, depth) cell, lengths past the trained one included (extrapolation).
Each prompt ends in ``Answer:``; the model continues greedily for ``max_new_tokens`` tokens (or up to EOD)
through :class:`~tandem.trainer.inference.engine.GenerationEngine` with **chunked prefill**, so a prompt of
any length is prefilled ``prefill_chunk`` tokens at a time into the hybrid cache and never materialises
full-length activations; the first integer of the continuation must equal the answer.

The ``cpt`` stage runs this at its end on the final checkpoint and on the ``model.init_from`` weights it
started from, and writes both to ``<run.dir>/long_eval.json``; ``--check`` reads that file and exits 1 when
the accuracy of ``--task`` at the trained length did not rise by ``--min-gain`` (the ``make smoke`` gate).
Exit status 2: bad input (a missing checkpoint or file, a bad option), one line naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tandem.data_pipelines.long_context import GENERATORS, evaluate_retrieval, generate_examples

from .engine import DEFAULT_PREFILL_CHUNK, GenerationEngine, SamplingParams

__all__ = ["LongEvalSettings", "evaluate_model", "evaluate_checkpoint", "summary_lines", "check_gain", "main"]

log = logging.getLogger(__name__)

#: the file the cpt stage writes in its run directory
RESULT_FILE = "long_eval.json"


@dataclass
class LongEvalSettings:
    tasks: Sequence[str] = ("needle", "kv_retrieval", "multi_hop", "aggregation")
    lengths: Sequence[int] = (1024, 4096)
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)
    per_cell: int = 4
    seed: int = 1234
    max_new_tokens: int = 12
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    batch: int = 8  # prompts generated together
    options: dict = field(default_factory=dict)  # per task, generator keyword arguments, e.g. {"needle": {"value_digits": 1}}

    def validate(self, prefix: str = "") -> None:
        """Raises ValueError naming the field (``prefix`` + name) for a value that cannot work."""
        def bad(name, why, value):
            raise ValueError(f"{prefix}{name} {why}, got {value!r}")

        unknown = [t for t in self.tasks if t not in GENERATORS]
        if unknown or not self.tasks:
            bad("tasks", f"must be a non-empty list of {sorted(GENERATORS)}", list(self.tasks))
        if not self.lengths or any(int(n) < 16 for n in self.lengths):
            bad("lengths", "must be a non-empty list of token counts >= 16", list(self.lengths))
        if not self.depths or any(not 0 <= float(d) <= 1 for d in self.depths):
            bad("depths", "must be a non-empty list of fractions in [0, 1]", list(self.depths))
        for name in ("per_cell", "max_new_tokens", "batch"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1", getattr(self, name))
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            bad("prefill_chunk", "must be >= 1 or null", self.prefill_chunk)
        if set(self.options) - set(self.tasks):
            bad("options", f"names tasks that are not evaluated ({list(self.tasks)})", dict(self.options))


def evaluate_model(model: torch.nn.Module, tokenizer, settings: LongEvalSettings) -> dict:
    """Accuracy per task, overall, by length, by depth and per (length, depth) cell, with the number of
    examples behind each figure. Deterministic: the examples depend on ``settings.seed`` only, decoding is
    greedy. Runs on the model's device, one process."""
    settings.validate()
    engine = GenerationEngine(model, max_batch=settings.batch, prefill_chunk=settings.prefill_chunk)
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, greedy=True, stop_token_ids=(tokenizer.eod,))
    out: dict = {"settings": asdict(settings) | {"tasks": list(settings.tasks), "lengths": list(settings.lengths),
                                                 "depths": list(settings.depths),
                                                 "options": {k: dict(v) for k, v in settings.options.items()}},
           "tasks": {}}
    t0 = time.perf_counter()
    for t, kind in enumerate(settings.tasks):
        # one seed per task (from the settings' seed), so adding a task does not change the others' examples
        examples = generate_examples(kind, lengths=settings.lengths, depths=settings.depths,
                                     per_cell=settings.per_cell, seed=settings.seed + 7919 * t, tokenizer=tokenizer,
                                     **dict(settings.options.get(kind, {})))
        prompts = [ex.prompt for ex in examples]
        results = engine.generate([tokenizer.encode(p) for p in prompts], params)
        texts = {p: tokenizer.decode([x for x in r.tokens if x != tokenizer.eod]) for p, r in zip(prompts, results)}
        rep = evaluate_retrieval(texts.__getitem__, examples=examples)
        counts: dict = {}
        for ex in examples:
            counts[(ex.target_tokens, ex.depth)] = counts.get((ex.target_tokens, ex.depth), 0) + 1
        out["tasks"][kind] = {
            "accuracy": rep.accuracy, "n": rep.n,
            "by_length": {str(n): {"accuracy": a, "n": sum(c for (m, _), c in counts.items() if m == n)}
                          for n, a in rep.by_length.items()},
            "by_depth": {f"{d:g}": {"accuracy": a, "n": sum(c for (_, e), c in counts.items() if e == d)}
                         for d, a in rep.by_depth.items()},
            "cells": [{"length": n, "depth": d, "accuracy": a, "n": counts[(n, d)]} for (n, d), a in rep.by_cell.items()],
            "failures": rep.failures,
        }
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate_checkpoint(path: str | Path, settings: LongEvalSettings, *, device: str = "cpu") -> dict:
    """:func:`evaluate_model` of a tandem run / checkpoint or an HF directory, with its saved tokenizer."""
    from tandem.data_pipelines.tokenizer import load_tokenizer

    from .cli import checkpoint_tokenizer, load_model

    tokenizer = load_tokenizer(checkpoint_tokenizer(path))
    model = load_model(path, device=device)
    result = evaluate_model(model, tokenizer, settings)
    result["checkpoint"] = str(path)
    return result


def summary_lines(result: dict, title: str = "") -> list[str]:
    """A table per task: accuracy by length (columns) and overall, with the examples per cell."""
    lines = [title] if title else []
    for kind, r in result["tasks"].items():
        lengths = "  ".join(f"{n}: {v['accuracy']:.2f}" for n, v in r["by_length"].items())
        per = {v["n"] for v in r["by_length"].values()}
        lines.append(f"  {kind:<16} accuracy {r['accuracy']:.2f} ({r['n']} examples) | by length  {lengths}  "
                     f"({'/'.join(map(str, sorted(per)))} each)")
    return lines


def check_gain(doc: dict, task: str, length: int | None, min_gain: float) -> tuple[bool, str]:
    """(passed, message) for a ``long_eval.json`` with ``baseline`` and ``final``: the accuracy of ``task`` at
    ``length`` (default: the trained length) must rise by at least ``min_gain``."""
    for key in ("baseline", "final"):
        if key not in doc:
            raise ValueError(f"no {key!r} evaluation in the file (the cpt stage writes one when model.init_from is set)")
    length = int(length or doc.get("trained_length") or 0)
    acc = []
    for key in ("baseline", "final"):
        r = doc[key]["tasks"].get(task)
        if r is None:
            raise ValueError(f"task {task!r} was not evaluated ({key} has {sorted(doc[key]['tasks'])})")
        cell = r["by_length"].get(str(length))
        if cell is None:
            raise ValueError(f"length {length} was not evaluated for {task} ({key} has {sorted(r['by_length'], key=int)})")
        acc.append((cell["accuracy"], cell["n"]))
    (a0, n0), (a1, n1) = acc
    gain = a1 - a0
    msg = (f"{task} accuracy at {length} tokens: {a0:.3f} before CPT ({n0} examples) → {a1:.3f} after ({n1}); "
           f"gain {gain:+.3f} (required >= {min_gain:+.3f})")
    return gain >= min_gain, msg


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.trainer.inference.long_eval",
                                description="Long-context accuracy of a checkpoint by length and depth, or (--check) "
                                            "the gain a cpt run recorded in its long_eval.json.")
    p.add_argument("checkpoint", help="a tandem run dir / checkpoint, or an HF directory (--check: a cpt run dir "
                                      "or its long_eval.json)")
    p.add_argument("--tasks", default=",".join(LongEvalSettings.tasks), help="comma-separated synthetic tasks")
    p.add_argument("--lengths", default="1024,4096", help="comma-separated context lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated depths in [0, 1]")
    p.add_argument("--per-cell", type=int, default=4, help="examples per (length, depth) cell")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="prompt tokens per prefill forward (0: one)")
    p.add_argument("--batch", type=int, default=8, help="prompts generated together")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the result here as JSON (refuses an existing file)")
    p.add_argument("--check", action="store_true", help="read the run's long_eval.json and gate on the gain")
    p.add_argument("--task", default="needle", help="--check: the task to gate on")
    p.add_argument("--length", type=int, default=None, help="--check: the length to gate on (default: the trained one)")
    p.add_argument("--min-gain", type=float, default=0.0, help="--check: the accuracy gain required")
    args = p.parse_args(argv)

    def error(msg: str) -> int:
        print(f"long_eval: error: {msg}", file=sys.stderr)
        return 2

    if args.check:
        path = Path(args.checkpoint)
        path = path / RESULT_FILE if path.is_dir() else path
        try:
            doc = json.loads(path.read_text())
            ok, msg = check_gain(doc, args.task, args.length, args.min_gain)
        except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
            return error(f"{path}: {e}")
        for key, title in (("baseline", "before CPT (model.init_from)"), ("final", "after CPT")):
            print("\n".join(summary_lines(doc[key], f"long-context eval {title}:")))
        print(("PASS: " if ok else "FAIL: ") + msg)
        return 0 if ok else 1

    try:
        settings = LongEvalSettings(tasks=[t for t in args.tasks.split(",") if t], lengths=_ints(args.lengths),
                                    depths=_floats(args.depths), per_cell=args.per_cell, seed=args.seed,
                                    max_new_tokens=args.max_new_tokens, prefill_chunk=args.prefill_chunk or None,
                                    batch=args.batch)
        settings.validate("--")
    except ValueError as e:
        return error(str(e))
    if args.out and Path(args.out).exists():
        return error(f"--out {args.out} exists; choose another path (results already written are never replaced)")
    from tandem.model.checkpoint_io import CheckpointError

    try:
        result = evaluate_checkpoint(args.checkpoint, settings, device=args.device)
    except (CheckpointError, OSError) as e:
        return error(str(e))
    print("\n".join(summary_lines(result, f"long-context eval of {args.checkpoint} ({result['seconds']:.1f} s):")))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
