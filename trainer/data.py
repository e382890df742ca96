"""Pretraining data for the shared loop: token sources, weighted blends and the two-phase schedule.

This is the trainer-side interface (the data-pipelines issue adds megatron indexed datasets behind the
same :class:`TokenSource` protocol). A source is map-style: sample ``i`` of a split is a fixed
``seq_len + 1`` token window, so resuming is indexing from the consumed count — no iterator state.

Source specs (``data.phase1[*].path``):

- ``synthetic:<kind>`` — generated, deterministic per (seed, kind, split, index); kinds: ``arithmetic``
  (``17+25=42`` lines), ``alphabet`` (runs of the alphabet from random letters), ``copy``
  (``words | words``), ``prose`` (template sentences). Small, learnable, shipped as code: the smoke
  recipe needs no files.
- ``text:<path>`` — a UTF-8 text file; documents are separated by blank lines.
- ``indexed:<prefix>`` — a ``tandem-preprocess`` output (megatron ``.bin``/``.idx``, tokenised with the
  shipped or a given tokenizer), served through megatron's GPTDataset (:mod:`tandem.data_pipelines.sources`).

Synthetic and text sources use bytes + 3 as tokens (ids 0/1/2 are pad/bos/eos, EOD = eos = 2), so any
model with vocab ≥ 259 fits; indexed sources carry their tokenizer's ids (EOD 2 with the shipped one).

Blends: within a phase, sample ``k`` goes to the source whose count lags its weight most (a deterministic
error-minimising interleave, as megatron's blended dataset does); each source keeps one running offset
across both phases, so phase 2 never replays what phase 1 consumed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

__all__ = ["EOD", "PAD", "BlendSchedule", "TokenSource", "build_source", "encode_text", "make_batch"]

PAD, BOS, EOD = 0, 1, 2
_OFFSET = 3


def encode_text(text: str) -> list[int]:
    return [b + _OFFSET for b in text.encode("utf-8")]


class DataError(ValueError):
    """Bad data configuration; the message names the key or file."""


class TokenSource(Protocol):
    name: str

    def num_samples(self, split: str) -> int | None: ...  # None = unbounded

    def sample(self, split: str, index: int, seq_len: int) -> torch.Tensor: ...  # [seq_len + 1] int64


# ---------------------------------------------------------------------------------------------------
# synthetic sources
_WORDS = ("the model reads every token and predicts the next one while state carries what came before "
          "mamba layers scan attention layers look back experts specialise data flows through phases").split()


def _gen_arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-")
    return f"{a}{op}{b}={a + b if op == '+' else a - b}\n"


def _gen_alphabet(rng: random.Random) -> str:
    start = rng.randrange(26)
    n = rng.randint(8, 30)
    return "".join(chr(97 + (start + i) % 26) for i in range(n)) + "\n"


def _gen_copy(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 7))]
    return " ".join(words) + " | " + " ".join(words) + "\n"


def _gen_prose(rng: random.Random) -> str:
    subject = rng.choice(["The model", "A layer", "The expert", "Every token", "The scan"])
    verb = rng.choice(["reads", "predicts", "carries", "routes", "mixes"])
    obj = rng.choice(["the state", "the next token", "a document", "the context", "its inputs"])
    return f"{subject} {verb} {obj}.\n"


_GENERATORS = {"arithmetic": _gen_arithmetic, "alphabet": _gen_alphabet, "copy": _gen_copy, "prose": _gen_prose}


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


@dataclass
class SyntheticSource:
    kind: str
    seed: int
    docs_per_line: int = 4  # lines per document

    @property
    def name(self) -> str:
        return f"synthetic:{self.kind}"

    def num_samples(self, split: str) -> int | None:
        return None

    def sample(self, split: str, index: int, seq_len: int) -> torch.Tensor:
        rng = random.Random(_seed_of(self.seed, self.kind, split, index))
        gen = _GENERATORS[self.kind]
        out: list[int] = []
        while len(out) < seq_len + 1:
            doc = "".join(gen(rng) for _ in range(rng.randint(1, self.docs_per_line)))
            out += encode_text(doc) + [EOD]
        return torch.tensor(out[: seq_len + 1], dtype=torch.long)


@dataclass
class TextFileSource:
    path: Path
    valid_fraction: float

    def __post_init__(self):
        raw = self.path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{self.path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                            f"text: sources must be UTF-8") from None
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise DataError(f"{self.path}: no documents (documents are separated by blank lines)")
        n_valid = max(1, int(len(docs) * self.valid_fraction)) if len(docs) > 1 else 0
        split_docs = {"train": docs[: len(docs) - n_valid], "valid": docs[len(docs) - n_valid:] or docs}
        self._streams = {}
        for split, ds in split_docs.items():
            ids: list[int] = []
            for d in ds:
                ids += encode_text(d) + [EOD]
            self._streams[split] = torch.tensor(ids, dtype=torch.long)

    @property
    def name(self) -> str:
        return f"text:{self.path}"

    def num_samples(self, split: str) -> int | None:
        return None  # windows wrap around the token stream (epochs)

    def sample(self, split: str, index: int, seq_len: int) -> torch.Tensor:
        stream = self._streams[split]
        start = (index * seq_len) % len(stream)
        idx = (torch.arange(seq_len + 1) + start) % len(stream)
        return stream[idx]


def build_source(spec: str, seed: int, valid_fraction: float, key: str) -> TokenSource:
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        if arg not in _GENERATORS:
            raise DataError(f"{key}: unknown synthetic source {arg!r}; expected one of {sorted(_GENERATORS)}")
        return SyntheticSource(arg, seed)
    if kind == "indexed":  # a tandem-preprocess output (megatron .bin/.idx), see tandem.data_pipelines.sources
        from tandem.data_pipelines.sources import IndexedTokenSource

        try:
            return IndexedTokenSource.from_spec(spec, seed, valid_fraction, key)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
    if kind == "text":
        path = Path(arg).expanduser()
        if not path.is_file():
            raise DataError(f"{key}: data file {str(path)!r} does not exist")
        try:
            return TextFileSource(path, valid_fraction)
        except OSError as e:
            raise DataError(f"{key}: cannot read {str(path)!r} ({e.strerror or e})") from None
        except DataError as e:
            raise DataError(f"{key}: {e}") from None
    raise DataError(f"{key}: unknown source spec {spec!r}; expected 'indexed:<prefix>', 'synthetic:<kind>' or 'text:<path>'")


# ---------------------------------------------------------------------------------------------------
class BlendSchedule:
    """Assigns global sample indices to (source, source-local index), phase by phase.

    State (saved in checkpoints): the current phase, samples drawn in it per source, and every source's
    running offset. ``advance(n)`` draws the next ``n`` samples in order.
    """

    def __init__(self, phases: list[list[tuple[str, float]]], sources: dict[str, TokenSource]):
        self.phases = phases
        self.sources = sources
        self.names = sorted(sources)
        self.phase = 0
        self.phase_counts = [0] * len(self.names)
        self.offsets = dict.fromkeys(self.names, 0)

    def set_phase(self, phase: int) -> bool:
        """Switch to ``phase`` (0-based); returns True if it changed."""
        if phase == self.phase:
            return False
        self.phase = phase
        self.phase_counts = [0] * len(self.names)
        return True

    def advance(self, n: int) -> list[tuple[str, int]]:
        blend = dict(self.phases[self.phase])
        total = sum(blend.values())
        weights = [blend.get(name, 0.0) / total for name in self.names]
        drawn_in_phase = sum(self.phase_counts)
        out = []
        for k in range(drawn_in_phase, drawn_in_phase + n):
            # largest deficit first; ties to the lowest index
            s = max(range(len(self.names)), key=lambda j: (weights[j] * (k + 1) - self.phase_counts[j], -j))
            name = self.names[s]
            self.phase_counts[s] += 1
            out.append((name, self.offsets[name]))
            self.offsets[name] += 1
        return out

    def state_dict(self) -> dict:
        return {"phase": self.phase, "phase_counts": list(self.phase_counts), "offsets": dict(self.offsets)}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["offsets"]) != self.names:
            raise DataError(
                f"checkpoint data sources {sorted(state['offsets'])} differ from the configured {self.names}; "
                f"resume with the same data blend, or start a new stage from the checkpoint's weights"
            )
        self.phase = state["phase"]
        self.phase_counts = list(state["phase_counts"])
        self.offsets = dict(state["offsets"])


def make_batch(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack ``seq_len + 1`` windows into a packed batch: input_ids, labels, loss_mask, seq_idx."""
    tokens = torch.stack(samples)
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    is_eod = input_ids == EOD
    # document index per token: EODs strictly before t (an EOD token belongs to the document it ends)
    seq_idx = torch.cumsum(is_eod.long(), dim=1) - is_eod.long()
    loss_mask = (labels != PAD).float()
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "seq_idx": seq_idx}
