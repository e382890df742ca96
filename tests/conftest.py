"""Shared pytest set-up.

On a machine without CUDA, Triton kernels run under the interpreter (``TRITON_INTERPRET=1``), which
must be set before triton is first imported; doing it here covers every test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


#: test files by measured wall time, longest first (CI rehearsal, 2 workers; update from
#: ``make test PYTEST_ARGS=--durations=0`` when a file's cost changes). ``make test`` runs pytest-xdist
#: with ``--dist loadfile --no-loadscope-reorder``: each worker takes the next *file* in collection order,
#: so starting the long files first keeps one worker from running the longest file alone at the end.
LONGEST_FIRST = (
    "tests/test_smoke.py",
    "tests/trainer/test_plan.py",
    "tests/trainer/test_zero_expert_parallel.py",
    "tests/slurm/test_local_slurm.py",
    "tests/trainer/test_grpo_stage.py",
    "tests/trainer/test_deepspeed.py",
    "tests/trainer/test_loop.py",
    "tests/trainer/test_build_memory.py",
    "tests/trainer/test_context_parallel.py",
    "tests/trainer/test_fsdp.py",
    "tests/trainer/test_data_indexed.py",
    "tests/trainer/test_cpt_stage.py",
    "tests/trainer/test_expert_parallel.py",
)


def pytest_collection_modifyitems(config, items):
    """Files in :data:`LONGEST_FIRST` are collected first, in that order (the rest keep theirs). Tests
    marked ``gpu`` skip with a reason when CUDA is absent (they never pass vacuously)."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
