"""Context parallelism (``parallel.cp``): CP = 2 equals one process, forward and backward.

One torchrun launch (2 gloo processes, ``cp_worker.py``) checks attention alone, Mamba-2 alone, the whole
model and the whole model with EP = 2 over the same ranks, on packed documents that cross rank and chunk
boundaries. Tolerances are relative to the largest reference value (fp32).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tandem.model import HybridConfig
from tandem.trainer.parallel.context import ContextParallel

from .conftest import REPO

TOL = 1e-5


def _torchrun(*args, nproc=2, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_cp2_forward_backward_equals_single_process(tmp_path):
    out = tmp_path / "verdict.json"
    res = _torchrun(str(REPO / "tests" / "trainer" / "cp_worker.py"), str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["model"]["cp_rank"] for r in ranks] == [0, 1]
    for r in ranks:
        for check in ("attention", "mamba"):
            for key in ("out", "input_grad", "grads"):
                assert r[check][key] <= TOL, (check, key, r[check])
        for check in ("model", "model_ep2", "model_checkpointed", "model_aux"):
            for key in ("loss", "logits", "grads", "aux"):
                assert r[check][key] <= TOL, (check, key, r[check])
        assert r["model"]["local_experts"] == 8 and r["model_ep2"]["local_experts"] == 4


class _FakeGroupCP(ContextParallel):
    """The layout methods without a process group (rank/size given)."""

    def __init__(self, size, rank):
        self.group, self.size, self.rank = None, size, rank
        self.chunk_ids = (rank, 2 * size - 1 - rank)


def test_load_balanced_split_covers_every_token_once():
    t = torch.arange(24)[None]
    pieces = [_FakeGroupCP(3, r).shard(t) for r in range(3)]
    assert pieces[0].tolist() == [[0, 1, 2, 3, 20, 21, 22, 23]]
    assert sorted(torch.cat(pieces, 1)[0].tolist()) == list(range(24))
    for r in range(3):
        assert torch.equal(_FakeGroupCP(3, r).positions(8), pieces[r][0])
    with pytest.raises(ValueError, match="divisible by 2 × parallel.cp = 6"):
        _FakeGroupCP(3, 0).shard(torch.arange(20)[None])


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_cp2_training_equals_single_process_and_resumes_at_cp1(tmp_path):
    """``parallel=cp2`` (2 gloo processes, the smoke model: Mamba + attention + MoE with its balance and z
    losses, packed documents)
    trains 4 steps and saves at step 2; one process resumes that checkpoint and its steps 3–4 equal the
    CP run's — loss (the global token mean), gradient norm, token counts, expert loads, validation loss.
    Same weights, same rows: the CP wiring (rows per replica, slices, count reduction, DP × CP gradient
    sum) is checked against one process, and the CP checkpoint is one a single process continues exactly.
    (Two launches rather than three: an uninterrupted single-process run adds nothing the resume does not
    check, and the forward/backward test above covers the step from the initial weights.)"""
    from .conftest import TINY_RUN, run_cli

    # with both MoE aux losses on: their per-sequence statistics span the CP group (shares weighted by the
    # whole micro-batch's target tokens)
    args = [*TINY_RUN, "stage.steps=4", "stage.save_every=2", "model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001"]
    cp = _torchrun("-m", "tandem.trainer.cli", "-cn", "smoke", "parallel=cp2", *args, f"run.dir={tmp_path / 'cp2'}")
    assert cp.returncode == 0, cp.stderr[-3000:]
    step2 = tmp_path / "cp2" / "checkpoints" / "step_00000002"
    single = run_cli("-cn", "smoke", *args, f"run.dir={tmp_path / 'single'}", f"run.resume={step2}")
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _records(tmp_path / "cp2" / "metrics.jsonl"), _records(tmp_path / "single" / "metrics.jsonl")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [3, 4]
    for x, y in zip(a[2:], b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * y["loss"], (a, b)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * y["grad_norm"], (a, b)
        assert (x["target_tokens"], x["tokens"]) == (y["target_tokens"], y["tokens"])  # counts reduced over CP
        assert x["moe/max_load"] == y["moe/max_load"]  # expert-bias updates from the global counts
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-5 * b[-1]["val_loss"]


def test_te_attention_is_a_method_that_declines_off_gpu():
    """The TE path is reached as ``docs.context.te_attention`` on CUDA; off CUDA (or when not chosen) it
    declines so the SDPA path runs."""
    cp = _FakeGroupCP(2, 0)
    cp.attention = "te"
    q = torch.randn(1, 2, 4, 8)
    assert cp.te_attention(q, q, q, scale=1.0) is None


def test_cp_refusals_name_the_key(tiny_cfg):
    from tandem.trainer.config import ConfigError, build_hybrid_config
    from tandem.trainer.parallel.context import check_context_parallel

    def refused(*overrides):
        cfg = tiny_cfg(*overrides)
        with pytest.raises(ConfigError) as e:
            check_context_parallel(cfg, build_hybrid_config(cfg.model))
        return str(e.value)

    assert "data.seq_len=30 must be divisible by 2 × parallel.cp = 4" in refused("parallel.cp=2", "data.seq_len=30")
    assert "shorter than the Mamba conv window" in refused("parallel.cp=8", "data.seq_len=32")
    assert "parallel.cp must be >= 1" in refused("parallel.cp=0")
    cfg = tiny_cfg("parallel.cp=2")
    check_context_parallel(cfg, build_hybrid_config(cfg.model))  # accepted


class _LoopbackCP(_FakeGroupCP):
    """CP = 2 layout whose "gather" repeats this rank's chunks: real shapes without a process group."""

    def gather_chunks(self, x):
        return torch.cat([x, x.flip(0)], dim=0)


def test_planner_counts_the_gathered_kv_per_rank():
    """``tandem plan`` at cp = 2: every block is probed at half the tokens, and the attention layers add
    the gathered K/V — checked against MemTracker on a real attention block running the CP path (with a
    loopback gather), within 10%; the peak per rank falls."""
    from tandem.model.hybrid import HybridBlock
    from tandem.trainer.plan import Cluster, Layout, _run_tracked, plan

    cfg = HybridConfig.preset("tiny", hybrid_override_pattern="M*", hidden_size=128, num_key_value_heads=4,
                              num_attention_heads=4, head_dim=32)
    rows, t = 2, 512
    cluster = Cluster(1, 2, 80, "cpu")
    one = plan(cfg, cluster, Layout("ddp", 1), tokens=rows * t, batch_rows=rows)
    two = plan(cfg, cluster, Layout("ddp", 1, cp=2), tokens=rows * t, batch_rows=rows)
    assert two.tokens == rows * t // 2 and two.peak < one.peak
    assert two.activations_by_kind["mamba"] < 0.6 * one.activations_by_kind["mamba"]

    torch.manual_seed(0)
    block = HybridBlock(cfg, 1).train()
    block.mixer.cp = _LoopbackCP(2, 1)  # rank 1: chunks 1 and 2, the largest masks on CPU
    real_kept, _ = _run_tracked(block, lambda: (torch.randn(rows, t // 2, cfg.hidden_size, requires_grad=True),),
                                lambda y: y.float().square().mean(), torch.float32, False)
    planned = two.activations_by_kind["attention"]
    assert abs(planned - real_kept) <= 0.10 * real_kept, (planned, real_kept)


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="Transformer Engine's CP attention needs 2 CUDA devices (nccl); this machine has fewer")
@pytest.mark.skipif(not _te_available(), reason="transformer_engine is not installed")
def test_te_cp_attention_matches_sdpa_path(tmp_path):
    out = tmp_path / "verdict.json"
    res = _torchrun(str(REPO / "tests" / "trainer" / "cp_worker.py"), str(out), "te")
    assert res.returncode == 0, res.stderr[-3000:]
    for r in json.loads(out.read_text()):
        assert r["te"]["used_te"] and not r["sdpa"]["used_te"]
        for mode in ("sdpa", "te"):
            assert r[mode]["out"] <= 2e-2 and r[mode]["input_grad"] <= 2e-2, r


def test_deepspeed_accumulation_follows_the_data_parallel_size():
    """ZeRO under CP: each CP slice is one of DeepSpeed's samples, so a CP group of 2 on 2 ranks (one
    replica) accumulates all of a step's micro-batches (checked by hand against one process: equal)."""
    from tandem.trainer.config import OptimConfig, ParallelConfig, StageConfig
    from tandem.trainer.parallel.zero import deepspeed_config

    stage = StageConfig(global_batch=4, micro_batch=2)
    plain = deepspeed_config(ParallelConfig(zero_stage=1), OptimConfig(), stage, world_size=2)
    cp = deepspeed_config(ParallelConfig(zero_stage=1, cp=2), OptimConfig(), stage, world_size=2, cp=2)
    assert (plain["gradient_accumulation_steps"], plain["train_batch_size"]) == (1, 4)
    assert (cp["gradient_accumulation_steps"], cp["train_batch_size"]) == (2, 8)
