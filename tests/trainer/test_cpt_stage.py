"""The cpt stage: config checks naming the key, rows of the long/short mixture through the indexed-dataset path,
exact resume from the consumed rows, run.extend refused, and the long-context evaluation it ends with
(long_eval.json with the baseline and the final weights; the --check gate)."""

import json

import pytest

from tandem.model import HybridConfig, HybridLM
from tandem.data_pipelines.long_context import generate_examples, write_jsonl
from tandem.data_pipelines.preprocess import preprocess
from tandem.data_pipelines.smoke_data import write_smoke_corpus
from tandem.data_pipelines.tokenizer import load_tokenizer
from tandem.trainer.config import ConfigError
from tandem.trainer.data import DataError
from tandem.trainer.inference import long_eval
from tandem.trainer.run import run, validate

from .conftest import compose_recipe, read_records
from .test_data_resume import _rewind


@pytest.fixture(scope="module")
def cpt_data(tmp_path_factory):
    """A corpus of smoke documents (their needles included), tandem-preprocess'd: the long and the short
    source read the same prefix here (at different lengths), which keeps the test to one preprocessing."""
    root = tmp_path_factory.mktemp("cpt_data")
    write_smoke_corpus(root / "short.jsonl", n_docs=40, seed=0)
    preprocess(root / "short.jsonl", root / "short", progress=False, log=lambda *a: None)
    # and short needle documents, several whole ones per 128-token row (the completion-only loss)
    write_jsonl(root / "needles.jsonl", generate_examples("needle", lengths=[40, 60], depths=[0.0, 0.5, 1.0],
                                                          per_cell=8, seed=1, tokenizer=load_tokenizer(), value_digits=1))
    preprocess(root / "needles.jsonl", root / "needles", progress=False, log=lambda *a: None)
    return root


def _cfg(data, run_dir, *extra):
    return compose_recipe("smoke_cpt", _overrides(data, run_dir, *extra))


def _overrides(data, run_dir, *extra):
    return [
        "model.preset=tiny", "model.init_from=null", f"data.blend=[{{path: 'indexed:{data / 'short'}', weight: 1.0}}]",
        f"stage.cpt.long=[{{path: 'indexed:{data / 'short'}', weight: 1.0}}]",
        "stage.cpt.long_length=64", "stage.cpt.short_length=32", "stage.cpt.long_fraction=0.5",
        "stage.steps=4", "stage.global_batch=4", "stage.micro_batch=2", "stage.save_every=2",
        "stage.cpt.eval_tasks=[needle]", "stage.cpt.eval_lengths=[48,96]", "stage.cpt.eval_depths=[0.0,1.0]",
        "stage.cpt.eval_per_cell=1", "stage.cpt.eval_max_new_tokens=4", "stage.cpt.eval_prefill_chunk=40",
        "stage.cpt.long_loss=all", "logger.log_every=1", "logger.progress_bar=false", "optim.warmup_steps=1",
        f"run.dir={run_dir}", *extra]


@pytest.mark.parametrize("override, message", [
    ("stage.cpt.long_length=100", r"stage\.cpt\.long_length must be a multiple of stage\.cpt\.short_length \(128\)"),
    ("stage.cpt.long_fraction=1.5", r"stage\.cpt\.long_fraction must be in \[0, 1\]"),
    ("stage.cpt.long=[]", r"stage\.cpt\.long must list the long sources"),
    ("stage.cpt.eval_tasks=[haystack]", r"stage\.cpt\.eval_tasks must list tasks of"),
    ("stage.cpt.short_length=0", r"stage\.cpt\.short_length must be >= 1"),
    ("stage.cpt.long_loss=answer", r"stage\.cpt\.long_loss must be one of \['all', 'answers'\], got 'answer'"),
    ("stage.cpt.answer_marker=''", r"stage\.cpt\.answer_marker must be the text that precedes each answer"),
])
def test_bad_cpt_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_recipe("smoke_cpt", [override]))


def test_missing_long_source_names_the_key(cpt_data, tmp_path):
    cfg = _cfg(cpt_data, tmp_path / "r", f"stage.cpt.long=[{{path: 'indexed:{tmp_path / 'nope'}', weight: 1.0}}]")
    with pytest.raises(DataError, match=r"stage\.cpt\.long\[0\]\.path"):
        run(cfg)
    assert not (tmp_path / "r").exists()


def test_answers_loss_without_answers_is_one_data_error(cpt_data, tmp_path):
    """long_loss=answers with a marker the long documents do not hold would train nothing on long rows."""
    cfg = _cfg(cpt_data, tmp_path / "r", "stage.cpt.long_loss=answers", "stage.cpt.answer_marker='Zebra:'",
               f"stage.cpt.long=[{{path: 'indexed:{cpt_data / 'needles'}', weight: 1.0}}]", "stage.cpt.long_length=128")
    with pytest.raises(DataError, match=r"stage\.cpt\.long_loss=answers: none of the first \d+ long rows holds an "
                                        r"answer after stage\.cpt\.answer_marker='Zebra:'"):
        run(cfg)
    assert not (tmp_path / "r").exists()


def test_cpt_trains_resumes_exactly_and_evaluates(cpt_data, tmp_path):
    init = tmp_path / "init"  # the weights CPT starts from (model.init_from), in the released layout
    HybridLM(HybridConfig.preset("tiny"), init_seed=3).save_pretrained(init)
    run_dir = tmp_path / "cpt"
    run(_cfg(cpt_data, run_dir, f"model.init_from={init}", "model.preset=init_from"))
    records = read_records(run_dir)
    assert [r["stage"] for r in records] == ["cpt"] * 4
    # every row is 64 real tokens; the long share of the target tokens is the configured half
    assert [r["tokens"] for r in records] == [4 * 64 * (i + 1) for i in range(4)]
    assert sum(r["cpt/long_share"] for r in records) / 4 == pytest.approx(0.5, abs=0.05)
    doc = json.loads((run_dir / "long_eval.json").read_text())
    assert doc["trained_length"] == 64 and doc["baseline"]["checkpoint"] == str(init)
    for key in ("baseline", "final"):
        needle = doc[key]["tasks"]["needle"]
        assert needle["n"] == 4 and {k: v["n"] for k, v in needle["by_length"].items()} == {"48": 2, "96": 2}
        assert len(needle["cells"]) == 4 and 0.0 <= needle["accuracy"] <= 1.0
    # the gate reads the file: the gain at a length, pass / fail around it, a length not evaluated is an error
    by_len = lambda k: doc[k]["tasks"]["needle"]["by_length"]["96"]["accuracy"]  # noqa: E731
    gain = by_len("final") - by_len("baseline")
    assert long_eval.main([str(run_dir), "--check", "--length", "96", "--min-gain", str(gain - 0.01)]) == 0
    assert long_eval.main([str(run_dir), "--check", "--length", "96", "--min-gain", str(gain + 0.01)]) == 1
    assert long_eval.main([str(run_dir), "--check"]) == 2  # the trained length (64) was not evaluated

    # stopped after step 2: resuming reads the mixture from row 2 x 4 and repeats the losses exactly
    _rewind(run_dir, 2, records)
    run(_cfg(cpt_data, run_dir, f"model.init_from={init}", "model.preset=init_from", "stage.cpt.eval_per_cell=0"))
    assert [r["loss"] for r in read_records(run_dir)] == [r["loss"] for r in records]
    with pytest.raises(DataError, match="cannot be extended"):
        run(_cfg(cpt_data, run_dir, f"model.init_from={init}", "model.preset=init_from", "stage.steps=6",
                 "run.extend=true"))


def test_needle_value_digits_and_eval_task_options():
    tok = load_tokenizer()
    ex = generate_examples("needle", lengths=[200], depths=[0.5], per_cell=3, seed=0, tokenizer=tok, value_digits=1)
    for e in ex:
        assert len(e.answer) == 1 and sum(ch.isdigit() for ch in e.context) == 1 + 2  # the value and the key's 2
        assert e.check(f" {e.answer}.") and not e.check(" 12")
    with pytest.raises(ValueError, match="value_digits"):
        generate_examples("needle", lengths=[64], depths=[0.5], tokenizer=tok, value_digits=0)
    settings = long_eval.LongEvalSettings(tasks=["kv_retrieval"], options={"needle": {"value_digits": 1}})
    with pytest.raises(ValueError, match="options names tasks that are not evaluated"):
        settings.validate()
    with pytest.raises(ConfigError, match=r"stage\.cpt\.eval_task_options\.needle may set only \['value_digits'\]"):
        validate(compose_recipe("smoke_cpt", ["+stage.cpt.eval_task_options.needle.digits=1"]))


@pytest.mark.slow
def test_cpt_under_context_parallelism_equals_one_process(cpt_data, tmp_path):
    """parallel.cp=2 (2 gloo processes): the CP split applies to the CPT rows (stage.cpt.long_length, not
    data.seq_len, is what must divide by 2·CP) and the losses and gradient norms equal one process's. With
    the completion-only loss of the smoke recipe (``long_loss=answers``: needle documents train on their
    answers, weighted), so the per-token weights are split and normalised alike too."""
    from .conftest import run_cli, run_torchrun

    def args(run_dir):
        return ["-cn", "smoke_cpt", *_overrides(cpt_data, run_dir, "stage.steps=2", "stage.save_every=0",
                                               "stage.cpt.eval_per_cell=0", "model.moe_aux_loss_coeff=0.01",
                                               "stage.cpt.long_length=128", "stage.cpt.long_loss=answers",
                                               f"stage.cpt.long=[{{path: 'indexed:{cpt_data / 'needles'}', weight: 1.0}}]")]

    one = run_cli(*args(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    cp = run_torchrun(*args(tmp_path / "cp"), "parallel=cp2")
    assert cp.returncode == 0, cp.stderr[-3000:]
    a, b = read_records(tmp_path / "one"), read_records(tmp_path / "cp")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"] and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * x["grad_norm"]
        assert x["tokens"] == y["tokens"] and x["target_tokens"] == y["target_tokens"]
    assert all(r["cpt/answer_share"] > 0 for r in a)  # answers were trained (weights other than 1)
