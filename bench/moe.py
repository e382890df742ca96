"""MoE layer forward+backward throughput: grouped GEMM vs the per-expert loop (the reference).

    python bench/moe.py                       # a small CPU shape set
    python bench/moe.py --hidden 2688 --experts 128 --topk 6 --width 1856 --tokens 8192 --device cuda --dtype bfloat16

Both paths run the same ``tandem.model.moe.MoE`` (same weights, routing, dispatcher); only
``GroupedExperts.grouped`` differs. Prints tokens/s for each and the ratio grouped / loop (> 1: grouped
is faster), after checking the two agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from tandem.model import HybridConfig
from tandem.model.moe import MoE


def bench(moe: MoE, x: torch.Tensor, iters: int) -> float:
    for _ in range(2):  # warm-up
        moe(x).float().square().mean().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        moe(x).float().square().mean().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return x.shape[0] * x.shape[1] * iters / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"device={args.device} dtype={args.dtype} experts={args.experts} top-k={args.topk} width={args.width} "
          f"tokens={args.tokens} threads={torch.get_num_threads()}")
    print(f"{'hidden':>8} {'loop tok/s':>12} {'grouped tok/s':>14} {'grouped/loop':>13}")
    for h in args.hidden:
        cfg = HybridConfig.preset("tiny", hidden_size=h, n_routed_experts=args.experts, num_experts_per_tok=args.topk,
                                  moe_intermediate_size=args.width, moe_shared_expert_intermediate_size=2 * args.width)
        torch.manual_seed(0)
        moe = MoE(cfg).to(args.device)
        for prm in moe.parameters():
            torch.nn.init.normal_(prm, std=h ** -0.5)
        moe = moe.to(dtype)
        x = torch.randn(1, args.tokens, h, device=args.device, dtype=dtype)
        with torch.no_grad():
            moe.experts.grouped = True
            a = moe(x)
            moe.experts.grouped = False
            b = moe(x)
        assert torch.allclose(a.float(), b.float(), atol=1e-2 if dtype != torch.float32 else 1e-4), "paths disagree"
        moe.experts.grouped = False
        loop = bench(moe, x, args.iters)
        moe.experts.grouped = True
        grouped = bench(moe, x, args.iters)
        print(f"{h:>8} {loop:>12.0f} {grouped:>14.0f} {grouped / loop:>12.2f}x")


if __name__ == "__main__":
    main()
