"""Build the small byte-level BPE tokenizer that tandem ships (``data_pipelines/assets/tokenizer``).

    python -m tandem.data_pipelines.build_tokenizer --out data_pipelines/assets/tokenizer --vocab-size 512

The training text is generated here from a fixed seed (no download), so the build is reproducible: the
same vocabulary size and seed give a byte-identical ``tokenizer.json``. Byte-level BPE can encode any
string (every byte has a token), so the tokenizer is usable on arbitrary text even though it was trained
on a small synthetic corpus; it is meant for tests and the smoke recipe, not for quality.

Ids 0/1/2 are pad/bos/eos, matching the NemotronH config defaults (``pad_token_id=0``,
``bos_token_id=1``, ``eos_token_id=2``); the chat-template tokens follow (as the released tokenizer defines them). The
Jinja chat template (``assets/chat_template.jinja``) is written into ``tokenizer_config.json`` as
``chat_template``, so ``transformers.AutoTokenizer`` applies it.
The vocabulary size defaults to 512 = the ``tiny`` model preset's ``vocab_size``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHAT_TEMPLATE_PATH = Path(__file__).parent / "assets" / "chat_template.jinja"

# Order fixes the ids: pad 0, bos 1, eos 2 (NemotronH defaults), then the chat-template tokens.
SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>",
    "<|im_start|>", "<|im_end|>",
    "<think>", "</think>",
    "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>",
]
PAD, BOS, EOS = SPECIAL_TOKENS[:3]

_WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much before go good new write our used me "
    "man too any day same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away again off went "
    "old number great tell men say small every found still between name should home big give air line "
    "set own under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house world going want school important "
    "until form food keep children feet land side without boy once animals life enough took four head "
    "above kind began almost live page got earth need far hand high year mother light country father let "
    "night picture being study second soon story since white ever paper hard near sentence better best "
    "across during today however sure knew try told young sun thing whole hear example heard several "
    "change answer room sea against top turned learn point city play toward five himself usually money "
    "seen model data train token layer state memory value key document question reason step tool call "
    "result check true false list table code function return number sum count find needle hidden"
).split()

_NAMES = "Ada Boris Chen Dana Emil Farah Goro Hana Ivan Jonas Kira Lena Mateo Nia Omar Priya".split()


def random_sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), rng.choice(_NAMES))
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!", ","])


def _snippet(rng: random.Random) -> str:
    """Other shapes the smoke data and synthetic tasks produce: key-value facts, JSON, code, chat."""
    kind = rng.randrange(5)
    key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6))
    val = rng.randint(0, 999999)
    if kind == 0:
        return f"The value of key {key} is {val}."
    if kind == 1:
        return json.dumps({"id": rng.randint(0, 999), "text": random_sentence(rng), "score": round(rng.random(), 3)})
    if kind == 2:
        return f"def f_{key}(x):\n    return x * {val % 97} + {val % 13}\n"
    if kind == 3:
        return (f"<|im_start|>user\n{random_sentence(rng)}<|im_end|>\n<|im_start|>assistant\n<think>\n"
                f"{random_sentence(rng)}\n</think>\n{random_sentence(rng)}<|im_end|>\n")
    return f"{rng.choice(_NAMES)} has {val % 50} apples and gives {val % 7} to {rng.choice(_NAMES)}."


def training_corpus(seed: int = 0, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    return [(" ".join(random_sentence(rng) for _ in range(rng.randint(1, 4))) if rng.random() < 0.7 else _snippet(rng))
            for _ in range(n_lines)]


def build(out_dir: str | Path, vocab_size: int = 512, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 byte tokens and "
                         f"{len(SPECIAL_TOKENS)} special tokens; use at least {256 + len(SPECIAL_TOKENS)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Offsets only; no automatic BOS/EOS: the preprocessing pipeline appends EOD itself.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(seed), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    # tokenizer_config.json / special_tokens_map.json let transformers' AutoTokenizer load the folder
    # as a PreTrainedTokenizerFast with the right bos/eos/pad.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,
        # One source of truth: data_pipelines/assets/chat_template.jinja (data_pipelines/chat.py renders
        # the same tokens piece by piece; see docs/SFT.md).
        "chat_template": CHAT_TEMPLATE_PATH.read_text(),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
         "additional_special_tokens": SPECIAL_TOKENS[3:]}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "assets" / "tokenizer"))
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = build(args.out, args.vocab_size, args.seed)
    print(f"wrote {out}/tokenizer.json (vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
