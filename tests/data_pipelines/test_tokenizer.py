import json

import pytest

from tandem.data_pipelines import build_tokenizer
from tandem.data_pipelines.tokenizer import CHAT_SPECIAL_TOKENS, SHIPPED_TOKENIZER_DIR, load_tokenizer


def test_shipped_ids_match_nemotronh_and_tiny_preset(tok):
    from tandem.model import HybridConfig

    cfg = HybridConfig.preset("tiny")
    assert tok.vocab_size == cfg.vocab_size == 512
    assert (tok.pad, tok.bos, tok.eod) == (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    ids = [tok.token_to_id(t) for t in CHAT_SPECIAL_TOKENS]
    assert ids == list(range(3, 11))


@pytest.mark.parametrize("backend", ["tokenizers", "transformers"])
def test_round_trip_and_special_tokens_are_single_ids(backend):
    t = load_tokenizer(backend=backend)
    text = "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<think>\nadd</think>42 — naïve 日本 😀\t\n"
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert ids[0] == t.token_to_id("<|im_start|>")
    for special in ("<|im_end|>", "<think>", "</think>"):
        assert t.token_to_id(special) in ids
    assert t.eod not in ids and t.bos not in ids  # nothing is added implicitly
    assert max(ids) < t.vocab_size
    assert t.encode_batch([text, "x"]) == [ids, t.encode("x")]


def test_both_backends_agree_and_identifiers_serialise():
    a, b = load_tokenizer(backend="tokenizers"), load_tokenizer(backend="transformers")
    text = "The value of key q7x2 is 998877. <tool_call>{\"a\": 1}</tool_call>"
    assert a.encode(text) == b.encode(text)
    assert (a.vocab_size, a.eod, a.pad) == (b.vocab_size, b.eod, b.pad)
    assert a.unique_identifiers["vocab_sha256"] == b.unique_identifiers["vocab_sha256"]
    json.dumps(a.unique_identifiers)


def test_build_is_reproducible(tmp_path):
    out = build_tokenizer.build(tmp_path / "tok", vocab_size=512, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the config carries the chat template
        assert (out / name).read_bytes() == (SHIPPED_TOKENIZER_DIR / name).read_bytes(), name
    bigger = load_tokenizer(build_tokenizer.build(tmp_path / "tok1k", vocab_size=1024))
    assert bigger.vocab_size == 1024 and bigger.eod == 2


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(eod_token="<no-such-token>")
    with pytest.raises(ValueError, match="cannot hold"):
        build_tokenizer.build(tmp_path / "small", vocab_size=100)
    assert load_tokenizer(eod_token="<|im_end|>").eod == 4
