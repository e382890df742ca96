"""Chat rendering, token-in token-out: the Nemotron 3 style ChatML template (as the released model's chat template renders it) as pieces.

    sample = render_chat(messages, tok, enable_thinking=True)       # one sample: ids + per-token loss mask
    samples = render_sft_samples(messages, tok, train_on="all")     # multi-turn → one sample per segment
    prompt = render_prompt(messages, tok, enable_thinking=False)     # ids ending in the generation prompt

The Jinja template in ``assets/chat_template.jinja`` (shipped as ``chat_template`` in the tokenizer folder,
so ``AutoTokenizer.apply_chat_template`` works) and this module produce the same tokens: ``render_chat(...)
["input_ids"] == tok.encode(template_text)``. Here each piece (a system/user/tool turn, an assistant header,
an assistant body, the newline after it) is tokenised on its own and the ids are concatenated; nothing is
re-tokenised as a whole and no re-rendered text is prefix-diffed. That agrees with encoding the whole text
because every piece boundary touches a special token (``<|im_start|>``, ``<think>``, ``<|im_end|>``): the
tokenizer splits its input at special tokens before BPE, so no merge can cross a boundary.

The loss mask is 1 on a trained assistant turn's tokens after its ``<|im_start|>assistant\\n`` header: the
``<think>…</think>`` block, the content, the tool calls and the closing ``<|im_end|>``; 0 on the system,
user and tool turns, on the header, on the ``\\n`` after ``<|im_end|>`` and on a generation prompt.

Multi-turn with ``truncate_history_thinking`` (default): the template renders assistant turns before the last
user message without their reasoning, so one rendering cannot train every turn with its reasoning.
``render_sft_samples`` therefore emits one sample per user-delimited segment — sample k is the template's
rendering of the conversation up to (not including) the (k+1)-th user message that follows an assistant turn,
with loss on the assistant turns after its last user message. Every assistant turn is trained exactly once,
with its reasoning, and every sample is exactly what the template renders for that prefix (what the model
sees at inference). A sample whose tokens are a prefix of the next one (nothing was truncated) is merged into
it, so conversations without history reasoning cost one sample.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

CHAT_TEMPLATE_PATH = Path(__file__).parent / "assets" / "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("all", "final")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
THINK_MARKER, NO_THINK_MARKER = "/think", "/no_think"
_SPECIALS = (IM_START, IM_END, THINK, END_THINK, "<tool_call>", "</tool_call>", "<tool_response>",
             "</tool_response>")


@lru_cache(maxsize=1)
def load_chat_template() -> str:
    """The Jinja chat template text (the one ``build_tokenizer`` writes into ``tokenizer_config.json``)."""
    return CHAT_TEMPLATE_PATH.read_text()


# --- text rules shared with the template (each mirrors one line of chat_template.jinja) -----------------

def thinking_mode(messages: Sequence[dict], enable_thinking: bool | None = True) -> bool:
    """Reasoning ON/OFF for a conversation: ``enable_thinking`` unless a ``/think`` or ``/no_think`` in a
    system or user message overrides it (the last marker wins, in message order then text position)."""
    mode = True if enable_thinking is None else bool(enable_thinking)
    for m in messages:
        text = m.get("content")
        if m.get("role") in ("system", "user") and isinstance(text, str):
            text = text.replace(END_THINK, "\n")  # "/think" inside "</think>" is no marker
            on, off = text.rfind(THINK_MARKER), text.rfind(NO_THINK_MARKER)
            if on > off:
                mode = True
            elif off > on:
                mode = False
    return mode


def _clean(text: Any) -> str:
    """System/user text: markers removed, surrounding whitespace stripped (Jinja ``trim`` = ``str.strip``)."""
    parts = (text if isinstance(text, str) else "").split(END_THINK)  # "/think" inside "</think>" is no marker
    return END_THINK.join(p.replace(NO_THINK_MARKER, "").replace(THINK_MARKER, "") for p in parts).strip()


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if value is None:
        return ""
    return _tojson(value)


def _tojson(value: Any) -> str:
    # transformers' template ``tojson`` filter: json.dumps with ensure_ascii=False and default separators
    return json.dumps(value, ensure_ascii=False)


def format_tool_call(call: dict) -> str:
    """``{"name": ..., "arguments": {...}}`` of one tool call (plain or OpenAI ``{"function": {...}}``)."""
    fn = call.get("function") or call
    args = fn.get("arguments")
    args = {} if args is None else args
    return ('{"name": ' + _tojson(fn.get("name")) + ', "arguments": '
            + (args if isinstance(args, str) else _tojson(args)) + "}")


def system_text(messages: Sequence[dict], tools: Sequence[dict] | None) -> str:
    """The text of the system block between ``<|im_start|>system\\n`` and ``<|im_end|>``."""
    system = _clean(messages[0].get("content")) if messages and messages[0].get("role") == "system" else ""
    if tools:
        system += (("\n\n" if system else "") + "# Tools\n\nYou may call one or more functions to assist with "
                   "the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:"
                   "\n<tools>")
        for tool in tools:
            system += "\n" + _tojson(tool)
        system += ('\n</tools>\n\nFor each function call, return a json object with function name and arguments '
                   'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
                   '"arguments": <args-json-object>}\n</tool_call>')
    return system


def generation_prompt(thinking: bool) -> str:
    return f"{IM_START}assistant\n" + (f"{THINK}\n" if thinking else f"{THINK}{END_THINK}")


# --- pieces -------------------------------------------------------------------------------------------

def chat_pieces(messages: Sequence[dict], *, tools: Sequence[dict] | None = None,
                enable_thinking: bool | None = True, truncate_history_thinking: bool = True,
                add_generation_prompt: bool = False) -> list[tuple[str, int | None]]:
    """The rendering as ``(text, turn)`` pieces; ``turn`` is the message index of an assistant *body*
    (the trainable part), None elsewhere. ``"".join(texts)`` is the template's text."""
    thinking = thinking_mode(messages, enable_thinking)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    pieces: list[tuple[str, int | None]] = [(f"{IM_START}system\n{system_text(messages, tools)}{IM_END}\n", None)]
    tool_run: list[str] = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "tool":  # consecutive tool results share one user turn
            tool_run.append(f"<tool_response>\n{_plain(m.get('content'))}\n</tool_response>")
            if i + 1 == len(messages) or messages[i + 1].get("role") != "tool":
                pieces.append((f"{IM_START}user\n" + "\n".join(tool_run) + f"{IM_END}\n", None))
                tool_run = []
        elif role == "system":
            if i:
                raise ValueError("a system message is only allowed as the first message")
        elif role == "user":
            pieces.append((f"{IM_START}user\n{_clean(m.get('content'))}{IM_END}\n", None))
        elif role == "assistant":
            content, reasoning = _plain(m.get("content")), _plain(m.get("reasoning_content"))
            if reasoning and thinking and not (truncate_history_thinking and i < last_user):
                body = f"{THINK}\n{reasoning}\n{END_THINK}\n"
            else:
                body = f"{THINK}{END_THINK}"
            body += content
            for j, call in enumerate(m.get("tool_calls") or ()):
                body += ("\n" if content or j else "") + f"<tool_call>\n{format_tool_call(call)}\n</tool_call>"
            pieces += [(f"{IM_START}assistant\n", None), (body + IM_END, i), ("\n", None)]
        else:
            raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if add_generation_prompt:
        pieces.append((generation_prompt(thinking), None))
    return pieces


def render_text(messages: Sequence[dict], **kwargs) -> str:
    """The template's text, from the pieces (same keyword arguments as ``chat_pieces``)."""
    return "".join(text for text, _ in chat_pieces(messages, **kwargs))


def _encoder(tokenizer):
    """``text -> ids`` without BOS/EOS: a tandem ``Tokenizer`` as is, a transformers tokenizer with
    ``add_special_tokens=False``, or an ``_Memo`` already."""
    if isinstance(tokenizer, _Memo):
        return tokenizer
    if type(tokenizer).__module__.startswith("transformers"):
        return lambda text: tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode


class _Memo:
    """Remembers piece encodings within one conversation: its segments re-render the same pieces."""

    def __init__(self, tokenizer):
        self._encode, self._cache = _encoder(tokenizer), {}

    def __call__(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self._encode(text)
        return ids


def _encode_pieces(pieces: list[tuple[str, int | None]], tokenizer, trained: set[int] | None) -> dict:
    encode = _encoder(tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    prev = ""
    for text, turn in pieces:
        # Internal invariant: a boundary touches a special token on one side, so BPE cannot merge across it
        # and piece-wise encoding equals encoding the joined text.
        assert not prev or prev.endswith(_SPECIALS) or text.startswith(_SPECIALS), (prev[-20:], text[:20])
        piece = encode(text)
        ids += piece
        on = int(turn is not None and (trained is None or turn in trained))
        mask += [on] * len(piece)
        prev = text
    return {"input_ids": ids, "loss_mask": mask}


def _check_options(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")


def _trained_turns(messages: Sequence[dict], truncate_history_thinking: bool, train_on: str) -> set[int]:
    """Assistant turns a single rendering trains: those after the last user message when history is
    truncated (earlier ones lost their reasoning and are trained in their own sample) or when only the
    final answer is trained; every assistant turn otherwise."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    first = last_user + 1 if truncate_history_thinking or train_on == "final" else 0
    return {i for i, m in enumerate(messages) if i >= first and m.get("role") == "assistant"}


def render_chat(messages: Sequence[dict], tokenizer, *, tools: Sequence[dict] | None = None,
                enable_thinking: bool | None = True, truncate_history_thinking: bool = True,
                add_generation_prompt: bool = False, train_on: str = "all") -> dict[str, list[int]]:
    """One rendering of ``messages``: ``{"input_ids": [...], "loss_mask": [...]}`` (lists of equal length).

    Equal to ``tokenizer.encode(<chat template text>)`` with the same options. The loss mask covers the
    assistant turns this rendering trains (see ``_trained_turns``); a generation prompt is never trained.
    ``tokenizer``: a ``tandem.data_pipelines.tokenizer.Tokenizer``, a transformers tokenizer (encoded with
    ``add_special_tokens=False``), or anything whose ``encode(text)`` adds no BOS/EOS and maps
    special-token strings to their ids.
    """
    _check_options(train_on)
    pieces = chat_pieces(messages, tools=tools, enable_thinking=enable_thinking,
                         truncate_history_thinking=truncate_history_thinking,
                         add_generation_prompt=add_generation_prompt)
    return _encode_pieces(pieces, tokenizer, _trained_turns(messages, truncate_history_thinking, train_on))


def render_prompt(messages: Sequence[dict], tokenizer, *, tools: Sequence[dict] | None = None,
                  enable_thinking: bool | None = True, truncate_history_thinking: bool = True) -> list[int]:
    """Prompt ids for generation: the conversation followed by the generation prompt of its mode
    (``<|im_start|>assistant\\n<think>\\n`` with reasoning ON, ``...<think></think>`` OFF)."""
    return render_chat(messages, tokenizer, tools=tools, enable_thinking=enable_thinking,
                       truncate_history_thinking=truncate_history_thinking, add_generation_prompt=True)["input_ids"]


def segment_ends(messages: Sequence[dict]) -> list[int]:
    """End indices (exclusive) of the user-delimited segments: a segment ends before each user message
    that follows an assistant turn of the current segment, and the last one at the end."""
    ends, seen_assistant = [], False
    for i, m in enumerate(messages):
        if m.get("role") == "user" and seen_assistant:
            ends.append(i)
            seen_assistant = False
        elif m.get("role") == "assistant":
            seen_assistant = True
    ends.append(len(messages))
    return ends


def render_sft_samples(messages: Sequence[dict], tokenizer, *, tools: Sequence[dict] | None = None,
                       enable_thinking: bool | None = True, truncate_history_thinking: bool = True,
                       train_on: str = "all", merge_prefixes: bool = True) -> list[dict[str, list[int]]]:
    """Training samples of one conversation, each ``{"input_ids", "loss_mask"}`` (see the module docstring).

    ``truncate_history_thinking=True``: one sample per user-delimited segment (``segment_ends``), each the
    template's rendering of its prefix, trained on the assistant turns after the prefix's last user message;
    ``train_on="final"`` keeps only the last. ``merge_prefixes`` folds a sample into the next when its ids are a
    prefix of the next one's (the union of their masks trains the same tokens once, in one sample).
    ``truncate_history_thinking=False``: one sample, trained on all assistant turns (``"all"``) or on those
    after the last user message (``"final"``). Segments without an assistant turn to train are skipped (a
    trailing user message after the last answer adds nothing; ``"final"`` then keeps the last segment that
    has an answer).
    """
    _check_options(train_on)
    tokenizer = _Memo(tokenizer)
    opts = dict(tools=tools, enable_thinking=enable_thinking, truncate_history_thinking=truncate_history_thinking)
    if not truncate_history_thinking:
        samples = [render_chat(messages, tokenizer, train_on=train_on, **opts)]
    elif train_on == "final":  # the last segment that has an assistant turn to train
        samples = []
        for end in reversed(segment_ends(messages)):
            samples = [render_chat(messages[:end], tokenizer, **opts)]
            if any(samples[0]["loss_mask"]):
                break
    else:
        samples = [render_chat(messages[:end], tokenizer, **opts) for end in segment_ends(messages)]
    samples = [s for s in samples if any(s["loss_mask"])]
    if merge_prefixes and len(samples) > 1:
        merged = [samples[-1]]
        for s in reversed(samples[:-1]):
            nxt = merged[-1]
            n = len(s["input_ids"])
            if nxt["input_ids"][:n] == s["input_ids"]:
                nxt["loss_mask"][:n] = [a | b for a, b in zip(s["loss_mask"], nxt["loss_mask"][:n])]
            else:
                merged.append(s)
        samples = merged[::-1]
    return samples
