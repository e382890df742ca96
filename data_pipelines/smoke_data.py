"""A small, learnable text corpus for the smoke recipe, built into an indexed dataset.

    python -m tandem.data_pipelines.smoke_data --out runs/smoke/corpus.jsonl          # JSONL only
    tandem-preprocess -i runs/smoke/corpus.jsonl -o runs/smoke/data/corpus     # → .bin/.idx
    python -m tandem.data_pipelines.smoke_data --out runs/smoke/corpus.jsonl --prefix runs/smoke/data/corpus  # both

The documents mix plain sentences (the shipped tokenizer's training distribution), strongly patterned
text (counting, repeated phrases: a tiny model's loss falls fast on them, which is what a smoke test
needs to see) and short needle-retrieval examples (the long-context task format in miniature).
Deterministic in ``seed``; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tandem.data_pipelines.build_tokenizer import random_sentence


def smoke_documents(n_docs: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.4:
            start = rng.randint(0, 200)
            docs.append(" ".join(str(start + k) for k in range(rng.randint(8, 40))))
        elif r < 0.6:
            phrase = random_sentence(rng)
            docs.append(" ".join([phrase] * rng.randint(2, 5)))
        elif r < 0.9:
            docs.append(" ".join(random_sentence(rng) for _ in range(rng.randint(1, 6))))
        else:
            from tandem.data_pipelines.long_context import needle

            docs.append(needle(rng, rng.randint(48, 160), rng.random()).text)
    return docs


def write_smoke_corpus(path: str | Path, n_docs: int = 2000, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in smoke_documents(n_docs, seed):
            f.write(json.dumps({"text": text}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default=None, help="also preprocess into <prefix>.bin/.idx (shipped tokenizer)")
    args = p.parse_args(argv)
    out = write_smoke_corpus(args.out, args.docs, args.seed)
    print(f"wrote {args.docs} documents to {out}")
    if args.prefix:
        from tandem.data_pipelines.preprocess import main as preprocess_main

        return preprocess_main(["-i", str(out), "-o", args.prefix, "--no-progress"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
