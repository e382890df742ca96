"""Fixtures for the Slurm tests: the launcher's env module, and a private local Slurm for the session."""

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from .cluster import LocalSlurm, SlurmUnavailable, ensure_installed

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: slurm/slurm_env.py (slurm/ is scripts, not an installed package)
slurm_env = _load("slurm_env", REPO / "slurm" / "slurm_env.py")


def job_env(runs_root: Path) -> dict[str, str]:
    """What the sbatch recipes need to run this checkout with the Python running the tests."""
    return {
        "TANDEM_HOME": str(REPO),
        "TANDEM_PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "TANDEM_RUNS_ROOT": str(runs_root),
    }


@pytest.fixture(scope="session")
def local_slurm():
    """munge + slurmctld + slurmd on localhost, up for the session, torn down with nothing left running.

    Installs Debian's packages when missing (root only); skips with the reason when it cannot.
    """
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    # A short path: munge's socket must fit a unix socket name (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="tandem-slurm-"))
    cluster = LocalSlurm(root)
    with cluster:
        yield cluster
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-runs")
