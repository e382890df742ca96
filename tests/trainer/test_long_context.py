"""Long-context memory options in the trainer: activation checkpointing under expert parallelism (2 gloo
ranks), the schema keys' validation, and a run with them equal to one without."""

import json
import os
import subprocess
import sys

import pytest

from tandem.trainer.config import ConfigError
from tandem.trainer.run import run, validate

from .conftest import REPO, read_records


def test_ep2_activation_checkpointing_equals_one_process_without(tmp_path):
    out = tmp_path / "verdict.json"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "trainer" / "ac_ep_worker.py"), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for rank_errors in json.loads(out.read_text()):
        assert rank_errors["grads"] <= 1e-5, rank_errors
        assert rank_errors["counts_equal"], rank_errors


@pytest.mark.parametrize("override, match", [
    ("model.activation_checkpointing=everything", "model.activation_checkpointing: unknown layer kind"),
    ("model.activation_checkpointing=[mamba,ssm]", r"model.activation_checkpointing: unknown layer kind\(s\) \['ssm'\]"),
    ("model.loss_chunk_tokens=0", "model.loss_chunk_tokens must be >= 1"),
    ("precision=fp8_delayed", "cannot be combined with precision.name=fp8_delayed"),
])
def test_bad_memory_options_name_the_key(tiny_cfg, override, match):
    extra = [override] if "precision" not in override else [override, "model.activation_checkpointing=all"]
    with pytest.raises(ConfigError, match=match):
        validate(tiny_cfg(*extra))


def test_run_with_checkpointing_and_chunked_loss_matches_plain(tiny_cfg, tmp_path, monkeypatch):
    from tandem.model import HybridLM

    built = []
    real = HybridLM.set_activation_checkpointing
    monkeypatch.setattr(HybridLM, "set_activation_checkpointing", lambda self, kinds: built.append(self) or real(self, kinds))
    run(tiny_cfg("stage.steps=2", run_dir=tmp_path / "plain"))
    run(tiny_cfg("stage.steps=2", "model.activation_checkpointing=[mamba,moe,attention,mlp]", "model.loss_chunk_tokens=5",
                 run_dir=tmp_path / "memory"))
    plain, memory = built  # the trainer applied the options to the model it trained
    assert not any(b.activation_checkpointing for b in plain.backbone.layers) and plain.loss_chunk_tokens is None
    assert all(b.activation_checkpointing for b in memory.backbone.layers) and memory.loss_chunk_tokens == 5
    a, b = read_records(tmp_path / "plain"), read_records(tmp_path / "memory")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"], (a, b)
