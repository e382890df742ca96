"""Fixtures for the data pipeline tests: the shipped tokenizer and small corpora written on the fly."""

import json
import random
import warnings

import pytest

# megatron-core warns on import that TE/Apex are absent; irrelevant to its datasets.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(scope="session")
def tok():
    from data_pipelines.tokenizer import load_tokenizer

    return load_tokenizer()


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
