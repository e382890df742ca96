"""Resume refuses a changed schedule (steps, batch, LR curve, data), naming every difference, before anything
is written; ``run.extend=true`` lets ``stage.steps`` change: the LR curve is recomputed over the new total,
a phase switch still ahead moves, and the extended run resumes exactly."""

import hashlib
import json
import shutil

import pytest

from tandem.trainer.config import ConfigError
from tandem.trainer.optim import lr_at
from tandem.trainer.run import run

from .conftest import read_records


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _rewind(run_dir, step, records):
    """Keep the checkpoints up to ``step`` and the records before it, as if the run had stopped there."""
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:step]))


def test_changed_schedule_is_refused_and_extend_replans(tiny_cfg, tmp_path):
    """5 planned steps (phase 2 from step 4), stopped at step 2: a changed schedule is refused; as an 8-step
    run with run.extend the LR follows the 8-step curve and the switch moves to step 6."""
    run_dir = tmp_path / "r"
    run(tiny_cfg("stage.steps=5", "stage.save_every=2", run_dir=run_dir))
    planned = read_records(run_dir)
    assert [r["phase"] for r in planned] == [1] * 4 + [2]
    _rewind(run_dir, 2, planned)
    before = _hashes(run_dir)
    with pytest.raises(ConfigError, match=r"stage\.steps: 5 -> 8\. To train it for a different number of steps, add run\.extend=true"):
        run(tiny_cfg("stage.steps=8", run_dir=run_dir))
    with pytest.raises(ConfigError) as err:
        run(tiny_cfg("stage.steps=5", "data.seq_len=16", "data.phase2_start=0.5", "optim.decay_fraction=0.5",
                     "data.phase2=[{path: 'synthetic:copy', weight: 1.0}]", run_dir=run_dir))
    msg = str(err.value)
    for needle in ("data.seq_len: 32 -> 16", "data.phase2_start: 0.8 -> 0.5", "optim.decay_fraction: 0.2 -> 0.5",
                   'data.phase2: [["synthetic:prose", 0.6], ["synthetic:arithmetic", 0.4]] -> [["synthetic:copy", 1.0]]',
                   "model.init_from"):
        assert needle in msg, msg
    assert "stage.steps" not in msg
    with pytest.raises(ConfigError, match="stage.global_batch: 4 -> 8"):  # extend covers stage.steps only
        run(tiny_cfg("stage.steps=8", "stage.global_batch=8", "run.extend=true", run_dir=run_dir))
    assert _hashes(run_dir) == before  # refused before anything was written

    cfg = tiny_cfg("stage.steps=8", "stage.save_every=2", "run.extend=true", run_dir=run_dir)
    run(cfg)
    records = read_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9)) and records[:2] == planned[:2]
    assert [r["lr"] for r in records[2:]] == [lr_at(s, 8, cfg.optim) for s in range(2, 8)]
    assert [r["phase"] for r in records] == [1] * 6 + [2] * 2
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["schedule"]["stage.steps"] == 8 and state["stage_state"]["extensions"] == [[2, 5]]
    # the extended run's own checkpoints resume exactly, without run.extend, across its moved switch
    _rewind(run_dir, 6, records)
    run(tiny_cfg("stage.steps=8", "stage.save_every=2", run_dir=run_dir))
    assert [r["loss"] for r in read_records(run_dir)] == [r["loss"] for r in records]
