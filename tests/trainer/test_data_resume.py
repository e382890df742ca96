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


def test_extend_recomputes_the_lr_curve_and_moves_a_switch_ahead(tiny_cfg, tmp_path):
    """5 planned steps (phase 2 from step 4), resumed at step 2 as a 10-step run: the LR follows the 10-step
    curve, the switch moves to step 8; the extended run itself resumes exactly."""
    import shutil

    run_dir = tmp_path / "r"
    run(tiny_cfg("stage.steps=5", "stage.save_every=2", run_dir=run_dir))
    assert [r["phase"] for r in read_records(run_dir)] == [1] * 4 + [2]
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    shutil.rmtree(run_dir / "checkpoints" / "step_00000005")
    (run_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_records(run_dir)[:2]))
    cfg = tiny_cfg("stage.steps=10", "stage.save_every=2", "run.extend=true", run_dir=run_dir)
    run(cfg)
    records = read_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["lr"] for r in records[2:]] == [lr_at(s, 10, cfg.optim) for s in range(2, 10)]
    assert [r["phase"] for r in records] == [1] * 8 + [2] * 2
    state = json.loads((run_dir / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())
    assert state["schedule"]["stage.steps"] == 10 and state["stage_state"]["extensions"] == [[2, 5]]
    # the extended run's own checkpoints resume exactly, without run.extend
    shutil.rmtree(run_dir / "checkpoints" / "step_00000010")
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    (run_dir / "checkpoints" / "latest").write_text("step_00000006\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    run(tiny_cfg("stage.steps=10", "stage.save_every=2", run_dir=run_dir))
    assert [r["loss"] for r in read_records(run_dir)] == [r["loss"] for r in records]
