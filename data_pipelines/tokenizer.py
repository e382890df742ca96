"""Tokenizers: any Hugging Face tokenizer from a local folder, plus the small one tandem ships.

    tok = load_tokenizer()                      # the shipped byte-level BPE (vocab 512, tiny preset)
    tok = load_tokenizer("/ckpt/nemotron-3")    # any local HF tokenizer folder or tokenizer.json
    ids = tok.encode("hello")                   # no BOS/EOS added; the pipeline appends EOD itself
    tok.eod, tok.vocab_size, tok.unique_identifiers   # what megatron-core's GPTDataset reads

Nothing is downloaded: folders load with ``local_files_only=True``. A folder (or file) holding only a
``tokenizer.json`` is loaded with the ``tokenizers`` library directly, which is faster to import and
cheap to load in every preprocessing worker; anything else goes through ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

SHIPPED_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"

# Special tokens the Nemotron 3 chat template needs (the released model's tokenizer_config.json).
CHAT_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
)


class Tokenizer:
    """One interface over a ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer.

    It is also the duck-typed tokenizer megatron-core's ``GPTDatasetConfig`` needs: ``vocab_size``,
    ``eod``, ``pad`` and a JSON-serialisable ``unique_identifiers`` (part of megatron's index-cache key,
    so it carries a hash of the vocabulary: a changed vocabulary never reuses stale cached indices).
    """

    def __init__(self, backend: Any, source: str, *, eod_token: str | None = None):
        self._backend = backend
        self.source = source
        self._is_hf = not _is_raw_tokenizers(backend)
        if self._is_hf:
            self.vocab_size = len(backend)  # includes added special tokens, unlike .vocab_size
            eos, bos, pad = backend.eos_token_id, backend.bos_token_id, backend.pad_token_id
            vocab = backend.get_vocab()
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            vocab = backend.get_vocab(with_added_tokens=True)
            cfg = _read_tokenizer_config(Path(source))
            eos, bos, pad = (vocab.get(cfg.get(k)) if isinstance(cfg.get(k), str) else None
                             for k in ("eos_token", "bos_token", "pad_token"))
        if eod_token is not None:
            if eod_token not in vocab:
                raise ValueError(f"{source}: eod_token {eod_token!r} is not in the vocabulary")
            eos = vocab[eod_token]
        if eos is None:
            raise ValueError(f"{source}: the tokenizer defines no eos token; pass eod_token=... naming "
                             f"the token that ends a document")
        self.eod = int(eos)
        self.bos = None if bos is None else int(bos)
        # megatron warns and ignores a pad equal to EOD; report none in that case (-1 is its "no pad").
        self.pad = -1 if pad is None or pad == eos else int(pad)
        digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
        # No path in it: the same vocabulary loaded from another folder/machine must hit the same
        # megatron cache and give the same schedule fingerprint on resume.
        self.unique_identifiers = {"class": "tandem.Tokenizer", "vocab_sha256": digest,
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    # --- encoding ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS; special-token strings in the text map to their ids."""
        if self._is_hf:
            return self._backend.encode(text, add_special_tokens=False)
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._is_hf:
            return self._backend(list(texts), add_special_tokens=False)["input_ids"]
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        if self._is_hf:
            return self._backend.get_vocab().get(token)
        return self._backend.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict], *, tools: Sequence[dict] | None = None,
                            add_generation_prompt: bool = False, enable_thinking: bool | None = True,
                            truncate_history_thinking: bool = True) -> list[int]:
        """Ids of the tandem chat template's rendering (``tandem.data_pipelines.chat.render_chat``; equal to
        transformers' ``apply_chat_template`` on the shipped folder, but tokenised turn by turn)."""
        from .chat import render_chat

        return render_chat(messages, self, tools=tools, add_generation_prompt=add_generation_prompt,
                           enable_thinking=enable_thinking,
                           truncate_history_thinking=truncate_history_thinking)["input_ids"]

    # megatron's tokenizer interface names
    @property
    def eos(self) -> int:
        return self.eod

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _is_raw_tokenizers(backend: Any) -> bool:
    from tokenizers import Tokenizer as RawTokenizer

    return isinstance(backend, RawTokenizer)


def _read_tokenizer_config(path: Path) -> dict:
    folder = path if path.is_dir() else path.parent
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        f = folder / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{e.lineno}: invalid JSON ({e.msg})") from None
            for k in ("eos_token", "bos_token", "pad_token"):
                v = data.get(k)
                if isinstance(v, dict):  # AddedToken serialised as {"content": ...}
                    v = v.get("content")
                if v is not None:
                    cfg[k] = v
    return cfg


def load_tokenizer(path: str | Path | None = None, *, backend: str = "auto",
                   eod_token: str | None = None) -> Tokenizer:
    """Load a tokenizer from a local folder or ``tokenizer.json`` (default: the shipped one).

    ``backend``: ``"auto"`` (a folder whose tokenizer is fully described by ``tokenizer.json`` plus
    optional ``tokenizer_config.json``/``special_tokens_map.json`` loads with ``tokenizers``; anything
    else with ``transformers``), ``"tokenizers"`` or ``"transformers"``. ``eod_token`` overrides the
    document-end token (default: the tokenizer's eos).
    """
    p = Path(path) if path is not None else SHIPPED_TOKENIZER_DIR
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist (tokenizers are loaded from local "
                                f"folders only; nothing is downloaded)")
    if backend not in ("auto", "tokenizers", "transformers"):
        raise ValueError(f"backend must be 'auto', 'tokenizers' or 'transformers', got {backend!r}")
    tj = p if p.is_file() else p / "tokenizer.json"
    if backend == "auto":
        # A tokenizer_config.json naming a slow/Python tokenizer class or extra files (sentencepiece
        # models, vocab.txt) needs transformers; a bare fast tokenizer does not.
        extra = p.is_dir() and any((p / n).exists() for n in ("tokenizer.model", "vocab.txt", "vocab.json", "merges.txt"))
        backend = "tokenizers" if tj.is_file() and not extra else "transformers"
    if backend == "tokenizers":
        from tokenizers import Tokenizer as RawTokenizer

        if not tj.is_file():
            raise FileNotFoundError(f"{tj} not found; backend='tokenizers' needs a tokenizer.json")
        return Tokenizer(RawTokenizer.from_file(str(tj)), str(p), eod_token=eod_token)
    from transformers import AutoTokenizer

    folder = p if p.is_dir() else p.parent
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return Tokenizer(hf, str(p), eod_token=eod_token)
