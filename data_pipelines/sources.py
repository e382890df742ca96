"""Pretraining source specs, and the byte-level sources that need no tokenizer files.

A blend (``blends.Phase.blend``) maps source specs to weights:

- ``<prefix>`` or ``indexed:<prefix>`` — a ``tandem-preprocess`` output (megatron ``.bin``/``.idx``),
  served by megatron's ``GPTDataset`` (``blends.build_source_dataset``): its document split, seeded
  multi-epoch shuffle, index cache and loss mask.
- ``synthetic:<kind>`` — generated, deterministic per (seed, kind, split, index); kinds ``arithmetic``
  (``17+25=42`` lines), ``alphabet`` (runs of the alphabet), ``copy`` (``words | words``), ``prose``
  (template sentences). Small and learnable: the smoke recipe needs no files.
- ``text:<file>`` — a UTF-8 text file; documents are separated by blank lines.

Why the byte-level sources are not megatron datasets: they exist for smoke runs and tests, where
importing megatron-core costs ~6 s per process on the 2-core test machines (its package ``__init__`` loads
the whole model-parallel stack) — every rank of every smoke run would pay it. So they are small map-style
adapters yielding megatron's sample dict (``tokens``, ``labels``, ``loss_mask``, ``position_ids``, built as
``GPTDataset.__getitem__`` builds it: :func:`window_sample`) and go through the same blend, phase and
loader code as indexed data. Their tokens are bytes + 3 (:data:`BYTE_TOKENIZER`: pad 0, bos 1, EOD 2), so
any model with ``vocab_size >= 259`` fits; they cannot share a blend with tokenised (indexed) data.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

KINDS = ("indexed", "synthetic", "text")
_BYTE_OFFSET = 3


@dataclass(frozen=True)
class ByteTokenizer:
    """The byte-level "tokenizer" of the synthetic and text sources: ids = UTF-8 bytes + 3.

    Has what megatron's and tandem's dataset code reads from a tokenizer: ``vocab_size``, ``eod``,
    ``pad``, ``bos`` and a JSON-serialisable ``unique_identifiers`` (cache keys, fingerprints)."""

    vocab_size: int = 256 + _BYTE_OFFSET
    pad: int = 0
    bos: int = 1
    eod: int = 2
    unique_identifiers: dict = field(default_factory=lambda: {"class": "tandem.ByteTokenizer", "offset": _BYTE_OFFSET})
    source: str = "bytes+3"

    def encode(self, text: str) -> list[int]:
        return [b + _BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i - _BYTE_OFFSET for i in ids if i >= _BYTE_OFFSET).decode("utf-8", errors="replace")


BYTE_TOKENIZER = ByteTokenizer()


def parse_spec(spec: str) -> tuple[str, str]:
    """``spec`` → ``(kind, argument)``; a spec without a ``kind:`` is an indexed prefix."""
    kind, sep, arg = spec.partition(":")
    if not sep:
        return "indexed", spec
    if kind not in KINDS:
        raise ValueError(f"unknown source spec {spec!r}; expected '<prefix>', 'indexed:<prefix>', "
                         f"'synthetic:<kind>' or 'text:<path>'")
    if not arg:
        raise ValueError(f"source spec {spec!r} names no {'prefix' if kind == 'indexed' else kind}")
    return kind, os.path.expanduser(arg) if kind != "synthetic" else arg


def is_byte_level(spec: str) -> bool:
    return parse_spec(spec)[0] != "indexed"


def split_ranges(split: str, n_docs: int) -> list[tuple[int, int] | None]:
    """Document ranges ``[lo, hi)`` of train / valid / test for megatron's ``split`` string ("98,2,0"),
    rounded as megatron rounds them; None for a split of weight 0."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"split must be comma-separated weights like '98,2,0', got {split!r}") from None
    weights = (weights + [0.0, 0.0, 0.0])[:3]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split weights must be >= 0 and not all 0, got {split!r}")
    total, acc, out = sum(weights), 0.0, []
    for w in weights:
        lo, acc = acc, acc + w / total
        out.append(None if w == 0 else (int(round(lo * n_docs)), int(round(acc * n_docs))))
    return out


def window_sample(window: torch.Tensor, *, eod: int, pad: int, eod_mask_loss: bool) -> dict:
    """A ``seq_length + 1`` token window → megatron's sample dict, built as ``GPTDataset.__getitem__``
    builds it (``reset_position_ids=True``, no attention mask): loss 0 where the *input* is EOD (with
    ``eod_mask_loss``) and where the label is the pad id; positions restart after each EOD."""
    tokens, labels = window[:-1].long(), window[1:].long()
    loss_mask = torch.ones(len(tokens), dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    if pad >= 0:
        loss_mask[labels == pad] = 0.0
    t = torch.arange(len(tokens))
    starts = torch.zeros(len(tokens), dtype=torch.bool)
    starts[0] = True
    starts[1:] = tokens[:-1] == eod
    position_ids = t - torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=0).values
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


# --- synthetic -----------------------------------------------------------------------------------------
_WORDS = ("the model reads every token and predicts the next one while state carries what came before "
          "mamba layers scan attention layers look back experts specialise data flows through phases").split()


def _gen_arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-")
    return f"{a}{op}{b}={a + b if op == '+' else a - b}\n"


def _gen_alphabet(rng: random.Random) -> str:
    start = rng.randrange(26)
    return "".join(chr(97 + (start + i) % 26) for i in range(rng.randint(8, 30))) + "\n"


def _gen_copy(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 7))]
    return " ".join(words) + " | " + " ".join(words) + "\n"


def _gen_prose(rng: random.Random) -> str:
    subject = rng.choice(["The model", "A layer", "The expert", "Every token", "The scan"])
    verb = rng.choice(["reads", "predicts", "carries", "routes", "mixes"])
    obj = rng.choice(["the state", "the next token", "a document", "the context", "its inputs"])
    return f"{subject} {verb} {obj}.\n"


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _gen_arithmetic, "alphabet": _gen_alphabet, "copy": _gen_copy, "prose": _gen_prose}


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


class SyntheticDataset:
    """``num_samples`` generated windows of one kind and split; sample ``i`` depends only on
    (seed, kind, split, i): documents of 1–4 generated lines, each ending in EOD, cut to the window."""

    def __init__(self, kind: str, seed: int, split: str, seq_length: int, num_samples: int, eod_mask_loss: bool):
        if kind not in GENERATORS:
            raise ValueError(f"unknown synthetic source {kind!r}; expected one of {sorted(GENERATORS)}")
        self.kind, self.seed, self.split, self.seq_length = kind, seed, split, seq_length
        self.num_samples, self.eod_mask_loss = num_samples, eod_mask_loss

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(_seed_of(self.seed, self.kind, self.split, int(i)))
        gen, tok, out = GENERATORS[self.kind], BYTE_TOKENIZER, []
        while len(out) < self.seq_length + 1:
            out += tok.encode("".join(gen(rng) for _ in range(rng.randint(1, 4)))) + [tok.eod]
        return window_sample(torch.tensor(out[: self.seq_length + 1]), eod=tok.eod, pad=tok.pad,
                             eod_mask_loss=self.eod_mask_loss)


# --- text files ----------------------------------------------------------------------------------------
def read_text_documents(path: str) -> list[str]:
    """Documents (separated by blank lines) of a UTF-8 file; errors name the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {str(p)!r} ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         f"text: sources must be UTF-8") from None
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise ValueError(f"{p}: no documents (documents are separated by blank lines)")
    return docs


class TextDataset:
    """Windows over one split of a text file's documents (bytes + 3, EOD after each document).

    One epoch is the split's token stream cut into ``seq_length`` windows (the last one wraps to the
    start); each epoch visits them in its own seeded order, so later epochs reshuffle."""

    def __init__(self, docs: list[str], seed: int, split: str, seq_length: int, num_samples: int, eod_mask_loss: bool):
        ids: list[int] = []
        for d in docs:
            ids += BYTE_TOKENIZER.encode(d) + [BYTE_TOKENIZER.eod]
        self.stream = torch.tensor(ids, dtype=torch.long)
        self.seed, self.split, self.seq_length = seed, split, seq_length
        self.num_samples, self.eod_mask_loss = num_samples, eod_mask_loss
        self.per_epoch = max(1, len(self.stream) // seq_length)
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.RandomState(_seed_of(self.seed, self.split, epoch) % 2**32)
            self._order = (epoch, rng.permutation(self.per_epoch))
        return self._order[1]

    def __getitem__(self, i: int) -> dict:
        epoch, j = divmod(int(i), self.per_epoch)
        start = int(self._epoch_order(epoch)[j]) * self.seq_length
        window = self.stream[(torch.arange(self.seq_length + 1) + start) % len(self.stream)]
        tok = BYTE_TOKENIZER
        return window_sample(window, eod=tok.eod, pad=tok.pad, eod_mask_loss=self.eod_mask_loss)


def check_byte_source(spec: str, split: str) -> None:
    """What can fail before building (missing or non-UTF-8 file, a split left without documents)."""
    kind, arg = parse_spec(spec)
    if kind == "synthetic" and arg not in GENERATORS:
        raise ValueError(f"unknown synthetic source {arg!r}; expected one of {sorted(GENERATORS)}")
    if kind == "text":
        docs = read_text_documents(arg)
        for name, r in zip(("train", "valid", "test"), split_ranges(split, len(docs))):
            if r is not None and r[1] <= r[0]:
                raise ValueError(f"{arg}: split {split!r} gives its {len(docs)} documents none for {name}; "
                                 f"add documents or lower data.valid_fraction")


def build_byte_dataset(spec: str, *, seed: int, split: str, seq_length: int, eod_mask_loss: bool,
                       num_train: int, num_valid: int) -> tuple[Any, Any]:
    """(train, valid) datasets of a ``synthetic:`` or ``text:`` source; a split with no samples → None."""
    kind, arg = parse_spec(spec)
    if kind == "synthetic":
        make = lambda name, n: SyntheticDataset(arg, seed, name, seq_length, n, eod_mask_loss)
    elif kind == "text":
        docs = read_text_documents(arg)
        ranges = split_ranges(split, len(docs))

        def make(name, n):
            lo, hi = ranges[0 if name == "train" else 1]
            return TextDataset(docs[lo:hi], seed, name, seq_length, n, eod_mask_loss)
    else:
        raise ValueError(f"{spec!r} is not a byte-level source")
    return (make("train", num_train) if num_train else None), (make("valid", num_valid) if num_valid else None)
