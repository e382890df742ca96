"""Run by torchrun (2 processes, gloo): EP=2 forward/backward vs the full model in one process.

Writes a JSON verdict to argv[1] from rank 0.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.config import ParallelConfig
from tandem.trainer.parallel.data_parallel import DataParallelEngine
from tandem.trainer.parallel.distributed import init_distributed
from tandem.trainer.parallel.expert import apply_expert_parallel
from tandem.trainer.optim import build_optimizer
from tandem.trainer.config import OptimConfig


def main(out_path):
    info = init_distributed(ParallelConfig(backend="gloo", ep=2))
    rank = info.rank
    cfg = HybridConfig.preset("tiny", hybrid_override_pattern="E*EM")
    ref = HybridLM(cfg, init_seed=0).train()
    g = torch.Generator().manual_seed(7)  # the same bias on both ranks
    with torch.no_grad():
        for m in ref.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.randn(m.e_score_correction_bias.shape, generator=g) * 0.1)
    ep_model = copy.deepcopy(ref)
    apply_expert_parallel(ep_model, info.ep_group)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, 512, (2, 13), generator=gen) for _ in range(2)]  # one per rank

    # reference: both ranks' losses in one process with all experts local
    ref_loss = sum(ref(x).float().logsumexp(-1).mean() for x in inputs)
    ref_loss.backward()
    ref_logits = ref(inputs[rank]).detach()

    logits = ep_model(inputs[rank])
    logits.float().logsumexp(-1).mean().backward()
    engine = DataParallelEngine(ep_model, build_optimizer(ep_model, OptimConfig()), info)
    engine.reduce_gradients()  # mean over ranks → ×2 to compare with the summed reference
    errors = {"logits": (logits.detach() - ref_logits).abs().max().item()}
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for name, p in ep_model.named_parameters():
        g_ref = ref_params[name].grad
        if getattr(p, "expert_parallel", False):
            m = ep_model.get_submodule(name.rsplit(".", 1)[0])
            g_ref = g_ref[m.expert_offset: m.expert_offset + m.num_experts]
        worst = max(worst, (p.grad * info.world_size - g_ref).abs().max().item())
    errors["grads"] = worst
    norm = engine.grad_norm_and_clip(0.0).item()
    ref_norm = torch.nn.utils.get_total_norm([p.grad / 2 for p in ref.parameters()]).item()
    errors["grad_norm"] = abs(norm - ref_norm)
    all_errors = [None, None]
    dist.all_gather_object(all_errors, errors)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(all_errors, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
