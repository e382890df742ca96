"""Decode throughput: tandem's GenerationEngine (eager, static, compiled) vs transformers'
NemotronHForCausalLM.generate.

    python bench/generate.py --threads 1              # small-but-not-tiny random model, CPU, batch 1 and 8
    python bench/generate.py --batch 1 8 --new 64 --context 1024 8192
    python bench/generate.py --threads 1 --engines compiled --batch 8 --profile   # where the time goes

All run the same random weights (ours saved with ``save_pretrained``, loaded by transformers), greedy,
the same prompts, exactly ``--new`` new tokens (no stop token). Our engines: ``eager`` (the Python loop,
finished rows dropped), ``static`` (``GenerationEngine(static=True)``: fixed shapes, bookkeeping on the
device, eager ops) and ``compiled`` (``compile=True``: the static step through ``torch.compile``; its
compile happens in the warm-up and is reported separately). Decode tokens/s excludes the prefill:
``(new - 1) · batch / (t(new) - t(1))`` where ``t(n)`` is the wall time of a call generating ``n``
tokens (median over ``--iters``, every kind of call interleaved round-robin so a load spike on a shared
machine hits all alike). Prints each rate and its ratio to transformers (> 1: ours is faster) after
checking the greedy tokens agree, and the load average before and after. Then per-token decode time
after a 1k and an 8k prompt (batch 1, eager engine's step vs transformers, the model's forward step
timed directly: median of 16 steps): Mamba layers cost the same at any length, attention grows with it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.inference.engine import GenerationEngine, SamplingParams


#: our engines by name: GenerationEngine keyword arguments
ENGINES = {"eager": {}, "static": {"static": True}, "compiled": {"compile": True}}


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def build(args) -> HybridLM:
    cfg = HybridConfig.preset(
        "tiny", hybrid_override_pattern=args.pattern, vocab_size=args.vocab, hidden_size=args.hidden,
        num_attention_heads=args.hidden // 64, num_key_value_heads=2, head_dim=64, intermediate_size=2 * args.hidden,
        mamba_num_heads=2 * args.hidden // 64, mamba_head_dim=64, ssm_state_size=64, n_groups=2, chunk_size=64,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=args.hidden // 2,
        moe_shared_expert_intermediate_size=args.hidden, time_step_min=1e-5, time_step_limit=(1e-5, math.inf),
        max_position_embeddings=16384,
    )
    model = HybridLM(cfg, init_seed=0).eval()
    with torch.no_grad():  # O(1) activations everywhere (no near-tie greedy choices)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                p.normal_(std=p.shape[-1] ** -0.5)
            elif name.endswith("dt_bias"):
                p.uniform_(-2.0, 0.0)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pattern", default="MEM*M-ME")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    p.add_argument("--prompt", type=int, default=32, help="prompt length for the throughput comparison")
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--context", type=int, nargs="*", default=[1024, 8192])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engines", nargs="*", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--profile", action="store_true",
                   help="after the comparison, a torch.profiler table of one call per engine at the largest batch")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import NemotronHForCausalLM

    transformers.logging.set_verbosity_error()
    model = build(args)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = NemotronHForCausalLM.from_pretrained(d).eval()
    # No stop token on either side: exactly --new tokens each (min_new_tokens would instead forbid eos,
    # changing transformers' greedy choice wherever eos is the argmax).
    hf.generation_config.eos_token_id = None
    n_params = sum(x.numel() for x in model.parameters())
    print(f"pattern={args.pattern} hidden={args.hidden} vocab={args.vocab} params={n_params / 1e6:.1f}M "
          f"prompt={args.prompt} new={args.new} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"transformers={transformers.__version__} iters={args.iters}; {load()}")
    names = list(args.engines)
    head = " ".join(f"{n + ' tok/s':>15}" for n in names) + f" {'transformers tok/s':>19} " + " ".join(
        f"{n + '/hf':>12}" for n in names)
    print(f"{'batch':>5} {head}")
    g = torch.Generator().manual_seed(0)
    engines = {}
    for b in args.batch:
        prompts = torch.randint(3, args.vocab, (b, args.prompt), generator=g)
        for n in names:
            engines[n] = GenerationEngine(model, max_batch=b, **ENGINES[n])

        def ours(name):
            return lambda n: engines[name].generate(prompts.tolist(), SamplingParams(max_new_tokens=n, greedy=True))

        def theirs(n):
            with torch.inference_mode():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                   max_new_tokens=n, pad_token_id=0)

        fns = {n: ours(n) for n in names} | {"hf": theirs}
        ref = theirs(args.new)
        for n in names:
            t = time.perf_counter()
            mine = fns[n](args.new)  # also the warm-up (and the compile) of this engine
            if n == "compiled":
                print(f"  compiled: first call (compile + run) {time.perf_counter() - t:.1f} s")
            agree = sum(r.tokens == ref[i, args.prompt:].tolist() for i, r in enumerate(mine))
            if agree != b:
                print(f"  warning: {n}: greedy tokens agree with transformers for {agree}/{b} rows only")
        calls = {(name, n): fn for name, fn in fns.items() for n in (args.new, 1)}
        times = {key: [] for key in calls}
        for key, fn in calls.items():
            fn(key[1])  # warm-up
        for _ in range(args.iters):
            for key, fn in calls.items():
                t = time.perf_counter()
                fn(key[1])
                times[key].append(time.perf_counter() - t)
        med = {key: statistics.median(v) for key, v in times.items()}
        rate = {name: (args.new - 1) * b / (med[(name, args.new)] - med[(name, 1)]) for name in fns}
        cols = " ".join(f"{rate[n]:>15.0f}" for n in names) + f" {rate['hf']:>19.0f} " + " ".join(
            f"{rate[n] / rate['hf']:>11.2f}x" for n in names)
        print(f"{b:>5} {cols}   ({load()})")

    if args.profile:
        from torch.profiler import profile

        for n in names:
            fn = ours(n)
            with profile() as prof:
                fn(args.new)
            print(f"\nprofile: {n}, batch {args.batch[-1]}, {args.new} new tokens (self CPU time)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    if args.context:
        print("\nper-token decode time, batch 1: median of 16 single-token forward steps after a prefill of the given length")
        print(f"{'context':>8} {'ours ms/token':>14} {'transformers ms/token':>22} {'ours/transformers':>18}")
        for ctx in args.context:
            prompt = torch.randint(3, args.vocab, (1, ctx), generator=g)
            nxt = torch.randint(3, args.vocab, (1, 1), generator=g)
            with torch.inference_mode():
                cache = model.allocate_cache(1, ctx + 40)
                model(prompt, cache=cache)
                out = hf(prompt, use_cache=True, logits_to_keep=1)
                past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                steps = {"ours": lambda: model(nxt, cache=cache), "hf": lambda: hf(nxt, cache=past, use_cache=True)}
                times = {"ours": [], "hf": []}
                for _ in range(16):  # alternating steps
                    for name, step in steps.items():
                        t = time.perf_counter()
                        step()
                        times[name].append(time.perf_counter() - t)
            ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            print(f"{ctx:>8} {ms['ours']:>14.2f} {ms['hf']:>22.2f} {ms['hf'] / ms['ours']:>17.2f}x")


if __name__ == "__main__":
    main()
