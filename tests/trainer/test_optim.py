import math

import pytest

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.config import OptimConfig
from tandem.trainer.optim import build_optimizer, lr_at


def test_wsd_schedule_values():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, schedule="wsd", warmup_steps=10, decay_fraction=0.2)
    total = 100
    assert lr_at(0, total, cfg) == pytest.approx(0.1)
    assert lr_at(9, total, cfg) == pytest.approx(1.0)
    assert lr_at(10, total, cfg) == 1.0 and lr_at(79, total, cfg) == 1.0  # stable
    assert lr_at(80, total, cfg) == pytest.approx(0.1 + 0.9 * (1 - 1 / 20))  # decay over the last 20 steps
    assert lr_at(89, total, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(99, total, cfg) == pytest.approx(0.1)
    sq = OptimConfig(lr=1.0, min_lr=0.0, schedule="wsd", warmup_steps=0, decay_fraction=0.5, decay_style="sqrt")
    assert lr_at(74, 100, sq) == pytest.approx(1 - math.sqrt(0.5))
    no_decay = OptimConfig(lr=1.0, schedule="wsd", warmup_steps=0, decay_fraction=0.0)
    assert lr_at(99, 100, no_decay) == 1.0


def test_cosine_and_constant_schedule_values():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, schedule="cosine", warmup_steps=4)
    assert lr_at(3, 104, cfg) == pytest.approx(1.0)
    assert lr_at(53, 104, cfg) == pytest.approx(0.5)
    assert lr_at(103, 104, cfg) == pytest.approx(0.0, abs=1e-12)
    const = OptimConfig(lr=0.5, schedule="constant", warmup_steps=0)
    assert {lr_at(s, 10, const) for s in range(10)} == {0.5}
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_at(0, 10, OptimConfig(schedule="linear"))


def test_weight_decay_groups():
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    for n in no_decay:
        assert n.endswith(("norm.weight", "norm_f.weight", "A_log", ".D", "dt_bias", "bias")), n
    assert "backbone.layers.0.mixer.A_log" in no_decay and "backbone.layers.0.mixer.dt_bias" in no_decay
    assert "backbone.layers.0.mixer.in_proj.weight" in decay and "backbone.layers.1.mixer.experts.up_proj" in decay
    assert "backbone.layers.1.mixer.gate.weight" in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
