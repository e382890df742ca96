"""Run by torchrun (2 processes, gloo): context parallelism CP = 2 vs one process, forward and backward.

Each rank builds the same modules, runs the single-rank reference on the whole rows itself, then the CP
path on its load-balanced slice; parameter gradients are summed over the two ranks (each rank's loss
covers its own tokens) and compared with the reference. Packed documents cross the rank boundaries (and
the chunk boundaries inside a rank), one starts exactly at a chunk boundary, one is a single token.

Checks: attention alone, Mamba-2 alone, the whole model (Mamba + attention + MoE, per-token loss), the
whole model with EP = 2 over the same two ranks (CP × EP), and with every block activation-checkpointed. Writes a JSON verdict to argv[1] from rank 0.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

from tandem.model import HybridConfig, HybridLM
from tandem.model.attention import Attention
from tandem.model.mamba2 import Mamba2Mixer
from tandem.trainer.parallel.context import apply_context_parallel
from tandem.trainer.parallel.expert import apply_expert_parallel

T = 48  # 4 chunks of 12: rank 0 holds [0, 12) + [36, 48), rank 1 [12, 36)
BOUNDARIES = ([5, 25, 40, 41], [24, 30])  # row 0: [5, 25) crosses 3 chunks, [40, 41) one token; row 1: at 24


def seq_idx_of(b: int) -> torch.Tensor:
    s = torch.zeros(b, T, dtype=torch.long)
    for row, cuts in enumerate(BOUNDARIES[:b]):
        for c in cuts:
            s[row, c:] += 1
    return s


def grad_error(cp_mod, ref_mod) -> float:
    """Max |Σ_ranks CP grad − reference grad| over parameters (collective)."""
    worst, scale = 0.0, 0.0
    ref = dict(ref_mod.named_parameters())
    for name, p in cp_mod.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        worst = max(worst, (g - ref[name].grad).abs().max().item())
        scale = max(scale, ref[name].grad.abs().max().item())
    return worst / scale


def mixer_check(kind: str, cfg, cp_group) -> dict:
    torch.manual_seed(0)
    cls = Attention if kind == "attention" else Mamba2Mixer
    ref = cls(cfg, layer_idx=0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
        if kind == "mamba":
            ref.A_log.copy_(torch.rand(ref.A_log.shape).log1p())
    mod = copy.deepcopy(ref)
    cp = apply_context_parallel_to(mod, cp_group)
    b = 2
    x = torch.randn(b, T, cfg.hidden_size, requires_grad=True)
    w = torch.randn(b, T, cfg.hidden_size)
    seq = seq_idx_of(b)
    out_ref = ref(x, seq)
    (out_ref * w).sum().backward()
    x_loc = cp.shard(x.detach(), 1).requires_grad_(True)
    out = mod(x_loc, cp.shard(seq, 1))
    (out * cp.shard(w, 1)).sum().backward()
    return {"out": rel(out, cp.shard(out_ref, 1)), "input_grad": rel(x_loc.grad, cp.shard(x.grad, 1)),
            "grads": grad_error(mod, ref)}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| / max |ref|"""
    return ((a.detach() - ref.detach()).abs().max() / ref.detach().abs().max()).item()


def apply_context_parallel_to(module, group):
    """Install CP on a bare mixer (the trainer installs it on a whole model)."""
    from tandem.trainer.parallel.context import ContextParallel

    cp = ContextParallel(group)
    module.cp = cp
    return cp


def model_check(cfg, cp_group, ep_group=None, checkpointing=False) -> dict:
    ref = HybridLM(cfg, init_seed=0).train()
    model = copy.deepcopy(ref)
    cp = apply_context_parallel(model, cp_group)
    if checkpointing:  # the backward recomputes every block, and with it the K/V and state gathers
        model.set_activation_checkpointing("all")
    if ep_group is not None:
        apply_expert_parallel(model, ep_group)
    b = 2
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (b, T), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (b, T), generator=gen)
    labels[0, :3] = -100
    seq = seq_idx_of(b)
    loss_ref = ref(ids, seq, labels=labels)
    weight = float((labels >= 0).sum())  # the micro-batch's target tokens weight its aux losses (token_cross_entropy)
    aux_ref = ref.aux_loss()
    (loss_ref.sum() + (aux_ref * weight if aux_ref is not None else 0.0)).backward()
    loss = model(cp.shard(ids), cp.shard(seq), labels=cp.shard(labels))
    aux = model.aux_loss()  # this rank's share of the micro-batch's aux losses
    (loss.sum() + (aux * weight if aux is not None else 0.0)).backward()
    aux_error = 0.0
    if aux_ref is not None:
        total = aux.detach().clone()
        dist.all_reduce(total)
        aux_error = abs(total.item() - aux_ref.item()) / abs(aux_ref.item())
    worst, scale = 0.0, 0.0
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        r = ref_params[name].grad
        if getattr(p, "expert_parallel", False):
            # an expert shard already sums the gradients of every rank's tokens (they came by all-to-all)
            m = model.get_submodule(name.rsplit(".", 1)[0])
            r = r[m.expert_offset: m.expert_offset + m.num_experts]
        else:
            dist.all_reduce(g)
        worst = max(worst, (g - r).abs().max().item())
        scale = max(scale, r.abs().max().item())
    logits_ref = ref(ids, seq).detach()
    logits = model(cp.shard(ids), cp.shard(seq)).detach()
    local_experts = [m.num_experts for m in model.modules() if hasattr(m, "expert_offset")]
    return {"loss": rel(loss, cp.shard(loss_ref)), "logits": rel(logits, cp.shard(logits_ref)),
            "grads": worst / scale, "aux": aux_error, "local_experts": local_experts[0], "cp_rank": cp.rank}


def te_check(out_path):
    """GPU-only (2 CUDA devices, Transformer Engine): TE's CP attention equals the SDPA CP path and the
    single-rank result on one-document rows, forward and backward, bf16."""
    from tandem.trainer.parallel.context import ContextParallel

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    cfg = HybridConfig.preset("tiny", hybrid_override_pattern="*", num_attention_heads=8, num_key_value_heads=2,
                              head_dim=64, hidden_size=256)
    torch.manual_seed(0)
    ref = Attention(cfg, 0).cuda().to(torch.bfloat16)
    b, t = 2, 1024
    x = torch.randn(b, t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn_like(x)
    out_ref = ref(x)
    (out_ref.float() * w).sum().backward()
    results = {}
    for mode in ("sdpa", "te"):
        mod = copy.deepcopy(ref)
        mod.zero_grad()
        cp = ContextParallel(dist.group.WORLD, attention=mode)
        mod.cp = cp
        x_loc = cp.shard(x.detach(), 1).requires_grad_(True)
        out = mod(x_loc)
        (out.float() * cp.shard(w, 1)).sum().backward()
        results[mode] = {"out": rel(out, cp.shard(out_ref, 1)), "input_grad": rel(x_loc.grad, cp.shard(x.grad, 1)),
                         "used_te": bool(cp._te_modules)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f, indent=1)
    dist.destroy_process_group()


def main(out_path):
    dist.init_process_group("gloo")
    torch.set_default_dtype(torch.float32)
    group = dist.group.WORLD
    cfg = HybridConfig.preset("tiny", hybrid_override_pattern="M*EM", chunk_size=8)
    results = {
        "attention": mixer_check("attention", cfg, group),
        "mamba": mixer_check("mamba", cfg, group),
        "model": model_check(cfg, group),
        "model_ep2": model_check(cfg, group, ep_group=group),
        "model_checkpointed": model_check(cfg, group, checkpointing=True),
        # DeepSeek-V3's sequence-wise balance loss and the z-loss: per-sequence statistics over the CP group
        "model_aux": model_check(HybridConfig.preset("tiny", hybrid_override_pattern="M*EM", chunk_size=8,
                                                     moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.1), group,
                                 checkpointing=True),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    te_check(sys.argv[1]) if sys.argv[2:] == ["te"] else main(sys.argv[1])
