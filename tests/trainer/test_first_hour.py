"""A new user's first hour: the README's commands (then docs/SFT.md's one-machine quick start) in the order
shown after ``make smoke``, Hydra multirun, ``--help``.

The commands are read from README.md and the Makefile themselves, so the test follows the docs as they are.
Composing them is cheap; training each would cost minutes, so the order test checks what made them fail
after ``make smoke`` (a run directory already holding another run, data that is not there) and one
multirun trains for real.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from tandem.recipes import RECIPES_DIR
from tandem.trainer.config import register_configs

from .conftest import REPO

TRAIN = re.compile(r"(?:\.venv/bin/tandem|torchrun .* -m tandem\.trainer\.cli) +(-cn .*)$")


def _bash_lines(text: str) -> list[str]:
    """Command lines of the ```bash blocks of a markdown text, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words))
    return lines


def _smoke_lines() -> list[str]:
    body = Path(REPO, "Makefile").read_text().split("\nsmoke:", 1)[1].split("\n\n", 1)[0]
    return [l.strip().replace("$(SMOKE_DIR)", "runs/smoke").replace("$(VENV)", ".venv").replace("$(PY)", ".venv/bin/python")
            for l in body.splitlines()[1:] if l.startswith("\t")]


def _run_dir_and_inputs(words: list[str]) -> tuple[str, list[str]]:
    """The run directory a training command writes (resolved as in the Hydra job) and the inputs it reads."""
    args = [w for w in words[words.index("-cn") + 2:] if "=" in w and not w.startswith("-")]
    name = words[words.index("-cn") + 1]
    register_configs()
    GlobalHydra.instance().clear()
    env = {k: v for k, v in (w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = compose(config_name=name, overrides=args, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # what hydra.main does for its job
        run_dir = str(cfg.run.dir)
        inputs = [e.path.removeprefix("indexed:") for key in ("phase1", "phase2", "blend") for e in cfg.data[key]]
        inputs += [cfg.data.path] if cfg.data.path else []
        inputs += list(cfg.data.chat.train) if cfg.stage.name == "sft" else []
        inputs += list(cfg.data.rl.train) if cfg.stage.name == "grpo" else []
        inputs += [e.path.removeprefix("indexed:") for e in cfg.stage.cpt.long] if cfg.stage.name == "cpt" else []
        inputs += [cfg.model.init_from] if cfg.model.init_from else []
    finally:
        HydraConfig.instance().cfg = None
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return run_dir, [i for i in inputs if not i.startswith("synthetic:")]


def test_readme_commands_in_order_after_make_smoke():
    """Every README training command after ``make smoke`` gets a run directory no earlier command trained
    (today's failures: "data sources differ", "run already complete") and reads only inputs that ``make smoke``
    or an earlier README command wrote."""
    made: set[str] = set()  # paths written so far (outputs and run dirs), without extension
    trained: dict[str, str] = {}  # run dir → the command that trained it
    docs = Path(REPO, "README.md").read_text() + Path(REPO, "docs", "SFT.md").read_text()
    lines = _smoke_lines() + [l for l in _bash_lines(docs) if l.startswith((".venv/", "torchrun "))]
    assert len(lines) > 20
    for line in lines:
        words = shlex.split(line)
        m = TRAIN.search(line)
        if m and "--cfg" not in words:
            run_dir, inputs = _run_dir_and_inputs(words)
            for path in inputs:
                assert path in made, f"{line!r} reads {path}, which nothing before it wrote"
            assert run_dir not in trained, f"{line!r} would find {run_dir}, trained by {trained[run_dir]!r}"
            trained[run_dir] = line
            made.add(run_dir)
        for flag in ("--out", "-o", "--to", "--sft-out", "--judge-out"):
            if flag in words:
                made.add(re.sub(r"\.(jsonl|json)$", "", words[words.index(flag) + 1]))
                made.add(words[words.index(flag) + 1])
    assert "runs/smoke/pretrain" in trained and "runs/smoke/sft" in trained  # make smoke's own two


def test_multirun_jobs_get_their_own_run_dirs(tmp_path):
    """``tandem -m ... optim.lr=a,b``: two jobs, two run directories, both trained; Hydra's sweep
    bookkeeping under runs/multirun/, nothing in the working directory."""
    tiny = ["stage.steps=1", "stage.global_batch=2", "stage.micro_batch=2", "data.seq_len=16", "stage.eval_batches=0",
            "logger.progress_bar=false"]
    res = subprocess.run([sys.executable, "-m", "tandem.trainer.cli", "-m", "-cn", "smoke", *tiny, "optim.lr=1e-3,3e-3"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    runs = sorted((tmp_path / "runs" / "smoke").iterdir())
    assert [("optim.lr=0.001" in r.name, "optim.lr=0.003" in r.name) for r in runs] == [(True, False), (False, True)]
    for r in runs:
        assert (r / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert list((tmp_path / "runs" / "multirun").glob("*/multirun.yaml"))


def test_help_lists_recipes_groups_subcommands_and_completion(monkeypatch, capsys):
    from tandem.trainer import cli

    monkeypatch.setattr(sys, "argv", ["tandem", "--help"])
    try:
        cli.main()
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "powered by Hydra" not in out and "Config: {}" not in out and "_schema" not in out
    for recipe in RECIPES_DIR.glob("*.yaml"):
        line = next(l for l in out.splitlines() if l.startswith(f"  {recipe.stem} "))
        assert len(line.split(None, 1)[1]) > 10, line  # with its one line
    for word in ("tandem generate", "tandem report", "tandem export", "tandem plan", "parallel:", "ddp", "-sc install=bash"):
        assert word in out, word


def test_generate_help_shows_defaults(capsys):
    from tandem.trainer.inference.cli import chat_main

    try:
        chat_main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "(default: 512)" in out and "(default: None)" not in out and "examples:" in out
    assert "saved with the" in out  # the tokenizer default


def test_run_dir_suffix_names_what_is_trained():
    from tandem.trainer.config import overrides_suffix

    assert overrides_suffix([]) == "" and overrides_suffix(["run.dir=x", "logger.log_every=1", "hydra.verbose=1"]) == ""
    assert overrides_suffix(["stage.steps=500", "optim.lr=1e-3", "run.resume=auto"]) == "-optim.lr=1e-3,stage.steps=500"
    assert overrides_suffix(["data.path=data/mine"]) == "-data.path=data_mine"
    assert overrides_suffix(["+model.x=[{a: 1}]"]) == "-+model.x=_a_1_"
    long_a = overrides_suffix([f"data.path=/very/long/path/{'a' * 100}"])
    long_b = overrides_suffix([f"data.path=/very/long/path/{'a' * 99}b"])
    assert len(long_a) <= 96 + 1 and long_a != long_b  # cut, and still apart
