"""Decode throughput: tandem's GenerationEngine vs transformers' NemotronHForCausalLM.generate.

    python bench/generate.py                          # small-but-not-tiny random model, CPU, batch 1 and 8
    python bench/generate.py --batch 1 8 --new 64 --context 1024 8192

Both run the same random weights (ours saved with ``save_pretrained``, loaded by transformers), greedy,
the same prompts, exactly ``--new`` new tokens (no stop token). Decode tokens/s excludes the prefill:
``(new - 1) · batch / (t(new) - t(1))`` where ``t(n)`` is the wall time of a call generating ``n``
tokens (median over ``--iters``, the four kinds of call interleaved round-robin). Prints both rates and the ratio ours / transformers (> 1: ours is
faster), after checking the greedy tokens agree. Then per-token decode time after a 1k and an 8k prompt
(batch 1, both implementations, the model's forward step timed directly: median of 16 steps): Mamba
layers cost the same at any length, attention grows with it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.inference.engine import GenerationEngine, SamplingParams


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
          f"transformers={transformers.__version__}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ours/transformers':>18}")
    g = torch.Generator().manual_seed(0)
    for b in args.batch:
        prompts = torch.randint(3, args.vocab, (b, args.prompt), generator=g)
        engine = GenerationEngine(model, max_batch=b)

        def ours(n):
            return engine.generate(prompts.tolist(), SamplingParams(max_new_tokens=n, greedy=True))

        def theirs(n):
            with torch.inference_mode():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                   max_new_tokens=n, pad_token_id=0)

        mine, ref = ours(args.new), theirs(args.new)
        agree = sum(r.tokens == ref[i, args.prompt:].tolist() for i, r in enumerate(mine))
        if agree != b:
            print(f"  warning: greedy tokens agree for {agree}/{b} rows only")
        # round-robin, so a load spike on a shared machine hits both sides alike
        calls = {(name, n): fn for name, fn in (("ours", ours), ("hf", theirs)) for n in (args.new, 1)}
        times = {key: [] for key in calls}
        for key, fn in calls.items():
            fn(key[1])  # warm-up
        for _ in range(args.iters):
            for key, fn in calls.items():
                t = time.perf_counter()
                fn(key[1])
                times[key].append(time.perf_counter() - t)
        med = {key: statistics.median(v) for key, v in times.items()}
        rate = {name: (args.new - 1) * b / (med[(name, args.new)] - med[(name, 1)]) for name in ("ours", "hf")}
        print(f"{b:>5} {rate['ours']:>11.0f} {rate['hf']:>19.0f} {rate['ours'] / rate['hf']:>17.2f}x")

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
