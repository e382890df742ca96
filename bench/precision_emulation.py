"""Cost of the low-precision emulation: forward+backward of a model per recipe, as a ratio to fp32
measured in the same run (the peer). Emulation is a numerics tool, not a speed-up: on CPU every quantized
GEMM adds its quantize–dequantize passes to an fp32 matmul.

    PYTHONPATH=. python bench/precision_emulation.py [--preset tiny] [--batch 2] [--seq 64] [--iters 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from tandem.model import HybridConfig, HybridLM
from tandem.model.precision import PrecisionSpec, apply_precision

RECIPES = ["fp32", "fp8_delayed", "fp8_current", "fp8_block", "mxfp8", "nvfp4"]


def time_recipe(name: str, preset: str, ids: torch.Tensor, iters: int) -> float:
    model = HybridLM(HybridConfig.preset(preset), init_seed=0)
    apply_precision(model, PrecisionSpec(name, backend="emulate"))

    def step():
        model.zero_grad(set_to_none=True)
        model(ids).float().logsumexp(-1).mean().backward()

    step()  # warm-up (and a delayed-scaling history)
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    vocab = HybridConfig.preset(args.preset).vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    base = None
    print(f"{args.preset} model, batch {args.batch} x {args.seq} tokens, best of {args.iters}, "
          f"{torch.get_num_threads()} threads, every block quantized")
    for name in RECIPES:
        t = time_recipe(name, args.preset, ids, args.iters)
        base = base or t
        print(f"  {name:12s} {t * 1e3:8.1f} ms/step  {t / base:5.2f}x fp32")


if __name__ == "__main__":
    main()
