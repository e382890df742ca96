"""The memory planner (``tandem plan``): exact parameter counts, fake-tensor probes that keep the real
footprint, predictions within ±15% of measured peaks of real runs, and the nano3 recipes fitting the
cluster shapes their sbatch scripts name."""

import dataclasses
import json
import re

import pytest
import torch

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.plan import Cluster, Generation, Layout, _run_tracked, generation_from_config, inventory, plan, probe_block

from .conftest import REPO, compose_recipe, run_cli, run_torchrun

#: a config where the training state dominates (≈ 100M parameters, 98% routed experts) but steps are quick
MEASURED = dict(hybrid_override_pattern="ME*EME", hidden_size=512, n_routed_experts=32, moe_intermediate_size=1024,
                num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
MEASURED_ARGS = [f"model.{k}={v}" for k, v in MEASURED.items()] + [
    "stage.steps=2", "stage.global_batch=8", "stage.micro_batch=4", "stage.save_every=0", "stage.eval_batches=0",
    "data.seq_len=256", "logger.log_every=1", "logger.progress_bar=false",
]
RUNTIME_ARGS = ["stage.steps=2", "stage.global_batch=8", "stage.micro_batch=4", "stage.save_every=0",
                "stage.eval_batches=0", "data.seq_len=256", "logger.log_every=1", "logger.progress_bar=false"]


def test_inventory_counts_every_parameter_once():
    cfg = HybridConfig.preset("tiny", **MEASURED)
    inv = inventory(cfg)
    model = HybridLM(cfg, device="meta")
    assert inv.dense + inv.expert == sum(p.numel() for p in model.parameters()) == model.parameter_count().total
    assert inv.expert == 3 * 2 * 32 * 1024 * 512  # three MoE layers of 32 experts (up + down)
    assert inv.largest_block_local(2) == pytest.approx(max(d + e / 2 for d, e in inv.blocks))


@pytest.mark.parametrize("kind", ["M", "*", "E"])
def test_fake_probe_keeps_the_real_footprint(kind):
    """The probe runs on fake tensors with stand-ins for the MoE dispatch and expert GEMMs; the bytes it
    reports must be what a real forward/backward of the same block keeps (real routing, real kernels)."""
    from tandem.model.hybrid import HybridBlock

    cfg = HybridConfig.preset("tiny", **MEASURED)
    fake_kept, fake_trans = probe_block(cfg, kind, 2, 256, "fp32", False, False, 1)
    block = HybridBlock(dataclasses.replace(cfg, hybrid_override_pattern=kind), 0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    block.train()
    real_kept, real_trans = _run_tracked(block, lambda: (torch.randn(2, 256, cfg.hidden_size, requires_grad=True),),
                                         lambda y: y.float().square().mean(), torch.float32, False)
    assert real_kept > 0
    assert abs(fake_kept - real_kept) <= 0.10 * real_kept, (kind, fake_kept, real_kept)
    assert abs(fake_trans - real_trans) <= 0.25 * max(real_trans, real_kept), (kind, fake_trans, real_trans)


def test_activation_checkpointing_and_sharding_lower_the_plan():
    cfg = HybridConfig.preset("tiny", **MEASURED)
    cluster = Cluster(1, 4, 80, "cpu")
    base = plan(cfg, cluster, Layout("ddp", 1), tokens=1024, batch_rows=4)
    ep = plan(cfg, cluster, Layout("ddp", 4), tokens=1024, batch_rows=4)
    zero3 = plan(cfg, cluster, Layout("zero3", 1), tokens=1024, batch_rows=4)
    assert ep.rows["weights"] == pytest.approx(4 * (inventory(cfg).dense + inventory(cfg).expert / 4))
    assert zero3.rows["optimizer (AdamW moments)"] == pytest.approx(base.rows["optimizer (AdamW moments)"] / 4)
    assert ep.peak < base.peak and zero3.peak < base.peak


def _growth(run_dir) -> float:
    """Peak memory over the run's base, bytes, of the largest rank (the loop logs both)."""
    last = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    return (last["mem_peak_gb"] - last["mem_base_gb"]) * 1e9


def _run(tmp_path, name, args, nproc):
    run_dir = tmp_path / name
    if nproc == 1:
        res = run_cli("-cn", "smoke", *args, f"run.dir={run_dir}")
    else:
        res = run_torchrun("-cn", "smoke", "parallel=ddp_gloo", *args, f"run.dir={run_dir}", nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    return _growth(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,overrides,layout", [
    (1, [], Layout("ddp", 1)),
    (2, ["parallel.ep=2"], Layout("ddp", 2)),
    (2, ["parallel.zero_stage=2"], Layout("zero2", 1)),
], ids=["single", "ep2", "zero2"])
def test_plan_predicts_the_measured_peak(tmp_path, nproc, overrides, layout):
    """Measured: VmHWM − RSS before the build, largest rank, of a real 2-step run, minus the same figure for
    the tiny model under the same layout (what the runtime itself adds once training starts: thread pools,
    DeepSpeed's import). Predicted: the planner's peak for this config on CPU numerics."""
    measured = _run(tmp_path, "model", [*MEASURED_ARGS, *overrides], nproc)
    runtime = _run(tmp_path, "runtime", [*RUNTIME_ARGS, *overrides], nproc)
    predicted = plan(HybridConfig.preset("tiny", **MEASURED), Cluster(1, nproc, 80, "cpu"), layout,
                     tokens=4 * 256, batch_rows=4).peak
    model_part = measured - runtime
    print(f"plan vs measured [{layout}]: predicted {predicted / 1e9:.3f} GB, measured {model_part / 1e9:.3f} GB "
          f"({measured / 1e9:.3f} − runtime {runtime / 1e9:.3f}), {predicted / model_part - 1:+.1%}")
    assert abs(predicted - model_part) <= 0.15 * model_part, (predicted / 1e9, model_part / 1e9, runtime / 1e9)


def _sbatch_shape(script: str) -> tuple[int, int]:
    text = (REPO / "slurm" / script).read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", text, re.M).group(1))
    return nodes, gpus


def test_nano3_recipes_fit_the_cluster_their_sbatch_names():
    """On 80 GB GPUs (H100), at the node count each sbatch script asks for (in-process: the recipes share one
    model shape, so the probes run once per row length). The SFT recipes take the architecture from their
    checkpoint, so the plan names it (model.preset=nano3), as `tandem plan` users do. The 512k CPT fits
    only through context parallelism 16 with every block checkpointed."""
    from tandem.trainer.config import build_hybrid_config, row_length
    from tandem.trainer.plan import layout_from_config

    for recipe, script in [("nano3_pretrain", "pretrain.sbatch"), ("sft", "sft.sbatch"),
                           ("finetune_from_release", "sft.sbatch"), ("nano3_cpt_512k", "cpt.sbatch"),
                           ("nano3_rlvr", "rlvr.sbatch"), ("nano3_rlhf", "rlhf.sbatch")]:
        nodes, gpus = _sbatch_shape(script)
        cfg = compose_recipe(recipe, ["model.preset=nano3"])
        cluster = Cluster(nodes, gpus, 80.0, "cuda")
        layout = layout_from_config(cfg, cluster)
        model_cfg = build_hybrid_config(cfg.model)
        generation, _ = generation_from_config(cfg, model_cfg, cluster)
        p = plan(model_cfg, cluster, layout,
                 tokens=cfg.stage.micro_batch * row_length(cfg)[0], batch_rows=cfg.stage.micro_batch,
                 accumulating=cfg.stage.global_batch > cfg.stage.micro_batch * cluster.world // layout.cp,
                 generation=generation)
        assert p.layout.engine == "fsdp" and p.layout.ep == 8, (recipe, p.layout)
        assert p.fits, (recipe, p.table())
        if recipe in ("nano3_rlvr", "nano3_rlhf"):  # generation is planned: the gathered weights, caches (and judge)
            assert p.rows["rollout weights gathered (fsdp)"] > 10e9 and p.rows["rollout KV + SSM cache"] > 1e9, p.table()
            assert ("judge weights (frozen)" in p.rows) == (recipe == "nano3_rlhf"), p.table()
        if recipe == "nano3_cpt_512k":
            assert p.layout.cp == 16 and (nodes, gpus) == (8, 8), p.layout


def test_plan_bad_input_is_one_line_exit_2():
    res = run_cli("plan", "-cn", "smoke", "--nodes", "0")
    assert res.returncode == 2 and "--nodes" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("plan", "-cn", "smoke", "parallel.ep=3", "--gpus-per-node", "2")
    assert res.returncode == 2 and "parallel.ep=3" in res.stderr, res.stderr


def test_generation_rows_are_what_generation_allocates(tmp_path):
    """The planner's generation rows against the real objects: the rollout cache against
    ``HybridCache.allocate`` at the same shape, the judge's weights against a judge loaded by the RLHF path
    (EP 1 here: whole), and a generating stage's peak takes the larger of training and generating."""
    from tandem.model.cache import HybridCache
    from tandem.trainer.parallel import DistInfo
    from tandem.trainer.stages.rlhf import load_judge

    cfg = HybridConfig.preset("tiny")
    HybridLM(cfg, init_seed=0).save_pretrained(tmp_path / "judge")
    judge = load_judge(str(tmp_path / "judge"), DistInfo(0, 1, 0, torch.device("cpu")), torch.float32)
    cluster = Cluster(1, 1, 80, "cpu")
    gen = Generation(rows=4, max_len=96, judge=cfg, judge_rows=3, judge_max_len=200, judge_bytes=4)
    base = plan(cfg, cluster, Layout("ddp", 1), tokens=256, batch_rows=4)
    p = plan(cfg, cluster, Layout("ddp", 1), tokens=256, batch_rows=4, generation=gen)
    assert p.rows["rollout KV + SSM cache"] == HybridCache.allocate(cfg, 4, 96).nbytes().total
    assert p.rows["judge KV + SSM cache"] == HybridCache.allocate(cfg, 3, 200).nbytes().total
    assert p.rows["judge weights (frozen)"] == sum(t.numel() * t.element_size() for t in judge.parameters())
    assert p.rows["rollout weights gathered (fsdp)"] == 0  # ddp generates from the weights it trains
    assert p.peak >= base.peak + p.rows["judge weights (frozen)"]
    # a composed rlhf recipe: the judge's architecture from its folder when it is there
    rc = compose_recipe("rlhf", ["model.preset=tiny", "model.init_from=null", f"stage.rlhf.judge={tmp_path / 'judge'}"])
    g, note = generation_from_config(rc, cfg, cluster)
    assert g.judge == judge.config and str(tmp_path / "judge") in note and g.judge_bytes == 4
    rc = compose_recipe("rlhf", ["model.preset=tiny", "model.init_from=null", f"stage.rlhf.judge={tmp_path / 'nope'}"])
    g, note = generation_from_config(rc, cfg, Cluster(1, 8, 80, "cuda"))
    assert g.judge == cfg and "assumed to be the policy's architecture" in note and g.judge_bytes == 2
    assert g.judge_rows == 4  # one group's comparisons (circular, G = 4), not judge_batch = 16
    # a KL reference is a persistent fp32 copy; vLLM's rollouts are its GPU share instead of the engine's rows
    gc = compose_recipe("grpo", ["model.preset=tiny", "model.init_from=null", "stage.grpo.kl_beta=0.1",
                                 "stage.grpo.kl_reference=x", "stage.grpo.rollout_backend=vllm"])
    g, _ = generation_from_config(gc, cfg, Cluster(1, 8, 80, "cuda"))
    p = plan(cfg, cluster, Layout("ddp", 1), tokens=256, batch_rows=4, generation=g)
    assert p.rows["reference model (kl_beta > 0)"] == 4 * (inventory(cfg).dense + inventory(cfg).expert)
    assert p.rows["vllm rollouts (its GPU share)"] == 0.5 * 80e9 and "rollout KV + SSM cache" not in p.rows
    assert p.peak >= 0.5 * 80e9
