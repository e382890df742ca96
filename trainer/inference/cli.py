"""``tandem generate``: chat with a checkpoint in the terminal (one-shot ``--prompt`` or a REPL on stdin).

    python -m tandem.trainer.inference.cli CKPT --prompt "What is 2+3?" --think --thinking-budget 256
    python -m tandem.trainer.inference.cli runs/sft --no-think --temperature 0.7 --top-p 0.9      # REPL

``CKPT`` is a Hugging Face NemotronH directory (``config.json`` + safetensors) or a tandem run
checkpoint (a run dir, its ``checkpoints/`` dir or a ``step_*`` dir; the ``latest`` one is used).
In the REPL each line is a user turn; ``/reset`` clears the conversation, ``/quit`` or EOF ends it.
Earlier assistant turns are kept in the history with their reasoning; the chat template renders them
as ``<think></think>`` + answer (``truncate_history_thinking``), exactly as SFT trained.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import TextIO

import torch

from tandem.data_pipelines.chat import render_prompt
from tandem.data_pipelines.tokenizer import load_tokenizer
from tandem.model import HybridLM
from tandem.model.checkpoint_io import CheckpointError
from tandem.trainer.checkpoint import weights_dir
from tandem.trainer.checkpoint.tokenizer_files import saved_tokenizer

from .engine import DEFAULT_PREFILL_CHUNK, GenerationEngine, SamplingParams, ThinkTokens

__all__ = ["chat_main", "chat_stop_tokens", "checkpoint_tokenizer", "render_generation_prompt", "load_model"]


def render_generation_prompt(tok, messages: list[dict], *, think: bool, system: str = "") -> list[int]:
    """Prompt ids for the assistant's next turn: :func:`tandem.data_pipelines.chat.render_prompt` (the chat
    template's token-level renderer, so the prompt is exactly what SFT trained on) with ``system`` as the
    system message; ``think`` is ``enable_thinking`` (``/think`` / ``/no_think`` in the text still win).
    """
    if any(m.get("role") == "system" for m in messages):
        raise ValueError("pass the system prompt as system=..., not as a message")
    return render_prompt([{"role": "system", "content": system}, *messages], tok, enable_thinking=think)


def chat_stop_tokens(tok) -> tuple[int, ...]:
    """Ids that end an assistant turn: ``<|im_end|>`` (when the tokenizer has it) and the eos."""
    return tuple(sorted(t for t in {tok.token_to_id("<|im_end|>"), tok.eod} if t is not None))


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu") -> HybridLM:
    """An HF-layout directory, or a tandem run checkpoint (→ its ``model/`` directory)."""
    return HybridLM.from_pretrained(weights_dir(path), dtype=dtype, device=device).eval()


def checkpoint_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer saved with checkpoint ``path`` (its weights folder), or None (the shipped one) for a
    checkpoint without tokenizer files."""
    return saved_tokenizer(weights_dir(path))


def _split_answer(tok, think: ThinkTokens, tokens: list[int], stop: set[int]) -> tuple[str, str]:
    """(reasoning, answer) texts of generated ``tokens`` (stop token dropped)."""
    if tokens and tokens[-1] in stop:
        tokens = tokens[:-1]
    if think.think_end in tokens:
        i = tokens.index(think.think_end)
        return tok.decode(tokens[:i]).strip(), tok.decode(tokens[i + 1 :]).strip()
    return "", tok.decode(tokens).strip()


#: the ``--dtype`` choices (names of torch dtypes)
DTYPES = ("float32", "bfloat16", "float16")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with each option's default where it has one (not for flags or unset options), the
    description and examples kept as written, and room for the option names."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=28, width=min(100, shutil.get_terminal_size().columns))

    def _get_help_string(self, action):
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if not flag and action.default not in (None, "", argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input (argparse would print the usage first)
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _error(message: str) -> int:
    print(f"tandem generate: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def chat_main(argv: list[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Returns the exit status: 0, or 2 on bad input (one line on stderr naming the file or option)."""
    p = _Parser(prog="tandem generate", formatter_class=HelpFormatter,
                description="Chat with a checkpoint: one reply to --prompt, or a conversation read from stdin\n"
                            "(one user turn per line; /reset clears it, /quit or EOF ends it).",
                epilog="examples:\n"
                       "  tandem generate runs/smoke/sft --prompt 'What is 12 + 34?' --show-reasoning\n"
                       "  tandem generate runs/smoke/sft --no-think --temperature 0.7 --top-p 0.9   # a REPL\n\n"
                       "exit status: 0, or 2 on bad input (one line naming the file or option). docs/GENERATION.md")
    p.add_argument("checkpoint", help="a tandem run dir (its latest checkpoint), checkpoints/ or step_* dir, or an "
                                      "HF NemotronH directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: the one saved with "
                                                     "the checkpoint, else the shipped one)")
    p.add_argument("--prompt", default=None, help="one user message; without it, read turns from stdin")
    p.add_argument("--system", default="", help="system prompt (the system block is always emitted)")
    p.add_argument("--think", dest="think", action="store_true", default=True, help="reasoning ON (the default)")
    p.add_argument("--no-think", dest="think", action="store_false", help="reasoning OFF (an empty <think></think>)")
    p.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="reasoning tokens before </think> is forced at the next newline (none: unlimited)")
    p.add_argument("--thinking-grace", type=int, default=500, metavar="N",
                   help="reasoning tokens past the budget without a newline before </think> is forced at once")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="per reply, reasoning included")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--greedy", action="store_true", help="always the most likely token (ignores the sampling options)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (none: random)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights dtype (none: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="prompt tokens per prefill forward (0: the whole prompt at once); long prompts never "
                        "hold full-length activations")
    p.add_argument("--show-reasoning", action="store_true", help="print the reasoning as well as the answer")
    args = p.parse_args(argv)
    if args.prefill_chunk < 0:
        return _error(f"--prefill-chunk must be >= 0 (0: no chunking), got {args.prefill_chunk}")
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    try:
        saved = None if args.tokenizer else checkpoint_tokenizer(args.checkpoint)
        tok = load_tokenizer(args.tokenizer or saved)
        think_ids = ThinkTokens.from_tokenizer(tok)
    except (OSError, ValueError) as e:
        return _error(f"--tokenizer: {e}")
    except CheckpointError as e:
        return _error(e)
    stop = chat_stop_tokens(tok)
    try:
        model = load_model(args.checkpoint, dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device)
    except CheckpointError as e:
        return _error(e)
    if model.config.vocab_size < tok.vocab_size:
        return _error(f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}; "
                      f"pass the checkpoint's tokenizer with --tokenizer")
    if args.tokenizer is None and saved is None and model.config.vocab_size != tok.vocab_size:
        # an older checkpoint (or a release without tokenizer files): the shipped tokenizer may not be its own
        print(f"tandem generate: warning: {args.checkpoint} has no tokenizer saved with it; using the shipped one "
              f"({tok.vocab_size} ids, the model has {model.config.vocab_size}); pass its tokenizer with --tokenizer",
              file=sys.stderr)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        greedy=args.greedy, seed=args.seed, stop_token_ids=stop, thinking_budget=args.thinking_budget,
        thinking_grace=args.thinking_grace,
    )
    engine = GenerationEngine(model, max_batch=1, prefill_chunk=args.prefill_chunk or None)

    def reply(messages: list[dict]) -> dict:
        ids = render_generation_prompt(tok, messages, think=args.think, system=args.system)
        res = engine.generate([ids], params, think_ids=think_ids)[0]
        reasoning, answer = _split_answer(tok, think_ids, res.tokens, set(stop))
        if args.show_reasoning and reasoning:
            print(f"<think>\n{reasoning}\n</think>", file=stdout)
        print(answer, file=stdout)
        note = f"[{len(res.tokens)} tokens, {res.finish_reason}"
        if res.reasoning_tokens:
            note += f", {res.reasoning_tokens} reasoning"
        if res.thinking_forced:
            note += f", thinking closed by the budget ({res.thinking_forced})"
        print(note + "]", file=sys.stderr)
        stdout.flush()
        turn = {"role": "assistant", "content": answer}
        if reasoning:
            turn["reasoning_content"] = reasoning
        return turn

    if args.prompt is not None:
        reply([{"role": "user", "content": args.prompt}])
        return 0
    history: list[dict] = []
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        history.append(reply(history))


if __name__ == "__main__":
    raise SystemExit(chat_main())
