import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tandem.recipes import RECIPES_DIR as RECIPES
from tandem.trainer.config import register_configs

REPO = Path(__file__).resolve().parents[2]


def compose_recipe(name: str, overrides: list[str] = ()):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


TINY_RUN = [
    "stage.steps=6", "stage.global_batch=4", "stage.micro_batch=2", "stage.eval_every=0", "stage.eval_batches=1",
    "data.seq_len=32", "logger.log_every=1", "logger.progress_bar=false", "optim.warmup_steps=2",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra, run_dir=None):
        return compose_recipe("smoke", [*TINY_RUN, f"run.dir={run_dir or tmp_path / 'run'}", *extra])

    return make


def run_cli(*args, env=None, timeout=300):
    """``python -m tandem.trainer.cli`` in a subprocess; returns CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "tandem.trainer.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def run_torchrun(*args, nproc: int = 2, timeout=600):
    """``torchrun --standalone --nproc_per_node N -m tandem.trainer.cli ...`` (gloo on CPU); CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "tandem.trainer.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def read_records(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    import json

    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
