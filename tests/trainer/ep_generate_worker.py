"""Run by torchrun (2 processes, gloo): generation under EP=2 in lockstep vs all experts in one process.
argv[2] says how the EP model is made: ``frozen`` — saved, then read back by ``load_frozen`` (each rank
allocates and reads only its experts; the RLHF judge's path), decoding with the static engine
(``stage.grpo.rollout_engine=static``: ``LockstepGeneration.decode_step``) against the static engine on the
whole model; ``fsdp`` — also FSDP2-sharded, as GRPO's ``parallel=fsdp_ep2`` runs it: the eager engine,
then the static one (each against the same engine on the whole model), then bf16 compute.

The ranks generate different prompts, a different number of ``generate`` calls and rows that stop at
different steps (so their forward counts differ); each rank's tokens must equal what its model with every
expert local generates. Writes a JSON verdict (per rank) to argv[1] from rank 0.
"""

import copy
import json
import sys
import zlib

import torch
import torch.distributed as dist

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.config import ParallelConfig
from tandem.trainer.inference.engine import GenerationEngine, SamplingParams
from tandem.trainer.parallel import load_frozen
from tandem.trainer.parallel.distributed import device_meshes, init_distributed
from tandem.trainer.parallel.fsdp import apply_fsdp
from tandem.trainer.parallel.expert import apply_expert_parallel
from tandem.trainer.parallel.lockstep import LockstepGeneration

#: per rank: the generate calls it makes, (prompt lengths, max_new_tokens, sampled?)
CALLS = {
    0: [((5, 9, 2), 8, False), ((20,), 4, True)],
    1: [((3,), 2, True)],
}


def main(out_path, mode, folder=None):
    info = init_distributed(ParallelConfig(backend="gloo", ep=2, engine="fsdp" if mode == "fsdp" else "auto"))
    rank = info.rank
    cfg = HybridConfig.preset("tiny", hybrid_override_pattern="E*EM")
    ref = HybridLM(cfg, init_seed=0).eval()
    with torch.no_grad():  # O(1) activations: no near-tie greedy choices
        for name, p in ref.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                p.normal_(std=p.shape[-1] ** -0.5, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    if mode == "frozen":
        if rank == 0:
            ref.save_pretrained(folder)
        dist.barrier()
        ep_model = load_frozen(folder, info, dtype=torch.float32)
        local = [m.num_experts for m in ep_model.modules() if hasattr(m, "expert_offset")]
        assert local == [cfg.n_routed_experts // 2] * 2, local  # this rank's half of each MoE layer's experts
        assert not any(p.requires_grad for p in ep_model.parameters()) and not ep_model.training
    else:
        ep_model = copy.deepcopy(ref)
        apply_expert_parallel(ep_model, info.ep_group)
    if mode == "fsdp":
        apply_fsdp(ep_model, device_meshes(info), world_size=info.world_size, param_dtype=None)
    gen = torch.Generator().manual_seed(100 + rank)
    calls = [([torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths],
              SamplingParams(max_new_tokens=new, greedy=not sampled, temperature=1.0 if not sampled else 0.8,
                             seed=rank + 1)) for lengths, new, sampled in CALLS[rank]]
    static = mode == "frozen"
    expected = [GenerationEngine(ref, max_batch=2, prefill_chunk=8, static=static).generate(p, prm) for p, prm in calls]
    lockstep = LockstepGeneration(ep_model, info.ep_group)
    engine = GenerationEngine(lockstep, max_batch=2, prefill_chunk=8, static=static)
    if mode == "fsdp":  # FSDP's lazy initialisation happens at the first forward: do it before counting
        with torch.no_grad():
            ep_model.hidden_states(torch.zeros(1, 1, dtype=torch.long))
    gathers = []  # weight all-gathers while generating (FSDP's collective)
    real_gather = dist.all_gather_single
    dist.all_gather_single = lambda *a, **k: (gathers.append(1), real_gather(*a, **k))[1]
    with lockstep:  # gathers FSDP-sharded weights once; drains on exit
        start = len(gathers)
        got = [engine.generate(p, prm) for p, prm in calls]
        drained = lockstep.drain()  # what the exit does too (then again, with nothing left to partner)
        gathers_while_generating = len(gathers) - start
    dist.all_gather_single = real_gather
    verdict = {
        "tokens_equal": [[r.tokens for r in g] for g in got] == [[r.tokens for r in e] for e in expected],
        "logprob_err": max(abs(a - b) for g, e in zip(got, expected) for rg, re in zip(g, e)
                           for a, b in zip(rg.logprobs, re.logprobs)),
        "dummy_forwards": drained,
        "gathers_on_entry": start, "gathers_while_generating": gathers_while_generating,
    }
    if mode == "fsdp":  # the static engine (rollout_engine=static) on the FSDP2 x EP model, in lockstep
        want = [GenerationEngine(ref, max_batch=2, prefill_chunk=8, static=True).generate(p, prm) for p, prm in calls]
        static_engine = GenerationEngine(lockstep, max_batch=2, prefill_chunk=8, static=True)
        with lockstep:
            got_static = [static_engine.generate(p, prm) for p, prm in calls]
        verdict["static_tokens_equal"] = [[r.tokens for r in g] for g in got_static] == [[r.tokens for r in e] for e in want]
        # the cluster's numerics: FSDP2 gathers bf16 weights; the KV cache must follow them
        bf = copy.deepcopy(ref)
        apply_expert_parallel(bf, info.ep_group)
        apply_fsdp(bf, device_meshes(info), world_size=info.world_size, param_dtype=torch.bfloat16)
        with torch.no_grad():
            bf.hidden_states(torch.zeros(1, 1, dtype=torch.long))
        bf_lock = LockstepGeneration(bf, info.ep_group)
        bf_engine = GenerationEngine(bf_lock, max_batch=2, prefill_chunk=8)
        with bf_lock:
            verdict["bf16_cache_dtype"] = str(bf_engine.dtype)
            verdict["bf16_tokens"] = sum(len(r.tokens) for r in bf_engine.generate(*calls[0]))
    all_verdicts = [None, None]
    dist.all_gather_object(all_verdicts, verdict)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(all_verdicts, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
