"""A wheel built with ``python -m build`` works on its own, outside the checkout.

The wheel is installed (without dependencies) into a fresh virtual environment; the dependencies come
from the test interpreter's own site-packages through a ``.pth`` line, which adds that folder to
``sys.path`` without running the ``.pth`` files inside it — so the editable install of the checkout that
``make setup`` made is *not* active there. Every command then runs from an empty working directory:
``tandem -cn smoke`` (synthetic data, recipes from the package), ``tandem generate`` on its checkpoint
(the shipped tokenizer and chat template from the package), and imports that prove the namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OLD_TOP_LEVEL = ("model", "kernels", "trainer", "data_pipelines")


def _run(cmd, cwd, env, timeout=600):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}: rc {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this environment's setuptools instead of downloading one
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)], cwd=REPO,
         env=os.environ.copy())
    (whl,) = out.glob("tandem-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=False)
    py = root / "bin" / "python"
    purelib = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "_tandem_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # pip (from the shared site-packages) run by the fresh interpreter installs into the fresh environment
    # only; --ignore-installed: never touch the editable install it can see through the .pth line
    _run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         cwd=root, env=env)
    env["PATH"] = f"{root / 'bin'}:{env.get('PATH', '')}"
    return root, env


def test_wheel_carries_recipes_tokenizer_and_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("tandem/recipes/smoke.yaml", "tandem/recipes/model/nano3.yaml", "tandem/recipes/parallel/ep2.yaml",
                     "tandem/data_pipelines/assets/chat_template.jinja",
                     "tandem/data_pipelines/assets/tokenizer/tokenizer.json", "tandem/trainer/stages/sft.py"):
        assert required in names, required
    assert not [n for n in names if n.split("/")[0] in OLD_TOP_LEVEL + ("tests", "bench", "slurm")]


def test_namespace_only(fresh_env, tmp_path):
    root, env = fresh_env
    probe = (
        "import importlib, sys\n"
        "import tandem.model, tandem.trainer.cli, tandem.data_pipelines.chat, tandem.kernels.ssd\n"
        f"assert tandem.model.__file__.startswith({str(root)!r}), tandem.model.__file__\n"
        f"for name in {OLD_TOP_LEVEL!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    sys.exit(f'{name} is importable as a top-level package')\n"
        "print('ok')\n"
    )
    res = _run([str(root / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env)
    assert res.stdout.strip() == "ok"


@pytest.mark.slow
def test_smoke_and_generate_from_any_directory(fresh_env, tmp_path):
    root, env = fresh_env
    work = tmp_path / "elsewhere"
    work.mkdir()
    res = _run([str(root / "bin" / "tandem"), "-cn", "smoke", "stage.steps=20", "stage.eval_every=10",
                "stage.save_every=20", "logger.progress_bar=false", "run.dir=run"], cwd=work, env=env)
    assert "done: 20 steps" in res.stdout, res.stdout[-2000:]
    assert (work / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    other = tmp_path / "other"
    other.mkdir()
    res = _run([str(root / "bin" / "tandem"), "generate", str(work / "run"), "--prompt", "What is 1 + 2?", "--greedy",
                "--max-new-tokens", "8"], cwd=other, env=env)
    assert res.stdout.strip(), res.stderr  # the reply (20 steps of training: not meaningful text)
    assert "[8 tokens, length" in res.stderr, res.stderr  # the summary line: all 8 new tokens generated
    assert not (REPO / "run").exists()
