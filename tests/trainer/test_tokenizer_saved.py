"""The tokenizer travels with the weights: saved in every checkpoint and export, used by default by
``tandem generate``, ``chat_eval`` and a stage started with ``model.init_from``.

The run's tokenizer here is the shipped one plus one added token (513 ids), standing in for a release
whose vocabulary differs from the shipped 512 ids: before, generation silently used the shipped one.
"""

import json
import shutil

import pytest

from tandem.data_pipelines import sft_synthetic
from tandem.data_pipelines.tokenizer import SHIPPED_TOKENIZER_DIR, load_tokenizer
from tandem.model.checkpoint_io import CheckpointError
from tandem.trainer.checkpoint import resolve_checkpoint
from tandem.trainer.checkpoint.export import export_checkpoint
from tandem.trainer.inference import chat_eval, cli as generate_cli
from tandem.trainer.run import run

from .conftest import compose_recipe

SFT_RUN = [
    "stage.steps=1", "stage.global_batch=2", "stage.micro_batch=2", "stage.eval_every=0", "stage.eval_batches=0",
    "data.seq_len=96", "logger.progress_bar=false", "optim.warmup_steps=1", "model.preset=tiny", "model.vocab_size=520",
]


@pytest.fixture(scope="module")
def own_tokenizer(tmp_path_factory):
    """The shipped tokenizer folder with one more added token: 513 ids."""
    folder = tmp_path_factory.mktemp("tok") / "release_tokenizer"
    shutil.copytree(SHIPPED_TOKENIZER_DIR, folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": 512, "content": "<|extra|>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    assert load_tokenizer(folder).vocab_size == 513
    return folder


@pytest.fixture(scope="module")
def sft_run(own_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    data = sft_synthetic.write(root / "train.jsonl", 16, seed=0)
    run(compose_recipe("smoke_sft", [*SFT_RUN, "model.init_from=null", f"data.chat.train=[{data}]",
                                     f"data.chat.tokenizer={own_tokenizer}", f"run.dir={root / 'run'}"]))
    return root


def test_checkpoint_and_export_hold_the_run_tokenizer(sft_run, own_tokenizer, tmp_path):
    model_dir = resolve_checkpoint(sft_run / "run") / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (model_dir / name).read_bytes() == (own_tokenizer / name).read_bytes(), name
    assert "chat_template" in json.loads((model_dir / "tokenizer_config.json").read_text())
    assert load_tokenizer(model_dir).vocab_size == 513

    out = export_checkpoint(sft_run / "run", tmp_path / "export")
    assert (out / "tokenizer.json").read_bytes() == (own_tokenizer / "tokenizer.json").read_bytes()
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    export_checkpoint(sft_run / "run", out)  # again into the same folder: the same files, fine
    # a different tokenizer file already there is never replaced
    (out / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="tokenizer.json: differs from the tokenizer file"):
        export_checkpoint(sft_run / "run", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_generate_and_chat_eval_default_to_the_saved_tokenizer(sft_run, monkeypatch, capsys):
    seen = []

    def recording(path=None, **kw):
        seen.append(path)
        return load_tokenizer(path, **kw)

    monkeypatch.setattr(generate_cli, "load_tokenizer", recording)
    monkeypatch.setattr(chat_eval, "load_tokenizer", recording)
    assert generate_cli.chat_main([str(sft_run / "run"), "--prompt", "hi", "--max-new-tokens", "2", "--greedy"]) == 0
    chat_eval.evaluate(sft_run / "run", prompts=2, max_new_tokens=2)
    model_dir = resolve_checkpoint(sft_run / "run") / "model"
    assert seen == [model_dir, model_dir]
    # --tokenizer still wins
    assert generate_cli.chat_main([str(sft_run / "run"), "--tokenizer", str(SHIPPED_TOKENIZER_DIR), "--prompt", "hi",
                                   "--max-new-tokens", "1"]) == 0
    assert seen[-1] == str(SHIPPED_TOKENIZER_DIR)


def test_init_from_uses_the_saved_tokenizer(sft_run, tmp_path):
    data = sft_run / "train.jsonl"
    run(compose_recipe("smoke_sft", [*SFT_RUN, f"model.init_from={sft_run / 'run'}", "model.preset=init_from",
                                     f"data.chat.train=[{data}]", f"run.dir={tmp_path / 'next'}"]))
    written = (tmp_path / "next" / "config.yaml").read_text()
    assert f"tokenizer: {resolve_checkpoint(sft_run / 'run') / 'model'}" in written
    assert load_tokenizer(resolve_checkpoint(tmp_path / "next") / "model").vocab_size == 513


def test_finetune_from_release_quick_start(sft_run, tmp_path, caplog):
    """docs/SFT.md's one-machine quick start, on an export of a tiny run (weights, config, tokenizer), for 1 of
    its steps and no evaluation; with 16 conversations its 8-row steps repeat each packed row: the stage says so."""
    import logging
    import re
    import shlex

    from .conftest import REPO, read_records

    doc = (REPO / "docs" / "SFT.md").read_text()
    line = next(l for l in doc.splitlines() if "-cn finetune_from_release" in l and l.startswith(".venv/bin/"))
    words = shlex.split(line)
    overrides = [w for w in words[words.index("finetune_from_release") + 1:]
                 if not w.startswith(("model.init_from=", "data.chat.train=", "stage.steps=", "stage.eval_every="))]
    assert "parallel=single" in overrides and any(re.match(r"data\.seq_len=\d+$", w) for w in overrides)
    release = export_checkpoint(sft_run / "run", tmp_path / "release")
    caplog.set_level(logging.WARNING)
    run(compose_recipe("finetune_from_release", [
        *overrides, f"model.init_from={release}", f"data.chat.train=[{sft_run / 'train.jsonl'}]", "stage.steps=1",
        "stage.eval_every=0", "stage.eval_batches=0", "logger.progress_bar=false", f"run.dir={tmp_path / 'ft'}"]))
    assert read_records(tmp_path / "ft")[-1]["step"] == 1
    assert any("packed rows about" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_generate_warns_when_a_checkpoint_has_no_tokenizer(sft_run, tmp_path, capsys):
    """An older checkpoint (no tokenizer files) whose vocabulary differs from the shipped tokenizer's: the
    fallback is said on stderr, not silent."""
    old = tmp_path / "old"
    shutil.copytree(resolve_checkpoint(sft_run / "run") / "model", old)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (old / name).unlink(missing_ok=True)
    assert generate_cli.chat_main([str(old), "--prompt", "hi", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "no tokenizer saved with it" in err and "520" in err, err
