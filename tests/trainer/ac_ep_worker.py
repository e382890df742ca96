"""Run by torchrun (2 processes, gloo): EP=2 with every block activation-checkpointed (the MoE recompute
repeats its all-to-alls in the backward) vs the full model in one process without checkpointing.

Writes a JSON verdict to argv[1] from rank 0.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

from tandem.model import HybridConfig, HybridLM
from tandem.model.moe import MoE
from tandem.trainer.config import OptimConfig, ParallelConfig
from tandem.trainer.optim import build_optimizer
from tandem.trainer.parallel.data_parallel import DataParallelEngine
from tandem.trainer.parallel.distributed import init_distributed
from tandem.trainer.parallel.expert import apply_expert_parallel


def loss_of(model, ids, labels):
    return model(ids, labels=labels).sum() + 10.0 * model.aux_loss()


def counts_of(model):
    return torch.stack([m.tokens_per_expert_acc for m in model.modules() if isinstance(m, MoE)])


def main(out_path):
    info = init_distributed(ParallelConfig(backend="gloo", ep=2))
    rank = info.rank
    cfg = HybridConfig.preset("tiny", hybrid_override_pattern="E*EM", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3)
    ref = HybridLM(cfg, init_seed=0).train()
    ep_model = copy.deepcopy(ref)
    apply_expert_parallel(ep_model, info.ep_group)
    ep_model.set_activation_checkpointing("all")
    ep_model.loss_chunk_tokens = 7
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 512, (2, 13), generator=gen), torch.randint(0, 512, (2, 13), generator=gen)) for _ in range(2)]

    sum(loss_of(ref, *d) for d in data).backward()  # both ranks' losses, all experts local, no recompute
    loss_of(ep_model, *data[rank]).backward()
    engine = DataParallelEngine(ep_model, build_optimizer(ep_model, OptimConfig()), info)
    engine.reduce_gradients()  # mean over ranks → ×2 to compare with the summed reference
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for name, p in ep_model.named_parameters():
        g_ref = ref_params[name].grad
        if getattr(p, "expert_parallel", False):
            m = ep_model.get_submodule(name.rsplit(".", 1)[0])
            g_ref = g_ref[m.expert_offset: m.expert_offset + m.num_experts]
        worst = max(worst, (p.grad * info.world_size - g_ref).abs().max().item())
    counts = counts_of(ep_model).clone()
    dist.all_reduce(counts)
    errors = {"grads": worst, "counts_equal": bool(torch.equal(counts, counts_of(ref)))}
    all_errors = [None, None]
    dist.all_gather_object(all_errors, errors)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(all_errors, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
