"""The terminal chat command: prompt rendering, one-shot and REPL, HF and run-checkpoint sources."""

import io

from tandem.data_pipelines.tokenizer import load_tokenizer
from tandem.model import HybridConfig, HybridLM
from tandem.trainer.inference.cli import chat_main, render_generation_prompt
from tandem.trainer.inference.engine import GenerationEngine, SamplingParams


def test_prompt_follows_the_generation_template():
    tok = load_tokenizer()
    on = render_generation_prompt(tok, [{"role": "user", "content": "hi there"}], think=True, system="be brief")
    assert tok.decode(on) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n"
                              "<|im_start|>assistant\n<think>\n")
    off = render_generation_prompt(
        tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        think=False)
    assert tok.decode(off) == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
                               "<|im_start|>assistant\n<think></think>b<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
                               "<|im_start|>assistant\n<think></think>")
    assert on[-2:] == [5, 209] and off[-2:] == [5, 6]  # <think> \n  |  <think></think>


def _save_tiny(path):
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    model.save_pretrained(path)
    return model


def test_one_shot_prompt_matches_the_engine(tmp_path, capsys):
    model = _save_tiny(tmp_path / "hf")
    out = io.StringIO()
    assert chat_main([str(tmp_path / "hf"), "--prompt", "hello", "--no-think", "--greedy", "--max-new-tokens", "6"],
                     stdout=out) == 0
    tok = load_tokenizer()
    ids = render_generation_prompt(tok, [{"role": "user", "content": "hello"}], think=False)
    res = GenerationEngine(model.eval()).generate([ids], SamplingParams(max_new_tokens=6, greedy=True, stop_token_ids=(4, 2)))[0]
    expect = tok.decode([t for t in res.tokens if t not in (4, 2)]).strip()
    assert out.getvalue() == expect + "\n"
    assert "tokens" in capsys.readouterr().err


def test_repl_on_a_run_checkpoint(tmp_path, capsys):
    step = tmp_path / "run" / "checkpoints" / "step_00000003"
    _save_tiny(step / "model")
    (step / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000003")
    out = io.StringIO()
    stdin = io.StringIO("first\n\n/reset\nsecond\n/quit\nnever\n")
    rc = chat_main([str(tmp_path / "run"), "--think", "--thinking-budget", "2", "--thinking-grace", "2",
                    "--max-new-tokens", "8", "--seed", "0", "--top-k", "20"], stdin=stdin, stdout=out)
    assert rc == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(notes) == 2  # one reply per non-empty turn before /quit
    assert all(n.startswith("[8 tokens") or ", stop" in n for n in notes)
