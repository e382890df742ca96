"""Bad input through the real entry points: one line on stderr, exit status 2, and nothing already written
changes (the standard of docs/RECIPES.md: "2 bad input (one line naming the key or file)").

Every case starts from a copy of one finished two-step run; the whole tree (run directory, checkpoint,
inputs) is hashed before and after the command.
"""

import hashlib
import shutil
from pathlib import Path

import pytest

from .conftest import run_cli

BASE = ["-cn", "smoke", "stage.global_batch=4", "stage.micro_batch=2", "data.seq_len=16", "stage.eval_batches=1",
        "logger.progress_bar=false"]
STEP = Path("checkpoints") / "step_00000002"
TEXT_ONLY = ["data.phase2=[]", "data.phase2_start=1.0"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    res = run_cli(*BASE, "stage.steps=2", f"run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-2000:]
    return run_dir


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _sft_file(root: Path) -> str:
    from tandem.data_pipelines.sft_synthetic import main as sft_synthetic

    sft_synthetic(["--out", str(root / "sft.jsonl"), "--samples", "12", "--seed", "0"])
    return f"data.chat.train=[{root / 'sft.jsonl'}]"


SFT = ["-cn", "smoke_sft", "data.seq_len=64"]


def _bad_utf8(root: Path) -> str:
    (root / "bad.txt").write_bytes(b"a first document\n\nthen \xff a stray byte\n")
    return f"data.phase1=[{{path: 'text:{root / 'bad.txt'}', weight: 1.0}}]"


# case → (arguments after the run's (run dir, tmp root), damage to apply first, words the one line must hold)
TRAIN = {
    # a failed start leaves config.yaml as it was (checks that ran after it was written)
    "logger-kind": (["stage.steps=4", "logger.kind=tensorboard"], None, "logger.kind"),
    "optim-schedule": (["stage.steps=4", "optim.schedule=linear"], None, "optim.schedule"),
    # tracebacks before
    "micro-batch-0": (["stage.steps=4", "stage.micro_batch=0"], None, "stage.micro_batch must be >= 1"),
    "seq-len-0": (["stage.steps=4", "data.seq_len=0"], None, "data.seq_len must be >= 1"),
    "steps-0": (["stage.steps=0"], None, "stage.steps must be >= 1"),
    "steps-negative": (["stage.steps=-5"], None, "stage.steps must be >= 1, got -5"),
    "text-not-utf8": (["stage.steps=4", *TEXT_ONLY], _bad_utf8, "bad.txt:3: not UTF-8"),
    "truncated-trainer-state": (["stage.steps=4"], lambda r: _truncate(r / "run" / STEP / "trainer_state.json"),
                                "trainer_state.json"),
    "truncated-optimizer": (["stage.steps=4"], lambda r: _truncate(r / "run" / STEP / "optimizer.pt"), "optimizer.pt"),
    "truncated-rng": (["stage.steps=4"], lambda r: _truncate(r / "run" / STEP / "rng" / "rank_00000.pt"), "rank_00000.pt"),
    # an SFT recipe resuming a pretraining run, an SFT file that is not there
    "sft-in-pretrain-dir": ([*SFT, "stage.steps=4", "model.init_from=${run.dir}"], _sft_file,
                            "checkpoint is from stage 'pretrain', this run is 'sft'"),
    # (its own run dir, from the pretraining run's weights: a pretraining dir is refused before its data)
    "sft-missing-file": ([*SFT, "stage.steps=4", "data.chat.train=[/nonexistent/sft.jsonl]"],
                         lambda r: [f"run.dir={r / 'sft'}", f"model.init_from={r / 'run'}"],
                         "/nonexistent/sft.jsonl does not exist"),
    # Hydra's composition errors and keys outside the schema
    "unknown-key": (["stage.steps=4", "optim.lrr=1"], None, "Key 'lrr' not in 'OptimConfig'"),
    "wrong-type": (["stage.steps=many"], None, "stage.steps"),
    "plus-key": (["stage.steps=4", "+lr=1e-3"], None, "lr: not in the run schema"),
}


def _check(res, root: Path, before: dict, needle: str, prog: str) -> None:
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2, (res.returncode, res.stdout[-1000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout
    assert len(lines) == 1, res.stderr  # printed once, on one line
    assert lines[0].startswith(f"{prog}: error: ") and needle in lines[0], lines[0]
    assert lines[0].split(": error: ", 1)[1] not in res.stdout  # not logged a second time
    assert _hashes(root) == before


@pytest.mark.parametrize("case", list(TRAIN))
def test_train_bad_input_is_one_line_and_changes_nothing(finished_run, tmp_path, case):
    args, damage, needle = TRAIN[case]
    shutil.copytree(finished_run, tmp_path / "run")
    extra = (damage(tmp_path) if damage else None) or []  # a damage may name extra arguments
    extra = [extra] if isinstance(extra, str) else extra
    before = _hashes(tmp_path)
    res = run_cli(*BASE, f"run.dir={tmp_path / 'run'}", *args, *extra)
    _check(res, tmp_path, before, needle, "tandem")


def _generate_cases(root: Path) -> dict:
    (root / "empty").mkdir()
    (root / "released").mkdir()
    shutil.copytree(root / "run" / STEP / "model", root / "released", dirs_exist_ok=True)
    _truncate(next((root / "released").glob("*.safetensors")))
    ckpt = str(root / "run")
    return {
        "not-a-checkpoint": ([str(root / "empty")], "no tandem checkpoint here"),
        "missing-dir": ([str(root / "nowhere")], "no such checkpoint directory"),
        "truncated-safetensors": ([str(root / "released")], "possibly truncated or corrupt"),
        "bad-dtype": ([ckpt, "--dtype", "float8"], "--dtype"),
        "missing-tokenizer": ([ckpt, "--tokenizer", str(root / "no_tokenizer")], "--tokenizer"),
    }


@pytest.mark.parametrize("case", ["not-a-checkpoint", "missing-dir", "truncated-safetensors", "bad-dtype",
                                  "missing-tokenizer"])
def test_generate_bad_input_is_one_line(finished_run, tmp_path, case):
    shutil.copytree(finished_run, tmp_path / "run")
    args, needle = _generate_cases(tmp_path)[case]
    before = _hashes(tmp_path)
    res = run_cli("generate", *args, "--prompt", "hi", "--max-new-tokens", "2")
    _check(res, tmp_path, before, needle, "tandem generate")


def test_no_recipe_and_unknown_recipe(tmp_path):
    res = run_cli()
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no recipe given" in res.stderr, res.stderr
    res = run_cli("-cn", "no_such_recipe")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no_such_recipe" in res.stderr, res.stderr


def test_every_recipe_passes_validation():
    """The checks the CLI runs before Hydra starts the job accept every shipped recipe."""
    from tandem.recipes import RECIPES_DIR
    from tandem.trainer.run import validate

    from .conftest import compose_recipe

    for recipe in sorted(RECIPES_DIR.glob("*.yaml")):
        validate(compose_recipe(recipe.stem))


def test_options_after_overrides_and_unknown_options(capsys):
    """Hydra's parser stops with a usage screen when an option follows an override; tandem reorders the
    command line, and an option nobody knows is one line, exit status 2."""
    from tandem.trainer.cli import hydra_argv

    assert hydra_argv(["stage.steps=4", "-cn", "smoke", "optim.lr=1e-3"]) == ["-cn", "smoke", "stage.steps=4",
                                                                             "optim.lr=1e-3"]
    assert hydra_argv(["-m", "-cn", "smoke", "optim.lr=1e-3,3e-3"]) == ["-m", "-cn", "smoke", "optim.lr=1e-3,3e-3"]
    with pytest.raises(SystemExit) as e:
        hydra_argv(["-cn", "smoke", "--bogus", "stage.steps=4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unknown option --bogus" in err, err


@pytest.mark.parametrize("argv,needle", [
    (["-m", "-cn", "smoke", "stage.steps=4", "optim.lrr=1,2"], "Key 'lrr' not in 'OptimConfig'"),
    (["-m", "-cn", "smoke", "stage.steps=4,0"], "stage.steps=0: stage.steps must be >= 1, got 0"),
    (["-m", "-cn", "smoke", "stage.steps=range(0,2)"], "stage.steps=0: stage.steps must be >= 1"),
])
def test_multirun_is_checked_job_by_job_before_it_starts(argv, needle, capsys):
    """Hydra would start the sweep and stop at the bad job with its multi-line message (exit 1); every job's
    composition and values are checked first (in process: the check writes nothing)."""
    from tandem.trainer.cli import check_composition
    from tandem.trainer.config import register_configs

    register_configs()
    with pytest.raises(SystemExit) as e:
        check_composition(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err
