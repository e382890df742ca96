"""The tokenizer travels with the weights: every checkpoint's ``model/`` and every export hold its files.

A model is only usable with the tokenizer it was trained with (a fine-tune of a 1024-id release read with
the shipped 512-id tokenizer decodes garbage, silently). So the checkpoint manager copies the run's tokenizer
files (``tokenizer.json``, ``tokenizer_config.json`` — which carries the chat template —, and whichever of
the other Hugging Face tokenizer files the source has) beside ``config.json``, where transformers'
``AutoTokenizer`` and :func:`tandem.data_pipelines.tokenizer.load_tokenizer` both find them; ``tandem
generate``, ``chat_eval`` and a stage started with ``model.init_from`` use them by default.

The files are copied, not re-serialised: the tokenizer that a later load sees is byte for byte the one
the run read (a few MB even for a 131072-id vocabulary, written by rank 0 only).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tandem.data_pipelines.tokenizer import SHIPPED_TOKENIZER_DIR

__all__ = ["TOKENIZER_FILES", "copy_tokenizer_files", "has_tokenizer", "saved_tokenizer", "write_tokenizer"]

#: the Hugging Face tokenizer files a folder may hold (chat template inside tokenizer_config.json or its own file)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")

#: the shipped chat template (the one tandem's renderer implements), for a tokenizer folder that has none
_CHAT_TEMPLATE = SHIPPED_TOKENIZER_DIR.parent / "chat_template.jinja"


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a loadable tokenizer (``tokenizer.json`` or a sentencepiece model)."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def copy_tokenizer_files(source: str | Path, dest: str | Path) -> list[str]:
    """Copy the tokenizer files of folder (or ``tokenizer.json`` file) ``source`` into folder ``dest``; the
    names copied. A source without any chat template gets the shipped one (``chat_template.jinja``)."""
    source, dest = Path(source), Path(dest)
    folder = source if source.is_dir() else source.parent
    copied = []
    if source.is_file():
        shutil.copyfile(source, dest / "tokenizer.json")
        copied.append("tokenizer.json")
    for name in TOKENIZER_FILES:
        if name not in copied and (folder / name).is_file():
            shutil.copyfile(folder / name, dest / name)
            copied.append(name)
    config = dest / "tokenizer_config.json"
    has_template = "chat_template.jinja" in copied or "chat_template.json" in copied or (
        config.is_file() and '"chat_template"' in config.read_text())
    if copied and not has_template:
        shutil.copyfile(_CHAT_TEMPLATE, dest / "chat_template.jinja")
        copied.append("chat_template.jinja")
    return copied


def write_tokenizer(tokenizer: Any, dest: str | Path) -> list[str]:
    """The files of a loaded :class:`~tandem.data_pipelines.tokenizer.Tokenizer` into ``dest``; nothing for a
    tokenizer without files (the byte-level ids of ``synthetic:``/``text:`` sources)."""
    source = getattr(tokenizer, "source", None)
    if not source or not Path(source).exists():
        return []
    return copy_tokenizer_files(source, dest)


def saved_tokenizer(weights: str | Path) -> Path | None:
    """The tokenizer folder saved with a checkpoint's weights folder, or None when it has none (older
    checkpoints, byte-level runs): callers then fall back to the shipped tokenizer."""
    return Path(weights) if has_tokenizer(weights) else None
