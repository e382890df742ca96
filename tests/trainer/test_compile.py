"""``model.compile``: in the schema and validated; compiled block bodies have no graph breaks and train
to the same losses as eager (tiny model, 3 steps; the ``aot_eager`` backend traces exactly what inductor
would compile — dynamo, the autograd functions' forward and backward — without its C++ build time)."""

import argparse
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tandem.model import HybridLM
from tandem.trainer.config import ConfigError, configure_compile, validate_memory

from .conftest import compose_recipe, TINY_RUN

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from train_step import model_config  # noqa: E402  the bench's model shape, at test size


def test_compile_key_in_schema_and_validated(tmp_path):
    cfg = compose_recipe("smoke", [*TINY_RUN, f"run.dir={tmp_path}", "model.compile=true"])
    assert cfg.model.compile is True
    with pytest.raises(Exception, match="compile"):
        compose_recipe("smoke", [*TINY_RUN, f"run.dir={tmp_path}", "model.compile=sometimes"])
    raw = OmegaConf.create({"model": {"activation_checkpointing": "none", "loss_chunk_tokens": None, "compile": "yes"},
                            "precision": {"name": "fp32"}})
    with pytest.raises(ConfigError, match="model.compile must be true or false"):
        validate_memory(raw)


def test_compiled_blocks_train_like_eager_without_graph_breaks():
    """One sequence per row (packed documents add attention's document layout, which is data-dependent)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    shape = argparse.Namespace(pattern="ME*", hidden=64, experts=4, top_k=2, vocab=96)
    eager = HybridLM(model_config(shape), init_seed=0).train()
    compiled = copy.deepcopy(eager)
    configure_compile(compiled, OmegaConf.create({"compile": True}), backend="aot_eager")
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 49))
    losses = []
    for model in (eager, compiled):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        run = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][0] > losses[0][2] + 0.05  # it trains at all
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-5, rtol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # one per block kind, really compiled
