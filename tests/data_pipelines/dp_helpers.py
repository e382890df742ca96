"""Helpers shared by the data pipeline tests (a uniquely named module: ``conftest`` is ambiguous on
sys.path once several test folders have one)."""

import json
import random

def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the model reads every token of a document and the state is reset at each new one".split()
    texts = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        texts.append(f"doc {i}: {body} ünïcödé ✓")
    return texts


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def write_indexed(prefix, n_docs: int, lo: int, hi: int, seed: int = 0, eod: int = 2, min_len=4, max_len=60):
    """A megatron indexed source of random documents over token ids [lo, hi), each ending in EOD.

    Random tokens make every sample window unique, so tests can tell samples apart by content; the id
    range tells which source a sample came from.
    """
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        doc = np.append(rng.integers(lo, hi, int(rng.integers(min_len, max_len))), eod).astype(np.uint16)
        b.add_document(doc, [len(doc)])
    b.finalize(str(prefix) + ".idx")
    return str(prefix)
