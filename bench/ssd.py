"""Benchmark of the Mamba-2 SSD chunked scan, forward and forward+backward.

On a GPU: our Triton kernels vs our torch reference, and vs mamba_ssm's Triton ``mamba_chunk_scan_combined``
when it can be imported (install mamba_ssm, or put its source tree on PYTHONPATH), as time ratios, plus the
achieved memory bandwidth of the Triton forward against the device's peak.
On CPU: our fast torch path (``ssd_chunk_scan_fast``, what the model runs) and our readable torch reference
vs transformers' NemotronH torch path (``transformers.models.nemotron_h.modeling_nemotron_h.mamba2_chunk_scan``),
the same algorithm written independently, as time ratios to the fast path (the Triton kernels cannot run
compiled on a CPU).

    python bench/ssd.py                                   # default shapes for the device found
    python bench/ssd.py --shape 1,8192,64,64,8,128,128    # b,l,h,p,g,n,chunk (repeatable)
    python bench/ssd.py --dtype bf16 --peak-gbps 4800

Every ratio is ``theirs / ours`` measured in the same process: > 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tandem.kernels.ssd import ssd_chunk_scan_ref  # noqa: E402

# HBM peak (GB/s) by device-name fragment; --peak-gbps overrides.
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "A10G": 600.0, "4090": 1008.0}

GPU_SHAPES = [(1, 8192, 64, 64, 8, 128, 128), (4, 2048, 32, 64, 4, 128, 128)]
CPU_SHAPES = [(1, 256, 8, 32, 2, 32, 64), (2, 512, 8, 64, 2, 64, 64)]


def _time_interleaved(fns, device, warmup, iters):
    """Median seconds per call of each function; calls are interleaved round-robin so that a change of load
    on a shared machine hits every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[k].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _inputs(shape, dtype, device, requires_grad):
    b, l, h, p, g, n, _ = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=gen) * scale + shift)  # noqa: E731
    t = dict(x=mk(b, l, h, p).to(device, dtype), dt=mk(b, l, h, shift=-2.0).to(device, dtype),
             A=(-torch.rand(h, generator=gen) * 4 - 0.5).to(device), B=mk(b, l, g, n).to(device, dtype),
             C=mk(b, l, g, n).to(device, dtype), D=mk(h).to(device), dt_bias=mk(h, scale=0.5).to(device))
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def _fwd_bwd(call, t):
    def run():
        y = call(t)
        y = y[0] if isinstance(y, tuple) else y
        y.float().sum().backward()
    return run


def _fwd(call, t):
    def run():
        with torch.no_grad():
            call(t)
    return run


def _ours_torch(chunk):
    return lambda t: ssd_chunk_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                                        dt_bias=t["dt_bias"], dt_softplus=True)


def _ours_fast(chunk):
    from tandem.kernels.ssd import ssd_chunk_scan_fast
    return lambda t: ssd_chunk_scan_fast(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                                         dt_bias=t["dt_bias"], dt_softplus=True)


def _ours_triton(chunk):
    from tandem.kernels.ssd import ssd_chunk_scan_triton
    return lambda t: ssd_chunk_scan_triton(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                                           dt_bias=t["dt_bias"], dt_softplus=True)


def _hf(chunk):
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan
    return lambda t: mamba2_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                                       dt_bias=t["dt_bias"], dt_softplus=True)


def _mamba_ssm(chunk):
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001 — any import failure means "not available here"; say why
        print(f"  (mamba_ssm not importable: {type(e).__name__}: {e})")
        return None
    return lambda t: mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"],
                                               dt_bias=t["dt_bias"], dt_softplus=True)


def _fwd_bytes(shape, dtype):
    """Minimum HBM traffic of the forward: read x, dt, B, C once, write y once (states are on-chip ideally)."""
    b, l, h, p, g, n, _ = shape
    e = torch.finfo(dtype).bits // 8
    return e * (2 * b * l * h * p + b * l * h + 2 * b * l * g * n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", default=None, help="b,l,h,p,g,n,chunk (repeatable)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                    help="input dtype (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--peak-gbps", type=float, default=None, help="device HBM peak in GB/s")
    ap.add_argument("--cpu", action="store_true", help="run the CPU comparison even if a GPU is present")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else (
        GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 5)
    iters = args.iters if args.iters is not None else (50 if device.type == "cuda" else 15)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
        print(f"device: {name}; peak HBM {peak} GB/s; torch {torch.__version__}; dtype {dtype}")
    else:
        print(f"device: CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
              f"torch {torch.__version__}; dtype {dtype}")
    print(f"timing: median of {iters} after {warmup} warm-up; ratio = theirs / ours (> 1: ours faster)")

    for shape in shapes:
        if len(shape) != 7:
            raise SystemExit(f"--shape needs 7 integers b,l,h,p,g,n,chunk, got {shape}")
        chunk = shape[-1]
        print(f"\nshape b,l,h,p,g,n,chunk = {shape}")
        if device.type == "cuda":
            impls = {"triton": _ours_triton(chunk), "torch ref": _ours_torch(chunk)}
            ms = _mamba_ssm(chunk)
            if ms is not None:
                impls["mamba_ssm"] = ms
            ours = "triton"
        else:
            impls = {"torch fast": _ours_fast(chunk), "torch ref": _ours_torch(chunk), "transformers": _hf(chunk)}
            ours = "torch fast"
        try:
            tf = _time_interleaved({k: _fwd(c, _inputs(shape, dtype, device, False)) for k, c in impls.items()},
                                   device, warmup, iters)
            tb = _time_interleaved({k: _fwd_bwd(c, _inputs(shape, dtype, device, True)) for k, c in impls.items()},
                                   device, warmup, iters)
        except torch.OutOfMemoryError:
            print("  out of memory at this shape")
            torch.cuda.empty_cache()
            continue
        res = {k: (tf[k], tb[k]) for k in impls}
        for name, (tf, tb) in res.items():
            line = f"  {name:13s} fwd {tf * 1e3:9.3f} ms   fwd+bwd {tb * 1e3:9.3f} ms"
            if name != ours and ours in res:
                line += f"   ratio fwd {tf / res[ours][0]:6.2f}x  fwd+bwd {tb / res[ours][1]:6.2f}x"
            if device.type == "cuda" and name == "triton":
                gbps = _fwd_bytes(shape, dtype) / tf / 1e9
                line += f"   fwd {gbps:7.1f} GB/s" + (f" = {100 * gbps / peak:.0f}% of peak" if peak else "")
            print(line)
        if device.type == "cpu":  # the two torch paths compute the same thing: show it
            t = _inputs(shape, dtype, device, False)
            with torch.no_grad():
                d = (impls["torch ref"](t).float() - impls["transformers"](t).float()).abs().max().item()
                d2 = (impls["torch fast"](t).float() - impls["torch ref"](t).float()).abs().max().item()
            print(f"  max |ours ref - transformers| = {d:.2e}, max |fast - ref| = {d2:.2e}")


if __name__ == "__main__":
    main()
