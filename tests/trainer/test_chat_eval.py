"""The reasoning-mode check used by `make smoke` (trainer/inference/chat_eval.py)."""

import json

from tandem.data_pipelines.tokenizer import load_tokenizer
from tandem.model import HybridConfig, HybridLM
from tandem.trainer.inference import chat_eval
from tandem.trainer.inference.engine import ThinkTokens


def test_classify_reasoning_on_and_off():
    tok = load_tokenizer()
    think, im_end = ThinkTokens.from_tokenizer(tok), tok.token_to_id("<|im_end|>")

    def verdict(text, thinking):
        return chat_eval.classify(tok.encode(text), thinking, think, im_end, tok.decode)["well_formed"]

    assert verdict("1 + 2 = 3\n</think>\nThe answer is 3.<|im_end|>", True)
    assert not verdict("1 + 2 = 3\n</think>\nThe answer is 3.", True)            # never ended the turn
    assert not verdict("</think>\nThe answer is 3.<|im_end|>", True)             # empty reasoning
    assert not verdict("1 + 2 = 3\nThe answer is 3.<|im_end|>", True)            # reasoning never closed
    assert not verdict("a\n</think>\nb</think>c<|im_end|>", True)                # two closings
    assert not verdict("1 + 2 = 3\n</think>\n<|im_end|>", True)                  # no answer
    assert verdict("The answer is 3.<|im_end|>", False)
    assert not verdict("<think>x</think>The answer is 3.<|im_end|>", False)      # reasoning in OFF mode
    assert not verdict("x\n</think>\nThe answer is 3.<|im_end|>", False)
    assert not verdict("<|im_end|>", False)


def test_cli_writes_a_report_and_gates_on_the_rate(tmp_path, capsys):
    HybridLM(HybridConfig.preset("tiny"), init_seed=0).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "report.json"
    rc = chat_eval.main([str(tmp_path / "ckpt"), "--prompts", "4", "--max-new-tokens", "6", "--out", str(out),
                         "--min-well-formed", "0.9"])
    report = json.loads(out.read_text())
    assert report["summary"]["on"]["prompts"] == report["summary"]["off"]["prompts"] == 2
    # an untrained model does not follow the template: the gate fails, and says so
    assert rc == 1 and report["summary"]["on"]["well_formed"] < 0.9
    assert "reasoning ON" in capsys.readouterr().out
    assert all(len(r["text"]) > 0 for r in report["replies"])
