"""One training step (forward + backward of the mean next-token loss): tandem vs transformers' NemotronH.

    python bench/train_step.py                       # fp32 + bf16 autocast, eager, 5 interleaved repeats
    python bench/train_step.py --compile             # + compiled: tandem's model.compile (each block body),
                                                     #   transformers' whole model through torch.compile
    python bench/train_step.py --profile tandem      # the top ops of one tandem step (torch.profiler)

The model is the issue's configuration: hybrid MoE ``MEM*EM`` (3 Mamba-2, 2 MoE, 1 attention), hidden 256,
Mamba 8 heads × 64 with state 32 in one group, chunk 128, 8 routed experts top-2 (+ a shared expert),
vocabulary 8192; batch 2 × 2048 tokens, fp32 weights. Both sides run the same random weights (ours written
with ``save_pretrained`` and loaded by ``NemotronHForCausalLM.from_pretrained``) on the same tokens, and
the script checks that their losses agree before timing. Each measured call is ``zero_grad``, forward,
``loss.backward()``; the kinds of call (side × precision × eager/compiled) run round-robin, ``--repeats``
times after ``--warmup`` rounds, so a load spike on a shared machine hits every kind alike. The figure is
the median; the ratio is ``transformers / tandem`` (> 1: tandem is faster). The load average is printed
before and after, because on a shared machine it moves absolute times by 2–3×.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def model_config(args):
    from tandem.model import HybridConfig

    h = args.hidden
    return HybridConfig.preset(
        "tiny", hybrid_override_pattern=args.pattern, vocab_size=args.vocab, hidden_size=h,
        num_attention_heads=max(h // 64, 2), num_key_value_heads=1, head_dim=64, intermediate_size=2 * h,
        mamba_num_heads=2 * h // 64, mamba_head_dim=64, ssm_state_size=32, n_groups=1, chunk_size=128,
        n_routed_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=h,
        moe_shared_expert_intermediate_size=2 * h, time_step_min=1e-5, time_step_limit=(1e-5, math.inf),
        max_position_embeddings=1 << 16,
    )


def build(args):
    """(tandem model, transformers model) with the same weights, both in train mode."""
    import transformers
    from transformers import NemotronHForCausalLM

    from tandem.model import HybridLM

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    ours = HybridLM(model_config(args), init_seed=0)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = NemotronHForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    return ours.train(), theirs.train()


def loss_fns(ours, theirs, ids, own_loss: bool = False):
    """Mean next-token cross-entropy. Default: both sides return full logits and the same ``F.cross_entropy``
    (identical loss work); ``own_loss``: each side's training loss path — tandem's chunked linear + CE
    (``labels=``, never the [B, T, V] logits), transformers' ``labels=`` loss."""
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def tandem():
        if own_loss:
            return ours(inputs, labels=labels).mean()
        logits = ours(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def hf():
        if own_loss:
            return theirs(input_ids=ids, labels=ids, use_cache=False).loss  # shifts the labels itself
        logits = theirs(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    return tandem, hf


def step_fn(model, loss, dtype):
    def step():
        model.zero_grad(set_to_none=True)
        if dtype is torch.bfloat16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = loss()
        else:
            out = loss()
        out.backward()
        return out.detach()

    return step


def profile(step, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    step()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pattern", default="MEM*EM")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd forwards")
    p.add_argument("--only-compiled", action="store_true")
    p.add_argument("--sides", default="tandem,transformers")
    p.add_argument("--own-loss", action="store_true", help="each side's own training loss path (see loss_fns)")
    p.add_argument("--profile", choices=["tandem", "transformers"], default=None)
    p.add_argument("--profile-rows", type=int, default=30)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the trainer does on CPU (see docs/PERFORMANCE.md)

    ours, theirs = build(args)
    torch.manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq + 1))
    tandem_loss, hf_loss = loss_fns(ours, theirs, ids, args.own_loss)
    with torch.no_grad():
        a, b = tandem_loss().item(), hf_loss().item()
    print(f"loss tandem {a:.6f} transformers {b:.6f} (|Δ| {abs(a - b):.2e})")
    if abs(a - b) > 1e-3 * max(1.0, abs(b)):
        raise SystemExit("the two models disagree: not the same weights or not the same maths")
    if args.profile:
        model, loss = (ours, tandem_loss) if args.profile == "tandem" else (theirs, hf_loss)
        profile(step_fn(model, loss, torch.float32), args.profile_rows)
        return

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    kinds = {}
    modes = ["compiled"] if args.only_compiled else (["eager", "compiled"] if args.compile else ["eager"])
    for mode in modes:
        for side in args.sides.split(","):
            model = ours if side == "tandem" else theirs
            if mode == "compiled":
                if side == "tandem":  # what model.compile=true does: each block's body compiled (same weights)
                    import copy

                    from omegaconf import OmegaConf

                    from tandem.trainer.config import configure_compile

                    model = copy.deepcopy(ours)
                    configure_compile(model, OmegaConf.create({"compile": True}))
                    loss = loss_fns(model, None, ids, args.own_loss)[0]
                else:
                    loss = loss_fns(None, torch.compile(model), ids, args.own_loss)[1]
            else:
                loss = tandem_loss if side == "tandem" else hf_loss
            for name in args.dtypes.split(","):
                kinds[(side, name, mode)] = step_fn(model, loss, dtypes[name])

    # The GEMM floor: the model's training FLOPs (model_flops_per_token: every matmul, fwd + bwd) at the fp32
    # matmul rate measured here, in the same rounds, on the largest GEMM of the step (the lm_head). Both
    # sides run these same GEMMs, so no implementation of the rest can make a step faster than this.
    from tandem.trainer.metrics import model_flops_per_token

    step_flops = model_flops_per_token(ours.config, args.seq) * args.batch * args.seq
    a_mat, b_mat = torch.randn(args.batch * args.seq, args.hidden), torch.randn(args.hidden, args.vocab)
    gemm_flops = 2 * a_mat.shape[0] * args.hidden * args.vocab
    kinds[("gemm", "fp32", "floor")] = lambda: a_mat @ b_mat

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x seq {args.seq}, "
          f"pattern {args.pattern}, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, vocab {args.vocab}; "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters; load average before {os.getloadavg()}",
          flush=True)
    times = {k: [] for k in kinds}
    failed = {}
    for r in range(args.warmup + args.repeats):
        for k, fn in kinds.items():
            if k in failed:
                continue
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:  # a compile failure is a result to report, not a crash of the bench
                failed[k] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                continue
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t0)
            print(f"  round {r} {'/'.join(k)}: {(time.perf_counter() - t0) * 1e3:.0f} ms"
                  f"{' (warm-up)' if r < args.warmup else ''}", flush=True)
    print(f"load average after {os.getloadavg()}")
    rate = gemm_flops / statistics.median(times[("gemm", "fp32", "floor")])
    print(f"fp32 matmul rate {rate / 1e9:.0f} GFLOP/s ({args.batch * args.seq}x{args.hidden} @ {args.hidden}x{args.vocab}); "
          f"model {step_flops / 1e9:.0f} GFLOP per step -> GEMM floor {step_flops / rate * 1e3:.0f} ms")
    print("| precision | mode | tandem ms | transformers ms | transformers / tandem |")
    print("|---|---|---|---|---|")
    for mode in modes:
        for name in args.dtypes.split(","):
            med = {}
            for side in ("tandem", "transformers"):
                k = (side, name, mode)
                if k in failed:
                    med[side] = None
                    print(f"  {k} failed: {failed[k]}")
                elif k in times and times[k]:
                    med[side] = statistics.median(times[k]) * 1e3
            t, h = med.get("tandem"), med.get("transformers")
            ratio = f"{h / t:.2f}×" if t and h else "—"
            print(f"| {name} | {mode} | {t and f'{t:.0f}'} | {h and f'{h:.0f}'} | {ratio} |")


if __name__ == "__main__":
    main()
