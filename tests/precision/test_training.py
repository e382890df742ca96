"""Training check: the tiny model trained a fixed number of steps on CPU in emulated FP8 and NVFP4
reaches a final loss within a stated margin of the fp32 run (same seed, data and schedule)."""

import json

import pytest

from tests.trainer.conftest import TINY_RUN, compose_recipe
from tandem.trainer.run import run

STEPS = 10
#: |loss(recipe) - loss(fp32)| allowed at the last step (train and validation); the fp32 run itself
#: falls by more than 1 nat (6.28 → 4.78) over these steps, so the margin is small against the signal.
MARGIN = 0.1


def _train(tmp_path, precision):
    d = tmp_path / precision
    cfg = compose_recipe("smoke", [*TINY_RUN, f"stage.steps={STEPS}", "stage.global_batch=2", "stage.micro_batch=2",
                                   "optim.warmup_steps=2", "stage.eval_batches=1", f"run.dir={d}", f"precision={precision}"])
    rec = run(cfg)
    first = json.loads((d / "metrics.jsonl").read_text().splitlines()[0])
    return first["loss"], rec["loss"], rec["val_loss"]


@pytest.mark.slow
def test_fp8_and_nvfp4_train_like_fp32(tmp_path):
    start, fp32, fp32_val = _train(tmp_path, "fp32")
    assert start - fp32 > 1.0  # the run learns
    for precision in ("fp8_delayed", "nvfp4"):
        first, loss, val = _train(tmp_path, precision)
        assert first == pytest.approx(start, abs=0.05)  # same model and batch at step 1
        assert abs(loss - fp32) < MARGIN, f"{precision}: final loss {loss:.4f} vs fp32 {fp32:.4f}"
        assert abs(val - fp32_val) < MARGIN, f"{precision}: val loss {val:.4f} vs fp32 {fp32_val:.4f}"
