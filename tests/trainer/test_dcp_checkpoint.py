"""Sharded checkpoints in one process: the released layout written piece by piece, the asynchronous save's
commit protocol, and a gathered engine reading a sharded checkpoint. (Multi-process resharding: test_fsdp.)"""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from tandem.model import HybridConfig, HybridLM
from tandem.model.checkpoint import save_state_dict
from tandem.trainer.checkpoint.hf_writer import TensorSpec, hf_config_json, write_hf_layout
from tandem.trainer.checkpoint.manager import CheckpointManager
from tandem.model.checkpoint_io import CheckpointError
from tandem.trainer.config import ConfigError, OptimConfig, validate_config
from tandem.trainer.optim import build_optimizer
from tandem.trainer.parallel.data_parallel import DataParallelEngine
from tandem.trainer.parallel.distributed import DistInfo

from .conftest import TINY_RUN, compose_recipe

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _boxes(name: str, t: torch.Tensor, writers: int):
    """Cut ``t`` as the ranks of a sharded run hold it: row blocks (FSDP ``Shard(0)``), and for stacked experts
    also blocks of each expert's rows (``Shard(1)``), uneven where the sizes do not divide; one list per writer."""
    dim = 1 if name.endswith("experts.down_proj") else 0  # one expert tensor cut the other way
    chunks = torch.chunk(t, writers, dim=dim)
    out, start = [], 0
    for c in chunks:
        offset = [0] * t.dim()
        offset[dim] = start
        out.append((tuple(offset), c))
        start += c.shape[dim]
    return out + [None] * (writers - len(out))


def test_released_layout_written_in_pieces_equals_save_state_dict(tmp_path):
    """Three writers each put their rows in place (several files, experts split per expert): the files load
    exactly like the ones save_state_dict writes from the whole state, in tandem and in safetensors."""
    cfg = HybridConfig.preset("tiny", hybrid_override_pattern="ME*E")
    model = HybridLM(cfg, init_seed=3)
    state = model.state_dict()
    save_state_dict(state, cfg, tmp_path / "whole", max_shard_size=200_000)
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    boxes = {k: _boxes(k, v, 3) for k, v in state.items()}
    write_hf_layout(specs, lambda name: [], tmp_path / "pieces", hf_config_json(cfg, torch.float32), rank=0,
                    barrier=lambda: None, max_shard_bytes=200_000)  # rank 0 lays out the files
    for rank in range(3):  # then each writer its own rows (as ranks 1..3: the files exist already)
        write_hf_layout(specs, lambda name: [b for b in [boxes[name][rank]] if b is not None], tmp_path / "pieces",
                        {}, rank=rank + 1, barrier=lambda: None, max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "pieces").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors")) and len(files) > 1
    for name in files:
        a, b = load_file(tmp_path / "pieces" / name), load_file(tmp_path / "whole" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    index = json.loads((tmp_path / "pieces" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((tmp_path / "whole" / "model.safetensors.index.json").read_text())["weight_map"]
    back = HybridLM.from_pretrained(tmp_path / "pieces")
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())


class _ShardedInOneProcess:
    """The sharded-engine checkpoint interface over a plain model (one process holds every piece)."""

    sharded_checkpoints = True

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def sharded_state_dict(self):
        return {"model": self.model.state_dict(), "optim": get_optimizer_state_dict(self.model, self.optimizer)}


def _trained(seed=0):
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=seed)
    opt = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 512, (1, 8))).float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_async_save_becomes_latest_only_when_written(tmp_path):
    model, opt = _trained()
    engine = _ShardedInOneProcess(model, opt)
    mgr = CheckpointManager(tmp_path / "run", keep_last=3, async_save=True)
    mgr.save(1, engine, model.config, {"step": 1})  # blocking: latest at once
    assert mgr.latest().name == "step_00000001"
    with torch.no_grad():
        model.lm_head.weight.fill_(2.0)
    saved_moment = opt.state[model.lm_head.weight]["exp_avg"].clone()
    mgr.save(2, engine, model.config, {"step": 2}, blocking=False)
    assert mgr.latest().name == "step_00000001"  # in flight: a crash now leaves step 1
    assert not (tmp_path / "run" / "checkpoints" / "step_00000002").exists()
    with torch.no_grad():  # training goes on and changes the live tensors; the save has its own copy
        model.lm_head.weight.fill_(3.0)
        opt.state[model.lm_head.weight]["exp_avg"].fill_(7.0)
    mgr.wait()
    latest = mgr.latest()
    assert latest.name == "step_00000002" and (latest / "dcp" / ".metadata").exists()
    # a gathered engine resumes it: weights from model/, the optimizer as whole tensors from dcp/
    fresh, fresh_opt = _trained(seed=1)
    trainer_state, opt_state = mgr.load(latest, fresh)
    assert trainer_state == {"step": 2} and bool((fresh.lm_head.weight == 2.0).all())
    DataParallelEngine(fresh, fresh_opt, CPU).load_optimizer_state(opt_state, latest)
    assert torch.equal(fresh_opt.state[fresh.lm_head.weight]["exp_avg"], saved_moment)
    assert [g["name"] for g in fresh_opt.param_groups] == ["decay", "no_decay"]
    # the same step again right after (a preemption after a periodic save): nothing is rewritten
    before = (latest / "dcp" / ".metadata").stat().st_mtime_ns
    mgr.save(2, engine, model.config, {"step": 2})
    assert (latest / "dcp" / ".metadata").stat().st_mtime_ns == before and mgr.latest() == latest


@pytest.mark.parametrize("override, message", [
    ("parallel.engine=megatron", "parallel.engine must be one of"),
    ("parallel.fsdp_param_dtype=fp16", "parallel.fsdp_param_dtype must be one of"),
])
def test_parallel_choices_are_validated(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_recipe("smoke", [*TINY_RUN, f"run.dir={tmp_path}", override]))


def test_engine_and_zero_stage_must_agree(tmp_path):
    for overrides, message in ((["parallel=fsdp", "parallel.zero_stage=2"], "ZeRO is the zero engine"),
                               (["parallel.engine=zero"], "needs parallel.zero_stage 1, 2 or 3")):
        with pytest.raises(ConfigError, match=message):
            validate_config(compose_recipe("smoke", [*TINY_RUN, f"run.dir={tmp_path}", *overrides]))


def test_export_streams_a_sharded_checkpoint_to_the_released_layout(tmp_path, capsys):
    """``tandem export``: the dcp/ master weights of a sharded checkpoint, cast to bf16 except the router."""
    from tandem.trainer.cli import export_main

    model, opt = _trained()
    cfg = HybridConfig.preset("tiny")
    mgr = CheckpointManager(tmp_path / "run", keep_last=1)
    mgr.save(3, _ShardedInOneProcess(model, opt), cfg, {"step": 3})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("{}")  # someone else's file in the target: kept
    assert export_main([str(tmp_path / "run"), "--to", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    back = HybridLM.from_pretrained(tmp_path / "out")
    assert back.lm_head.weight.dtype == torch.bfloat16 and (tmp_path / "out" / "tokenizer.json").exists()
    for k, v in model.state_dict().items():
        want = v if k.endswith(("gate.weight", "e_score_correction_bias")) else v.to(torch.bfloat16)
        assert torch.equal(back.state_dict()[k], want), k
    assert export_main([str(tmp_path / "missing"), "--to", str(tmp_path / "x")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["__0_0.distcp", ".metadata"])
def test_truncated_sharded_checkpoint_is_one_checkpoint_error(damage, tmp_path):
    model, opt = _trained()
    mgr = CheckpointManager(tmp_path / "run", keep_last=1)
    step = mgr.save(1, _ShardedInOneProcess(model, opt), model.config, {"step": 1})
    victim = step / "dcp" / damage
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="possibly truncated or corrupt"):
        mgr.load(step, HybridLM(HybridConfig.preset("tiny"), init_seed=1))
