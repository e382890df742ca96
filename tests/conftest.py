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


def pytest_collection_modifyitems(config, items):
    """The whole-pipeline test (``make smoke``, by far the longest) is collected first (it runs first in one
    process; pytest-xdist's ``--dist loadfile`` does not keep this order, so under ``make test`` it may still
    start last). Tests marked
    ``gpu`` skip with a reason when CUDA is absent (they never pass vacuously)."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_smoke.py")  # stable: order kept otherwise
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
