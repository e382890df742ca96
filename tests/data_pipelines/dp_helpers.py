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


# --- chat conversations -------------------------------------------------------------------------------

_CHAT_BITS = ["12", " + ", "7", "the", " answer", "\n", "  ", "\t", "é", "日本", "😀", "{", "}", '"', ":", ",",
              "/think", "/no_think", "<|im_end|>", "<think>", "</think>", "<|im", "<thi", "</", ">", "|", "x",
              "<tool_call>", " \n ", "...", "Q", "  lead", "trail  "]

CHAT_TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "add two numbers",
                                      "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                                      "b": {"type": "integer"}}}}},
    {"name": "lookup", "description": "look a word up", "parameters": {"type": "object"}},
]


def random_text(rng, lo: int = 0, hi: int = 8) -> str:
    return "".join(rng.choice(_CHAT_BITS) for _ in range(rng.randint(lo, hi)))


def random_conversation(rng, *, tools: bool | None = None) -> tuple[list[dict], list[dict] | None]:
    """A random but well-formed conversation (and its tools): optional system, user turns each answered by
    one or more assistant turns, some calling tools whose results follow as tool messages."""
    use_tools = rng.random() < 0.5 if tools is None else tools
    msgs: list[dict] = []
    if rng.random() < 0.6:
        msgs.append({"role": "system", "content": random_text(rng)})
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": random_text(rng, 1) or "q"})
        for _ in range(rng.randint(1, 3)):
            m: dict = {"role": "assistant", "content": random_text(rng)}
            if rng.random() < 0.6:
                m["reasoning_content"] = random_text(rng)
            calls = []
            if use_tools and rng.random() < 0.5:
                for _ in range(rng.randint(1, 2)):
                    name = rng.choice(["add", "lookup"])
                    args = {"a": rng.randint(0, 99), "b": random_text(rng, 0, 3)}
                    calls.append({"type": "function", "function": {"name": name, "arguments": args}}
                                 if rng.random() < 0.5 else {"name": name, "arguments": args})
                m["tool_calls"] = calls
            if not m["content"].strip() and not calls:
                m["content"] = "ok"
            msgs.append(m)
            if not calls:
                break
            for _ in calls:
                msgs.append({"role": "tool", "content": random_text(rng) or "0"})
            msgs.append({"role": "assistant", "content": random_text(rng, 1) or "done",
                         "reasoning_content": random_text(rng)})
            break
    return msgs, (CHAT_TOOLS if use_tools else None)
