"""RL prompt datasets: one prompt per row, with the task that scores it and the gold answer.

    prompts = load_rl_prompts("math.jsonl", tasks=["math"])      # list[RLPrompt], validated
    prompts[0].as_sample()   # {"task", "answer", "metadata", "prompt" | "messages"}: what environments get
    prompts[0].where         # "math.jsonl:17"

Row schema (JSONL line / Parquet row / Hugging Face dataset row; sources as in :mod:`.readers`)::

    {"prompt": str                                   # exactly one of prompt / messages
     "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
     "task": str,                                    # environment name, e.g. "math" (or default_task=)
     "answer": str | int | float | list,             # the gold answer the environment compares against
     "metadata": {...}}                              # optional, passed to the environment untouched

Every invalid row is a ``BadRecordError`` whose message starts with ``file:line`` and names the key
(``messages[2].role``, ``task``, ...); ``bad_rows="skip"`` skips and counts them instead. The checks are
plain Python (the row schema is small; ``jsonschema`` serves the structured-output environment). This
module knows nothing of the trainer: which task names exist is passed in (``tasks=``), e.g. the keys of the
trainer's environment registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator

from .chat import ROLES
from .readers import MISSING, ReadStats, check_text, iter_records

__all__ = ["RLPrompt", "rl_prompt_schema", "iter_rl_prompts", "load_rl_prompts", "ANSWER_TYPES"]

ANSWER_TYPES = (str, int, float, list)


@dataclass(frozen=True)
class RLPrompt:
    task: str
    answer: Any
    prompt: str | None = None
    messages: list[dict] | None = None
    metadata: dict = field(default_factory=dict)
    where: str = ""

    def as_sample(self) -> dict:
        """The mapping environments receive as ``sample`` (``where`` included, for error messages)."""
        out = {"task": self.task, "answer": self.answer, "metadata": self.metadata, "where": self.where}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        else:
            out["messages"] = self.messages
        return out


def _present(row: dict, key: str) -> bool:
    # Parquet / HF tables have every column in every row; a null there means "absent"
    return row.get(key, MISSING) not in (MISSING, None)


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"field 'messages' must be a non-empty list of messages, got {type(messages).__name__}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"field 'messages[{i}]' must be an object, got {type(m).__name__}"
        if m.get("role") not in ROLES:
            return f"field 'messages[{i}].role' must be one of {', '.join(ROLES)}, got {m.get('role')!r}"
        try:
            check_text(m.get("content", MISSING), f"messages[{i}].content")
        except ValueError as e:
            return str(e)
    if messages[-1]["role"] == "assistant":
        return "field 'messages' ends with an assistant turn; an RL prompt ends where the policy answers"
    return None


def rl_prompt_schema(tasks: Collection[str] | None = None, default_task: str | None = None):
    """A :mod:`.readers` schema hook for the row schema above (``tasks``: the allowed task names)."""

    def check(row: dict) -> str | None:
        has_prompt, has_messages = _present(row, "prompt"), _present(row, "messages")
        if has_prompt == has_messages:
            which = "both" if has_prompt else "neither"
            return f"a row needs exactly one of the fields 'prompt' and 'messages', it has {which}"
        if has_prompt:
            try:
                if not check_text(row["prompt"], "prompt").strip():
                    return "field 'prompt' is empty"
            except ValueError as e:
                return str(e)
        else:
            msg = _check_messages(row["messages"])
            if msg:
                return msg
        if _present(row, "task"):
            task = row["task"]
            if not isinstance(task, str) or not task:
                return f"field 'task' must be a non-empty string, got {task!r}"
        elif default_task is None:
            return "missing field 'task' (the environment that scores the prompt; or pass default_task=)"
        else:
            task = default_task
        if tasks is not None and task not in tasks:
            return f"field 'task' is {task!r}, which has no environment; known tasks: {sorted(tasks)}"
        if not _present(row, "answer"):
            return "missing field 'answer'"
        if isinstance(row["answer"], bool) or not isinstance(row["answer"], ANSWER_TYPES):
            return f"field 'answer' must be a string, number or list, got {type(row['answer']).__name__}"
        if _present(row, "metadata") and not isinstance(row["metadata"], dict):
            return f"field 'metadata' must be an object, got {type(row['metadata']).__name__}"
        return None

    return check


def iter_rl_prompts(path: str | Path | list, *, tasks: Collection[str] | None = None,
                    default_task: str | None = None, split: str | None = None, bad_rows: str = "raise",
                    stats: ReadStats | None = None) -> Iterator[RLPrompt]:
    """Validated prompts of ``path`` in file order (see the module doc for the schema and errors)."""
    schema = rl_prompt_schema(tasks, default_task)
    for rec in iter_records(path, schema=schema, split=split, bad_rows=bad_rows, stats=stats):
        row = rec.data
        yield RLPrompt(
            task=row["task"] if _present(row, "task") else default_task,
            answer=row["answer"],
            prompt=row["prompt"] if _present(row, "prompt") else None,
            messages=[{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            if _present(row, "messages") else None,
            metadata=dict(row["metadata"]) if _present(row, "metadata") else {},
            where=rec.where,
        )


def load_rl_prompts(path: str | Path | list, **kwargs) -> list[RLPrompt]:
    """All of :func:`iter_rl_prompts` as a list; an empty dataset is a ValueError."""
    out = list(iter_rl_prompts(path, **kwargs))
    if not out:
        raise ValueError(f"{path}: no RL prompts")
    return out
