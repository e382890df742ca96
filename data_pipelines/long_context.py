"""Long-context CPT data: a long/short sequence mixture and synthetic long-range tasks with checkers.

Mixture. CPT trains on long sequences (512k tokens in the nano3 recipe) mixed with short ones (4k) so
short-context quality holds. ``LongShortMixture`` keeps every row ``long_length`` positions: a *long* row is
one long sample; a *short* row holds ``long_length // short_length`` independent short samples, each its
own ``seq_idx`` segment(s), so the Mamba state and attention never cross from one short sample into the
next. One tensor shape for every micro-batch, and ``long_fraction`` is exactly the share of tokens (and
rows) trained at long context. Rows are interleaved by megatron's error-minimising blend, so the ratio
holds over any window; the dataset is map-style, so resuming is indexing from the consumed count.

Synthetic tasks (each a generator returning ``SyntheticExample``: context, question, verifiable answer,
and ``check(prediction)``), placed at controlled depths in filler text of a controlled token length:

- ``needle``: one "special magic number" for a key hidden at ``depth`` ∈ [0, 1] of the haystack;
- ``kv_retrieval``: many key → value facts; the asked one sits at ``depth``, the others distract;
- ``multi_hop``: a chain ``x1 = 4821``, ``x2 = x1``, ... spread across the context; the question asks for
  the last variable, so answering needs every hop; ``depth`` places the chain's first link;
- ``aggregation``: numbered documents, some reporting counts for a target item among distractors; the
  answer is their sum (``op="sum"``) or how many documents mention it (``op="count"``).

The same examples are CPT training text (``example.text``, written to JSONL by ``write_jsonl`` and fed to
``tandem-preprocess``) and evaluation (``evaluate_retrieval`` → accuracy by depth and by length).
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from tandem.data_pipelines.build_tokenizer import random_sentence

# --- the long/short mixture ----------------------------------------------------------------------------


class LongShortMixture:
    """Map-style rows of ``long_length`` tokens: long samples or packed groups of short samples.

    ``long_ds[j]`` must give ``long_length`` tokens and ``short_ds[k]`` ``short_length`` tokens (megatron
    sample dicts: ``tokens``, ``labels``, ``loss_mask``); ``long_length`` must be a multiple of
    ``short_length``. ``self[i]`` → ``tokens``, ``labels``, ``loss_mask``, ``seq_idx`` (documents *and*
    short-sample pieces separated), ``is_long`` (bool).
    """

    def __init__(self, long_ds, short_ds, *, long_fraction: float, long_length: int, short_length: int,
                 num_rows: int, eod: int, answer_marker: Sequence[int] | None = None):
        if not 0 <= long_fraction <= 1:
            raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction}")
        if short_length < 1 or long_length % short_length:
            raise ValueError(f"long_length ({long_length}) must be a positive multiple of short_length ({short_length})")
        from tandem.data_pipelines.blends import blend_schedule

        self.long_ds, self.short_ds, self.eod = long_ds, short_ds, int(eod)
        self.answer_marker = None if answer_marker is None else torch.as_tensor(list(answer_marker), dtype=torch.long)
        if self.answer_marker is not None and self.answer_marker.numel() == 0:
            raise ValueError("answer_marker must be at least one token")
        self.long_length, self.short_length = long_length, short_length
        self.pieces = long_length // short_length
        weights = [long_fraction, 1 - long_fraction]
        # 0 = long row, 1 = short row; row_index = the row's position within its kind
        self.kind, self.row_index, taken = blend_schedule([weights], [num_rows])
        self.num_long, self.num_short = int(taken[0]), int(taken[1])
        if self.num_long and (long_ds is None or len(long_ds) < self.num_long):
            raise ValueError(f"long dataset has {0 if long_ds is None else len(long_ds)} samples, the mixture needs {self.num_long}")
        if self.num_short and (short_ds is None or len(short_ds) < self.num_short * self.pieces):
            raise ValueError(f"short dataset has {0 if short_ds is None else len(short_ds)} samples, the mixture "
                             f"needs {self.num_short * self.pieces} ({self.num_short} rows x {self.pieces})")

    def __len__(self) -> int:
        return len(self.kind)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        j = int(self.row_index[i])
        if self.kind[i] == 0:
            s = self.long_ds[j]
            tokens = torch.as_tensor(s["tokens"], dtype=torch.long)
            is_eod = (tokens == self.eod).long()
            row = {"tokens": tokens, "labels": torch.as_tensor(s["labels"], dtype=torch.long),
                   "loss_mask": torch.as_tensor(s["loss_mask"], dtype=torch.float32),
                   "seq_idx": torch.cumsum(is_eod, 0) - is_eod, "is_long": True}
            if self.answer_marker is not None:
                row["loss_mask"], row["loss_weight"] = answer_loss_weights(tokens, row["loss_mask"], row["seq_idx"],
                                                                           self.answer_marker, self.eod)
            return row
        parts = [self.short_ds[j * self.pieces + k] for k in range(self.pieces)]
        tokens = torch.cat([torch.as_tensor(p["tokens"], dtype=torch.long) for p in parts])
        if tokens.numel() != self.long_length:
            raise ValueError(f"short samples have {tokens.numel() // self.pieces} tokens, expected {self.short_length}")
        # a segment starts after every EOD and at every piece start
        starts = torch.zeros_like(tokens, dtype=torch.long)
        starts[1:] = (tokens[:-1] == self.eod).long()
        starts[:: self.short_length] = 1
        row = {"tokens": tokens,
               "labels": torch.cat([torch.as_tensor(p["labels"], dtype=torch.long) for p in parts]),
               "loss_mask": torch.cat([torch.as_tensor(p["loss_mask"], dtype=torch.float32) for p in parts]),
               "seq_idx": torch.cumsum(starts, 0) - 1, "is_long": False}
        if self.answer_marker is not None:
            row["loss_weight"] = torch.ones(self.long_length, dtype=torch.float32)
        return row


def answer_loss_weights(tokens: torch.Tensor, loss_mask: torch.Tensor, seq_idx: torch.Tensor,
                        marker: torch.Tensor, eod: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion-only loss for a long row of task documents → ``(loss_mask, loss_weight)``.

    Only targets after the *last* ``marker`` (e.g. the tokens of ``"\nAnswer:"``) of their document (a
    ``seq_idx`` segment) keep their loss: each document's answer and its end, for the documents that begin
    inside the row (after an EOD; the row's first segment may continue a document whose context was in the
    previous row: its answer would teach guessing; so a task document trains only if it fits the row after
    its start: documents must be shorter than the row). Everything else — the contexts, the questions, a
    document cut off by the row before its question, the ``eod`` input that ends a document (it predicts
    the next document's first token) — gets none. The weight
    the row's masked-off tokens carried moves onto its answer tokens (each weighs ``kept before / answer
    tokens``), so the row weighs as much in the step's mean as with the whole loss and the mixture's long
    share stays the long share of the loss; a row without an answer trains on nothing. Why: the language-
    model loss of a synthetic document is nearly all its filler, and measured, the tiny smoke model learns
    the retrieval from a completion-only loss in ~100 steps and not in 450 from the whole loss
    (docs/LONG_CONTEXT.md). Vectorised: no loop over tokens or documents.
    """
    n, m = tokens.numel(), marker.numel()
    none = torch.zeros_like(loss_mask)
    hits = ((tokens.unfold(0, m, 1) == marker.to(tokens.device)).all(dim=1).nonzero().flatten()
            if n >= m else torch.zeros(0, dtype=torch.long, device=tokens.device))
    if hits.numel() == 0:
        return none, torch.ones_like(loss_mask)
    # the position predicting the first answer token is the marker's last token: hit + m - 1
    first = torch.full((int(seq_idx.max()) + 1,), -1, dtype=torch.long, device=tokens.device)
    first.scatter_reduce_(0, seq_idx[hits], hits + m - 1, reduce="amax")
    start = first[seq_idx]  # per position: where its document's answer begins, -1 = no marker in it
    # and only documents that begin inside the row (after an EOD): the row's first segment may be the tail of
    # a document whose context (the needle) was in the previous row, an answer nothing in this row supports
    answer = (start >= 0) & (torch.arange(n, device=tokens.device) >= start) & (seq_idx > 0)
    if eod is not None:
        answer &= tokens != eod
    keep = torch.where(answer, loss_mask, none)
    answers = keep.sum()
    if answers == 0:
        return keep, torch.ones_like(loss_mask)
    return keep, torch.where(answer, loss_mask.sum() / answers, torch.ones_like(loss_mask))


def build_long_short_mixture(long_cfg, short_cfg, tokenizer, *, num_rows: int, long_fraction: float,
                             answer_marker: Sequence[int] | None = None):
    """Long/short CPT data from two ``blends.PretrainDataConfig`` (same sources or not; ``seq_length``
    of each sets the long and short lengths). Returns a ``LongShortMixture`` of ``num_rows`` rows;
    ``answer_marker`` (token ids): completion-only loss for long task documents (:func:`answer_loss_weights`)."""
    from tandem.data_pipelines.blends import blend_schedule, build_pretrain_datasets

    if long_cfg.seq_length % short_cfg.seq_length:
        raise ValueError(f"long seq_length {long_cfg.seq_length} must be a multiple of short seq_length "
                         f"{short_cfg.seq_length}")
    _, _, taken = blend_schedule([[long_fraction, 1 - long_fraction]], [num_rows])
    pieces = long_cfg.seq_length // short_cfg.seq_length
    # allow_empty_phases: a short run may not reach a phase of a two-phase short blend
    long_ds = (build_pretrain_datasets(long_cfg, tokenizer, int(taken[0]), allow_empty_phases=True).train
               if taken[0] else None)
    short_ds = (build_pretrain_datasets(short_cfg, tokenizer, int(taken[1]) * pieces, allow_empty_phases=True).train
                if taken[1] else None)
    return LongShortMixture(long_ds, short_ds, long_fraction=long_fraction, long_length=long_cfg.seq_length,
                            short_length=short_cfg.seq_length, num_rows=num_rows, eod=tokenizer.eod,
                            answer_marker=answer_marker)


# --- synthetic tasks -------------------------------------------------------------------------------------

_NUM = re.compile(r"-?\d+")


def first_integer(text: str) -> int | None:
    m = _NUM.search(text)
    return int(m.group()) if m else None


@dataclass
class SyntheticExample:
    kind: str
    context: str
    question: str
    answer: str
    depth: float
    target_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return f"{self.context}\n\nQuestion: {self.question}\nAnswer:"

    @property
    def text(self) -> str:
        """Training text: the prompt followed by the answer (preprocessing appends EOD)."""
        return f"{self.prompt} {self.answer}"

    def check(self, prediction: str) -> bool:
        """True when the first integer in ``prediction`` equals the answer (all tasks answer a number)."""
        return first_integer(prediction) == int(self.answer)

    def to_record(self) -> dict:
        return {"text": self.text, "prompt": self.prompt, "answer": self.answer, "kind": self.kind,
                "depth": self.depth, "target_tokens": self.target_tokens, "meta": self.meta}


def _filler(rng: random.Random, n_tokens: int, count: Callable[[str], int], max_digits: int = 5) -> list[str]:
    """Neutral sentences (no number of more than ``max_digits`` digits, so no answer can hide in them)
    totalling ~n_tokens."""
    out, total = [], 0
    longest = re.compile(r"\d{%d,}" % (max_digits + 1))
    while total < n_tokens:
        s = random_sentence(rng)
        if longest.search(s):
            continue
        out.append(s)
        total += count(" " + s)
    return out


def _token_counter(tokenizer) -> Callable[[str], int]:
    if tokenizer is None:
        from tandem.data_pipelines.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    return lambda s: len(tokenizer.encode(s))


def _insert(sentences: list[str], items: Sequence[tuple[float, str]]) -> list[str]:
    """Insert each (depth, sentence) at that fraction of the filler, on a sentence boundary."""
    out = list(sentences)
    # Deepest first keeps the shallower insertion points valid; among equal depths the later item goes
    # in first, so items at one point keep their given order (a multi-hop chain must read forwards).
    order = sorted(range(len(items)), key=lambda i: (-items[i][0], -i))
    for i in order:
        depth, sent = items[i]
        out.insert(int(round(depth * len(sentences))), sent)
    return out


def _key(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghjkmnpqrstuvwxyz") for _ in range(5)) + str(rng.randint(10, 99))


def _budget(target_tokens: int, fixed: str, count) -> int:
    return max(0, target_tokens - count(fixed))


def needle(rng: random.Random, target_tokens: int, depth: float, tokenizer=None,
           value_digits: int = 7) -> SyntheticExample:
    """``value_digits``: the magic number's digits (7 by default; 1 makes a task a tiny model learns in a
    CPU smoke run: the filler then holds no digit at all, so the one digit after "is" is the answer)."""
    if not 1 <= value_digits <= 9:
        raise ValueError(f"value_digits must be in [1, 9], got {value_digits}")
    count = _token_counter(tokenizer)
    key = _key(rng)
    value = rng.randint(10 ** (value_digits - 1) if value_digits > 1 else 0, 10 ** value_digits - 1)
    fact = f"The special magic number for {key} is {value}."
    question = f"What is the special magic number for {key}?"
    hay = _filler(rng, _budget(target_tokens, fact + question + "\n\nQuestion: \nAnswer:", count), count,
                  max_digits=min(5, value_digits - 1))
    context = " ".join(_insert(hay, [(depth, fact)]))
    return SyntheticExample("needle", context, question, str(value), depth, target_tokens, {"key": key})


def kv_retrieval(rng: random.Random, target_tokens: int, depth: float, tokenizer=None,
                 num_pairs: int = 8) -> SyntheticExample:
    count = _token_counter(tokenizer)
    keys = set()
    while len(keys) < num_pairs:
        keys.add(_key(rng))
    pairs = [(k, rng.randint(1_000_000, 9_999_999)) for k in sorted(keys)]
    rng.shuffle(pairs)
    (qkey, qval), rest = pairs[0], pairs[1:]
    facts = [(depth, f"Record {qkey} holds the value {qval}.")]
    facts += [(rng.random(), f"Record {k} holds the value {v}.") for k, v in rest]
    question = f"Which value does record {qkey} hold?"
    fixed = " ".join(f for _, f in facts) + question + "\n\nQuestion: \nAnswer:"
    hay = _filler(rng, _budget(target_tokens, fixed, count), count)
    context = " ".join(_insert(hay, facts))
    return SyntheticExample("kv_retrieval", context, question, str(qval), depth, target_tokens,
                            {"key": qkey, "num_pairs": num_pairs})


def multi_hop(rng: random.Random, target_tokens: int, depth: float, tokenizer=None,
              hops: int = 3) -> SyntheticExample:
    count = _token_counter(tokenizer)
    names = []
    while len(names) < hops + 1:
        n = "v_" + _key(rng)
        if n not in names:
            names.append(n)
    value = rng.randint(1_000_000, 9_999_999)
    links = [f"Let {names[0]} be {value}."] + [f"Let {names[i]} be equal to {names[i - 1]}." for i in range(1, hops + 1)]
    # the first link at `depth`, later links spread over the rest of the context (in order, so the chain
    # is read forwards), plus distractor chains with other values
    span = 1.0 - depth
    placed = [(depth + span * i / (hops + 1), link) for i, link in enumerate(links)]
    for _ in range(2):
        d_name, d_val = "v_" + _key(rng), rng.randint(1_000_000, 9_999_999)
        placed.append((rng.random(), f"Let {d_name} be {d_val}."))
    question = f"What is the value of {names[-1]}?"
    fixed = " ".join(s for _, s in placed) + question + "\n\nQuestion: \nAnswer:"
    hay = _filler(rng, _budget(target_tokens, fixed, count), count)
    context = " ".join(_insert(hay, placed))
    return SyntheticExample("multi_hop", context, question, str(value), depth, target_tokens,
                            {"chain": names, "hops": hops})


_ITEMS = ["lanterns", "barrels", "compasses", "kettles", "ropes", "saddles"]


def aggregation(rng: random.Random, target_tokens: int, depth: float = 0.5, tokenizer=None,
                num_docs: int = 6, op: str = "sum") -> SyntheticExample:
    """Documents spread evenly over the context; ``depth`` is unused for placement (facts span the whole
    context by design) but recorded so reports can still bucket by it."""
    if op not in ("sum", "count"):
        raise ValueError(f"op must be 'sum' or 'count', got {op!r}")
    count = _token_counter(tokenizer)
    item = rng.choice(_ITEMS)
    others = [x for x in _ITEMS if x != item]
    reports, total, mentions = [], 0, 0
    for d in range(num_docs):
        if d == 0 or rng.random() < 0.6:  # at least one document reports the target item
            n = rng.randint(1, 50)
            total, mentions = total + n, mentions + 1
            reports.append(f"Document {d + 1}: the depot received {n} {item}.")
        else:
            reports.append(f"Document {d + 1}: the depot received {rng.randint(1, 50)} {rng.choice(others)}.")
    question = (f"In total, how many {item} did the depots receive across all documents?" if op == "sum"
                else f"How many documents report receiving {item}?")
    fixed = " ".join(reports) + question + "\n\nQuestion: \nAnswer:"
    hay = _filler(rng, _budget(target_tokens, fixed, count), count)
    placed = [((d + 0.5) / num_docs, r) for d, r in enumerate(reports)]
    context = " ".join(_insert(hay, placed))
    answer = total if op == "sum" else mentions
    return SyntheticExample(f"aggregation_{op}", context, question, str(answer), depth, target_tokens,
                            {"item": item, "num_docs": num_docs, "op": op})


GENERATORS: dict[str, Callable[..., SyntheticExample]] = {
    "needle": needle, "kv_retrieval": kv_retrieval, "multi_hop": multi_hop, "aggregation": aggregation,
}


def generate_examples(kind: str, *, lengths: Sequence[int], depths: Sequence[float], per_cell: int = 1,
                      seed: int = 0, tokenizer=None, **kwargs) -> list[SyntheticExample]:
    """``per_cell`` examples of ``kind`` for every (length, depth) cell, deterministic in ``seed``."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown synthetic task {kind!r}; available: {sorted(GENERATORS)}")
    for d in depths:
        if not 0 <= d <= 1:
            raise ValueError(f"depth must be in [0, 1], got {d}")
    rng = random.Random(seed)
    return [GENERATORS[kind](rng, int(n), float(d), tokenizer, **kwargs)
            for n in lengths for d in depths for _ in range(per_cell)]


def write_jsonl(path, examples: Iterable[SyntheticExample]) -> int:
    """Examples → JSONL (``text`` for tandem-preprocess, plus prompt/answer/kind/depth); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_record(), ensure_ascii=False) + "\n")
            n += 1
    return n


# --- evaluation -----------------------------------------------------------------------------------------

@dataclass
class RetrievalReport:
    accuracy: float
    by_depth: dict[float, float]
    by_length: dict[int, float]
    by_cell: dict[tuple[int, float], float]
    n: int
    failures: list[dict] = field(default_factory=list)  # the first few wrong answers, for inspection

    def as_dict(self, prefix: str = "eval/needle") -> dict[str, float]:
        out = {f"{prefix}/accuracy": self.accuracy}
        out.update({f"{prefix}/depth_{d:g}": a for d, a in self.by_depth.items()})
        out.update({f"{prefix}/len_{n}": a for n, a in self.by_length.items()})
        return out


def evaluate_retrieval(generate: Callable[[str], str], *, kind: str = "needle",
                       lengths: Sequence[int] = (256, 1024), depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                       per_cell: int = 2, seed: int = 1234, tokenizer=None,
                       examples: Sequence[SyntheticExample] | None = None, **kwargs) -> RetrievalReport:
    """Accuracy of ``generate(prompt) -> str`` on a synthetic task, by depth and by length.

    ``generate`` gets ``example.prompt`` (ending in "Answer:") and returns the continuation; it is scored
    by ``example.check``. Pass ``examples`` to reuse a fixed set; otherwise they are generated from ``seed``.
    For a model, wrap it with ``greedy_generate_fn(model, tokenizer)``.
    """
    exs = list(examples) if examples is not None else generate_examples(
        kind, lengths=lengths, depths=depths, per_cell=per_cell, seed=seed, tokenizer=tokenizer, **kwargs)
    if not exs:
        raise ValueError("no examples to evaluate")
    cell: dict[tuple[int, float], list[bool]] = defaultdict(list)
    failures = []
    for ex in exs:
        pred = generate(ex.prompt)
        ok = ex.check(pred)
        cell[(ex.target_tokens, ex.depth)].append(ok)
        if not ok and len(failures) < 5:
            failures.append({"kind": ex.kind, "length": ex.target_tokens, "depth": ex.depth,
                             "answer": ex.answer, "prediction": pred[:200]})

    def mean(xs):
        return float(np.mean(xs)) if xs else 0.0

    by_depth = {d: mean([o for (n, dd), v in cell.items() if dd == d for o in v])
                for d in sorted({d for _, d in cell})}
    by_length = {n: mean([o for (nn, d), v in cell.items() if nn == n for o in v])
                 for n in sorted({n for n, _ in cell})}
    return RetrievalReport(mean([o for v in cell.values() for o in v]), by_depth, by_length,
                           {k: mean(v) for k, v in sorted(cell.items())}, len(exs), failures)


def evaluate_needle(generate: Callable[[str], str] | None = None, *, model: torch.nn.Module | None = None,
                    tokenizer=None, lengths: Sequence[int] = (256, 1024),
                    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), per_cell: int = 2, seed: int = 1234,
                    max_new_tokens: int = 12) -> RetrievalReport:
    """Needle-in-a-haystack accuracy by depth and length, for a ``generate(prompt) -> str`` callable or
    a ``model`` (+ ``tokenizer``, greedy decoding). What a CPT run calls at eval time."""
    if (generate is None) == (model is None):
        raise ValueError("pass exactly one of generate=callable or model=... (with tokenizer=...)")
    if model is not None:
        if tokenizer is None:
            raise ValueError("evaluating a model needs its tokenizer=")
        generate = greedy_generate_fn(model, tokenizer, max_new_tokens=max_new_tokens)
    return evaluate_retrieval(generate, kind="needle", lengths=lengths, depths=depths, per_cell=per_cell,
                              seed=seed, tokenizer=tokenizer)


def greedy_generate_fn(model: torch.nn.Module, tokenizer, *, max_new_tokens: int = 12,
                       stop_ids: Sequence[int] | None = None) -> Callable[[str], str]:
    """``prompt -> str`` by greedy decoding with a ``model(input_ids) -> logits`` causal LM.

    Recomputes the full forward each step (no inference cache): meant for evaluating small models and
    short contexts in tests/smoke runs; the trainer's generation with the hybrid cache serves long ones.
    """
    stops = set(stop_ids) if stop_ids is not None else {tokenizer.eod}

    @torch.no_grad()
    def generate(prompt: str) -> str:
        was_training = model.training
        model.eval()
        try:
            ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
            out: list[int] = []
            for _ in range(max_new_tokens):
                nxt = int(model(ids)[0, -1].argmax())
                if nxt in stops:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            return tokenizer.decode(out)
        finally:
            model.train(was_training)

    return generate


# --- command line: CPT training text ----------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tandem.data_pipelines.long_context --out long.jsonl --kinds needle --lengths 256,512 ...``:
    synthetic long-context examples as JSONL for ``tandem-preprocess`` (the smoke CPT's long data)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tandem.data_pipelines.long_context",
                                description="Write synthetic long-context examples (text = prompt + answer) as JSONL.")
    p.add_argument("--out", required=True)
    p.add_argument("--kinds", default="needle", help=f"comma-separated, of {sorted(GENERATORS)}")
    p.add_argument("--lengths", default="512", help="comma-separated target token lengths (each a cell)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated depths in [0, 1]")
    p.add_argument("--per-cell", type=int, default=10, help="examples per (kind, length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--value-digits", type=int, default=None, help="needle: digits of the magic number (default 7)")
    p.add_argument("--tokenizer", default=None, help="tokenizer the lengths are counted in (default: the shipped one)")
    args = p.parse_args(argv)
    from pathlib import Path

    from tandem.data_pipelines.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(args.tokenizer)
        kinds = [k for k in args.kinds.split(",") if k]
        lengths = [int(x) for x in args.lengths.split(",") if x]
        depths = [float(x) for x in args.depths.split(",") if x]
        if args.per_cell < 1:
            raise ValueError(f"--per-cell must be >= 1, got {args.per_cell}")
        options = {"needle": {"value_digits": args.value_digits}} if args.value_digits is not None else {}
        examples = [ex for i, k in enumerate(kinds) for ex in generate_examples(
            k, lengths=lengths, depths=depths, per_cell=args.per_cell, seed=args.seed + 7919 * i, tokenizer=tok,
            **options.get(k, {}))]
    except (OSError, ValueError) as e:
        print(f"long_context: error: {e}", file=__import__("sys").stderr)
        return 2
    random.Random(args.seed).shuffle(examples)  # kinds, lengths and depths mixed along the file
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    n = write_jsonl(args.out, examples)
    print(f"{args.out}: {n} examples ({', '.join(kinds)}; lengths {lengths}; depths {depths})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
