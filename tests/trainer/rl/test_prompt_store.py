"""RL prompt sets built once per node and memory-mapped (trainer/rl/prompt_store.py)."""

import tracemalloc

import pytest

from tandem.data_pipelines.rl_prompts import RLPrompt
from tandem.trainer.rl.prompt_store import RLPromptStore


def _prompts(n, task="math"):
    return [RLPrompt(task=task if i % 3 else "code", answer=str(i), prompt=f"What is {i} + 1?",
                     metadata={"i": i}, where=f"f.jsonl:{i + 1}") for i in range(n)]


def test_built_once_read_lazily_and_rendered_once(tmp_path):
    calls = []
    train, valid = _prompts(50), _prompts(3, task="math")

    def load():
        calls.append(1)
        return train, valid

    store = RLPromptStore.build(tmp_path, "k1", load)
    assert len(store) == 50 and [store[i] for i in range(50)] == train and store.valid == valid
    assert store.counts == {"code": 17, "math": 33}
    assert store.pool("code").tolist() == [i for i in range(50) if i % 3 == 0] and store.pool("tools").size == 0
    rendered = []
    store.render("r1", lambda p: (rendered.append(1), [int(p.answer), 7])[1], keep=lambda t: t == "math")
    assert store.ids(1) == [1, 7] and store.ids(0) == []  # code prompts not kept: no ids
    again = RLPromptStore.build(tmp_path, "k1", load)  # a second start (a resume) reads the build
    again.render("r1", lambda p: pytest.fail("rendered twice"), keep=lambda t: True)
    assert calls == [1] and len(rendered) == 33 and again.ids(4) == [4, 7]
    RLPromptStore.build(tmp_path, "k2", load)  # another key (a changed file or option): a new build
    assert calls == [1, 1]


def test_a_failed_build_raises_and_leaves_no_store(tmp_path):
    def load():
        raise ValueError("data.rl.train: f.jsonl:3: field 'answer' is missing")

    with pytest.raises(ValueError, match="f.jsonl:3"):
        RLPromptStore.build(tmp_path, "k", load)
    assert not (tmp_path / "rl" / "k" / "meta.json").exists()


def test_opening_a_large_set_holds_no_records_in_memory(tmp_path):
    """Measured with tracemalloc: opening a 60k-prompt store and reading its pools allocates well under 1 MB
    of Python objects, where the records as a list take tens of MB (per rank, before this store)."""
    train = _prompts(60_000)
    store = RLPromptStore.build(tmp_path, "big", lambda: (train, []))
    store.render("r", lambda p: [1, 2, 3, 4] * 10, keep=lambda t: True)
    del store
    tracemalloc.start()
    opened = RLPromptStore(tmp_path / "rl" / "big")
    opened.render("r", lambda p: pytest.fail("rendered twice"), keep=lambda t: True)
    pools = {t: opened.pool(t) for t in ("math", "code")}
    sample = [opened[int(i)] for i in pools["math"][:100]] + [opened.ids(int(i)) for i in pools["code"][:100]]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracemalloc.start()
    as_lists = (list(train), [[1, 2, 3, 4] * 10 for _ in train])
    _, list_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(sample) == 200 and len(as_lists[1]) == 60_000
    assert peak < 1e6 and list_peak > 20 * peak, (peak, list_peak)
