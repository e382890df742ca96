"""RL prompt sets built once per node: records and rendered token ids on disk, memory-mapped by every rank.

GRPO samples any prompt of its training set on any rank (the slots of a rollout batch are global), so every
rank needs random access to all of them — but not a copy each: at cluster scale a prompt set is 10⁵–10⁶
conversations, and Python lists of records and token ids cost gigabytes per rank. Here one process per node
(local rank 0) parses the files (schema errors name ``file:line``), splits off the held-out prompts, and
writes under ``<data.cache_dir>/rl/<key>/``:

- ``records.jsonl`` + ``records.offsets.npy``: one JSON object per prompt (:class:`RLPrompt` fields), read
  lazily by byte offset (:meth:`RLPromptStore.record`);
- ``tasks.npy``: each prompt's task index (the environment pools are built from it without parsing records);
- ``valid.jsonl``: the held-out prompts (small: evaluation uses at most ``stage.grpo.eval_prompts``);
- after the environments are known (the rendering depends on each task's reasoning mode and tools), the
  rendered prompt ids ``ids-<key>.bin`` (int32, flat) + ``ids-<key>.offsets.npy``.

Every other rank waits for the builder (the error of a failed build reaches every rank, so nobody hangs) and
memory-maps the files: one copy per node in the page cache. The directory key digests the files (path, size,
mtime), the tokenizer and the split options, so a changed file is a new build and a resume reuses the old
one. Why not ``datasets`` / Arrow: the records are small nested JSON (messages, answers, metadata) read one
at a time; a JSON line per record with an offset table is all the access pattern needs, with no new
dependency.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tandem.data_pipelines.rl_prompts import RLPrompt

from ..data import build_once_per_node

__all__ = ["RLPromptStore"]

_DONE = "meta.json"


def _write_records(path: Path, prompts: Sequence[RLPrompt]) -> np.ndarray:
    offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        for i, p in enumerate(prompts):
            f.write((json.dumps(asdict(p), ensure_ascii=False) + "\n").encode())
            offsets[i + 1] = f.tell()
    return offsets


class RLPromptStore:
    """Read side of one build (see the module doc): ``len``, ``store[i]`` → :class:`RLPrompt` (parsed on
    demand), ``task_of`` (int array), ``counts`` per task, ``valid`` (the held-out prompts, in memory),
    ``ids(i)`` once :meth:`render` has run."""

    def __init__(self, root: Path):
        self.root = Path(root)
        meta = json.loads((self.root / _DONE).read_text())
        self.key, self.tasks = meta["key"], list(meta["tasks"])
        self.task_of = np.load(self.root / "tasks.npy", mmap_mode="r")
        self._offsets = np.load(self.root / "records.offsets.npy", mmap_mode="r")
        self._fd = os.open(self.root / "records.jsonl", os.O_RDONLY)
        self.valid = [RLPrompt(**json.loads(line)) for line in (self.root / "valid.jsonl").read_text().splitlines()]
        self._ids = self._ids_offsets = None

    def __len__(self) -> int:
        return len(self.task_of)

    def __getitem__(self, i: int) -> RLPrompt:
        start, stop = int(self._offsets[i]), int(self._offsets[i + 1])
        return RLPrompt(**json.loads(os.pread(self._fd, stop - start, start)))

    @property
    def counts(self) -> dict[str, int]:
        n = np.bincount(np.asarray(self.task_of), minlength=len(self.tasks))
        return {t: int(c) for t, c in zip(self.tasks, n) if c}

    def pool(self, task: str) -> np.ndarray:
        """Indices of the prompts of ``task`` (int64, in file order)."""
        return np.flatnonzero(np.asarray(self.task_of) == self.tasks.index(task)) if task in self.tasks else np.zeros(0, np.int64)

    @classmethod
    def build(cls, cache_dir: Path, key: str, load: Callable[[], tuple[Sequence[RLPrompt], Sequence[RLPrompt]]]) -> "RLPromptStore":
        """The store of ``key`` under ``cache_dir/rl``, built once per node from ``load() → (train, valid)``
        (collective with a process group)."""
        where = Path(cache_dir) / "rl" / key

        def write(root: Path) -> None:
            train, valid = load()
            root.mkdir(parents=True, exist_ok=True)
            tasks = sorted({p.task for p in train})
            np.save(root / "records.offsets.npy", _write_records(root / "records.jsonl", train))
            np.save(root / "tasks.npy", np.array([tasks.index(p.task) for p in train], dtype=np.int16))
            _write_records(root / "valid.jsonl", valid)
            (root / _DONE).write_text(json.dumps({"key": key, "tasks": tasks, "train": len(train), "valid": len(valid)}))

        build_once_per_node(where, write, marker=_DONE)
        return cls(where)

    def render(self, key: str, render: Callable[[RLPrompt], list[int]], keep: Callable[[str], bool]) -> None:
        """Token ids of every prompt whose task ``keep`` accepts (others: empty), rendered once per node under
        ``key`` (the options the rendering depends on) and memory-mapped. Errors of ``render`` (``ValueError``,
        e.g. a prompt too long for the rows) reach every rank."""
        name = f"ids-{key}"

        def write(root: Path) -> None:
            offsets = np.zeros(len(self) + 1, dtype=np.int64)
            tmp = root / f"{name}.bin.tmp"
            with open(tmp, "wb") as f:
                for i in range(len(self)):
                    p = self[i]
                    ids = render(p) if keep(p.task) else []
                    f.write(np.asarray(ids, dtype=np.int32).tobytes())
                    offsets[i + 1] = offsets[i] + len(ids)
            np.save(root / f"{name}.offsets.npy", offsets)
            os.replace(tmp, root / f"{name}.bin")  # the marker: written last

        build_once_per_node(self.root, write, marker=f"{name}.bin")
        self._ids_offsets = np.load(self.root / f"{name}.offsets.npy", mmap_mode="r")
        size = int(self._ids_offsets[-1])
        self._ids = (np.memmap(self.root / f"{name}.bin", dtype=np.int32, mode="r", shape=(size,))
                     if size else np.zeros(0, np.int32))

    def ids(self, i: int) -> list[int]:
        if self._ids is None:
            raise RuntimeError("RLPromptStore.render must run before ids()")
        return self._ids[int(self._ids_offsets[i]): int(self._ids_offsets[i + 1])].tolist()

    def close(self) -> None:
        os.close(self._fd)
