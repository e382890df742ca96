"""Resume refuses a changed schedule (steps, batch, LR curve, data), naming every difference, before anything
is written; ``run.extend=true`` lets ``stage.steps`` change, with the LR curve recomputed over the new total."""

import hashlib
import json

import pytest

from tandem.trainer.config import ConfigError
from tandem.trainer.optim import lr_at
from tandem.trainer.run import run

from .conftest import read_records


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_changed_schedule_is_refused_naming_each_difference(tiny_cfg, tmp_path):
    run_dir = tmp_path / "r"
    run(tiny_cfg("stage.steps=4", run_dir=run_dir))
    before = _hashes(run_dir)
    with pytest.raises(ConfigError, match=r"stage\.steps: 4 -> 6\. To train it for a different number of steps, add run\.extend=true"):
        run(tiny_cfg("stage.steps=6", run_dir=run_dir))
    with pytest.raises(ConfigError) as err:
        run(tiny_cfg("stage.steps=6", "data.seq_len=16", "data.phase2_start=0.5", "optim.decay_fraction=0.5", run_dir=run_dir))
    msg = str(err.value)
    for needle in ("stage.steps: 4 -> 6", "data.seq_len: 32 -> 16", "data.phase2_start: 0.8 -> 0.5",
                   "optim.decay_fraction: 0.2 -> 0.5", "model.init_from"):
        assert needle in msg, msg
    with pytest.raises(ConfigError, match="stage.global_batch: 4 -> 8"):  # extend covers stage.steps only
        run(tiny_cfg("stage.steps=6", "stage.global_batch=8", "run.extend=true", run_dir=run_dir))
    assert _hashes(run_dir) == before  # refused before anything was written


def test_extend_recomputes_the_lr_curve_over_the_new_total(tiny_cfg, tmp_path):
    run_dir = tmp_path / "r"
    run(tiny_cfg("stage.steps=4", run_dir=run_dir))
    cfg = tiny_cfg("stage.steps=7", "run.extend=true", run_dir=run_dir)
    run(cfg)
    records = read_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 8))
    assert [r["lr"] for r in records[4:]] == [lr_at(s, 7, cfg.optim) for s in range(4, 7)]
    state = json.loads((run_dir / "checkpoints" / "step_00000007" / "trainer_state.json").read_text())
    assert state["schedule"]["stage.steps"] == 7
    run(tiny_cfg("stage.steps=7", run_dir=run_dir))  # the extended run's own checkpoint: nothing to extend
