"""apply_precision: the layer policy, unchanged state dicts, checkpoints across backends, config errors."""

import pytest
import torch
from torch import nn

from tandem.model import HybridConfig, HybridLM
from tandem.model.mamba2 import CausalConv1d
from tandem.model.moe import TopKRouter
from tandem.model.precision import (PrecisionError, PrecisionSpec, QuantizedExpertMatmul, QuantLinear, apply_precision)
from tandem.model.precision_te import te_unavailable_reason


def _model():
    return HybridLM(HybridConfig.preset("tiny"), init_seed=0)  # pattern "ME*M-E"


def test_policy_and_state_dict_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    apply_precision(model, PrecisionSpec("nvfp4", high_precision_first=1, high_precision_last=1))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects
    layers = model.backbone.layers
    # first and last blocks stay high precision
    assert type(layers[0].mixer.in_proj) is nn.Linear
    assert layers[5].mixer.experts.matmul is torch.nn.functional.linear
    # quantized: every mixer linear and the routed experts in between
    assert isinstance(layers[1].mixer.experts.matmul, QuantizedExpertMatmul)
    assert isinstance(layers[1].mixer.shared_experts.up_proj, QuantLinear)
    assert all(isinstance(getattr(layers[2].mixer, p), QuantLinear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(layers[3].mixer.in_proj, QuantLinear) and isinstance(layers[3].mixer.out_proj, QuantLinear)
    assert isinstance(layers[4].mixer.up_proj, QuantLinear)
    # never quantized
    assert not isinstance(model.lm_head, QuantLinear) and type(model.backbone.embeddings) is nn.Embedding
    assert isinstance(layers[1].mixer.gate, TopKRouter) and type(layers[3].mixer.conv1d) is CausalConv1d
    plan = model.precision_plan
    assert plan.backend == "emulate" and len(plan.quantized) == 11 and len(plan.high_precision) == 5
    assert "emulated because the model is on cpu" in plan.summary()


def test_forward_backward_and_expert_states():
    model = _model()
    apply_precision(model, PrecisionSpec("fp8_delayed"))
    ids = torch.randint(0, 512, (2, 24))
    model(ids).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    mm = model.backbone.layers[1].mixer.experts.matmul
    used = model.backbone.layers[1].mixer.tokens_per_expert_acc.nonzero().flatten().tolist()
    # one delayed-scaling state per expert and projection that saw tokens
    assert sorted(mm._quantizers) == sorted([("down_proj", e) for e in used] + [("up_proj", e) for e in used])


def test_checkpoint_moves_between_backends(tmp_path):
    trained = _model()
    apply_precision(trained, PrecisionSpec("mxfp8"))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    trained.save_pretrained(tmp_path / "ckpt")
    plain = HybridLM.from_pretrained(tmp_path / "ckpt")  # loads into a plain fp32 model
    for (n, a), b in zip(trained.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), n
    again = apply_precision(HybridLM.from_pretrained(tmp_path / "ckpt"), PrecisionSpec("mxfp8"))
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids), trained(ids))


def test_high_precision_names_are_noops():
    for name in ("auto", "fp32", "bf16"):
        model = apply_precision(_model(), {"name": name})
        assert not any(isinstance(m, QuantLinear) for m in model.modules())
        assert model.precision_plan.backend == "torch"


@pytest.mark.parametrize("cfg,match", [
    ({"name": "fp4"}, r"precision.name must be one of .*got 'fp4'"),
    ({"name": "nvfp4", "backend": "cuda"}, r"precision.backend must be one of \['auto', 'emulate', 'te'\], got 'cuda'"),
    ({"name": "nvfp4", "high_precision_last": -1}, r"precision.high_precision_last must be >= 0"),
    ({"name": "mxfp8", "mx_scale_mode": "up"}, r"mx_scale_mode must be 'rceil' or 'floor'"),
    ({"name": "nvfp4", "backend": "te"}, r"precision.backend=te for nvfp4: the model is on cpu.*precision.backend=emulate"),
])
def test_config_errors_name_the_key(cfg, match):
    with pytest.raises(PrecisionError, match=match):
        apply_precision(_model(), cfg)


def test_te_capability_messages():
    assert "needs a CUDA GPU" in te_unavailable_reason("fp8_current", torch.device("cpu"))
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        msg = te_unavailable_reason("nvfp4", torch.device("cuda"))
        assert "Transformer Engine is not importable" in msg and "pip install -e '.[gpu]'" in msg
    else:  # pragma: no cover - a machine with TE
        pytest.skip("Transformer Engine is installed here; the not-installed message cannot be produced")


def test_trainer_config_composes_every_recipe(tmp_path):
    from tests.trainer.conftest import compose_recipe

    for name in ("fp8_delayed", "fp8_current", "fp8_block", "mxfp8", "nvfp4"):
        cfg = compose_recipe("smoke", [f"precision={name}", f"run.dir={tmp_path}"])
        spec = PrecisionSpec.from_config(cfg.precision)
        spec.validate()
        assert spec.name == name and spec.quantized
    cfg = compose_recipe("smoke", ["precision=nvfp4", "precision.high_precision_first=2", "precision.nvfp4_rht=false"])
    spec = PrecisionSpec.from_config(cfg.precision)
    assert spec.high_precision_first == 2 and spec.high_precision_last == 1 and spec.options.nvfp4_rht is False


def test_bad_precision_stops_the_run_before_it_writes(tmp_path):
    from tandem.trainer.config import ConfigError
    from tandem.trainer.run import run

    cfg = compose_recipe_for(tmp_path, ["precision=nvfp4", "precision.backend=te"])
    with pytest.raises(ConfigError, match=r"precision.backend=te for nvfp4: the model is on cpu"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def compose_recipe_for(tmp_path, extra):
    from tests.trainer.conftest import TINY_RUN, compose_recipe

    return compose_recipe("smoke", [*TINY_RUN, f"run.dir={tmp_path / 'run'}", *extra])
