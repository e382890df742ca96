"""The end-of-run line reports each stage's headline metrics, first recorded value → last."""

import json

from tandem.trainer.run import headline_summary
from tandem.trainer.stages import GRPOStage, PretrainStage, SFTStage


def test_headline_summary_first_to_last_recorded(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 2.0, "grpo/reward_mean": 0.25}, {"step": 2, "loss": 1.5},
               {"step": 3, "loss": 1.0, "grpo/val_reward": 0.5, "grpo/reward_mean": 0.75}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert headline_summary(path, ("loss", "val_loss")) == "loss 2.000 (step 1) → 1.000 (step 3)"
    assert headline_summary(path, GRPOStage.headline) == (
        "grpo/reward_mean 0.250 (step 1) → 0.750 (step 3), grpo/val_reward 0.500 (step 3) → 0.500 (step 3)")
    assert headline_summary(path, ("nothing",)) == "no metrics recorded"


def test_stages_name_recorded_keys():
    assert PretrainStage.headline == SFTStage.headline == ("loss", "val_loss")
    assert "grpo/reward_mean" in GRPOStage.headline
