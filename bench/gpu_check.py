"""The GPU check: one H100/H200, no network, under 8 minutes; writes one JSON and prints a short table.

    python bench/gpu_check.py                        # on the GPU machine, from the repository root
    python bench/gpu_check.py --out gpu_check.json --budget 480
    python bench/gpu_check.py --dry-run              # CPU, tiny sizes: proves the script runs (a test does this)

Sections, each with its own time budget (seconds, ``--budget`` scales them; a section that would start
after the overall deadline is skipped and says so in the JSON):

1. ``tests`` — ``pytest -m gpu`` over ``tests/`` (the CUDA-marked tests: Triton kernels compiled, packed
   attention, TE backend, FSDP on CUDA), in a subprocess with a timeout; pass/fail/skip counts.
2. ``kernels`` — Triton SSD scan and conv1d, forward and forward+backward, bf16, at L = 8192, H = 64,
   P = 64, N = 128 (8 groups, chunk 128; conv channels H·P + 2·G·N), against the torch path
   (``impl="torch"``) and ``mamba_ssm``'s kernels when importable. Each time is the median over CUDA-event
   timed calls; the achieved bandwidth is the bytes the op must move at least (inputs read once, outputs
   written once), divided by the time, and reported as a fraction of the card's nominal HBM bandwidth
   (by name) and of a device-to-device copy measured here.
3. ``train`` — a ~1B-parameter hybrid MoE (Mamba-2 / attention / MoE, 64 experts top-6), bf16 weights,
   fused AdamW, forward + backward + step on batch × seq tokens; tokens/s and MFU from
   :func:`tandem.trainer.metrics.model_flops_per_token` against the card's dense bf16 peak.
4. ``decode`` — the same model, batch 8, a 512-token prefill then 128 single-token steps through the
   cache (``model(ids, cache=...)``), greedy on the device; decode tokens/s.

Every number is measured on the machine it runs on; nothing is compared with a stored figure. With
``--dry-run`` everything runs on CPU at toy sizes (Triton under ``TRITON_INTERPRET=1``, the pytest section
limited to ``tests/kernels``), so the figures are meaningless there; only that every section completes is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: nominal HBM bandwidth (bytes/s) and dense bf16 tensor-core peak (FLOP/s) by card name
CARDS = {"H200": (4.8e12, 989e12), "H100 SXM": (3.35e12, 989e12), "H100 PCIe": (2.0e12, 756e12),
         "H100 NVL": (3.9e12, 835e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}

BUDGETS = {"tests": 200.0, "kernels": 90.0, "train": 110.0, "decode": 60.0}  # seconds; sums to 460 < 480


def card_specs(name: str):
    for key, spec in CARDS.items():
        if key in name:
            return spec
    return None, None


# ---------------------------------------------------------------------------------------------------
def parse_pytest_summary(line: str) -> dict:
    """``"2 failed, 5 passed, 1 skipped in 3.2s"`` → counts of passed / failed / skipped / error / deselected."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    for part in line.replace("=", "").split(","):
        bits = part.strip().split()
        if len(bits) >= 2 and bits[0].isdigit():
            kind = "error" if bits[1].startswith("error") else bits[1]
            counts[kind] = counts.get(kind, 0) + int(bits[0])
    return counts


def section_tests(args, budget: float) -> dict:
    target = "tests/kernels" if args.dry_run else "tests"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", target]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=budget,
                              env={**os.environ, "PYTHONPATH": REPO})
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-2000:]
        return {"status": "timeout", "seconds": budget, "tail": tail.decode() if isinstance(tail, bytes) else tail}
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = parse_pytest_summary(last)
    return {"status": "ok" if proc.returncode in (0, 5) else "failed", "returncode": proc.returncode,
            "command": " ".join(cmd[1:]), "summary": last, "counts": counts, "seconds": time.perf_counter() - t0,
            "tail": proc.stdout[-3000:] if proc.returncode not in (0, 5) else ""}


# ---------------------------------------------------------------------------------------------------
def timer(torch, device):
    """``time(fn, iters)`` → median seconds per call (CUDA events on a GPU, perf_counter on CPU)."""
    def run(fn, iters: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def copy_bandwidth(torch, device, time_it) -> float | None:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write), the achievable ceiling here."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    t = time_it(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * src.element_size() / t


def section_kernels(args, budget: float, device, info: dict) -> dict:
    import torch

    from tandem.kernels.conv1d import causal_conv1d
    from tandem.kernels.ssd import chunk_scan

    time_it = timer(torch, device)
    deadline = time.perf_counter() + budget
    b, l, h, p, g, n, q = (1, 8192, 64, 64, 8, 128, 128) if not args.dry_run else (1, 32, 2, 16, 1, 16, 16)
    iters, warmup = (10, 2) if not args.dry_run else (1, 0)
    dt_ = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=device, dtype=dt_)  # noqa: E731
    x, dt, B, C = mk(b, l, h, p), mk(b, l, h), mk(b, l, g, n), mk(b, l, g, n)
    A = -torch.rand(h, device=device) * 4 - 0.5
    D, dt_bias = torch.randn(h, device=device), torch.randn(h, device=device)
    conv_dim = h * p + 2 * g * n
    xc, w, wb = mk(b, l, conv_dim), torch.randn(conv_dim, 4, device=device), torch.randn(conv_dim, device=device)
    esz = x.element_size()
    ssd_fwd_bytes = (2 * x.numel() + dt.numel() + B.numel() + C.numel()) * esz  # x, dt, B, C read; y written
    conv_fwd_bytes = 2 * xc.numel() * esz
    peak_bw = info.get("hbm_bytes_per_s")
    copy_bw = copy_bandwidth(torch, device, time_it)
    result = {"shape": dict(b=b, l=l, h=h, p=p, g=g, n=n, chunk=q, conv_channels=conv_dim, dtype=str(dt_)),
              "copy_bytes_per_s": copy_bw, "rows": []}

    def ssd(impl):
        def fwd(grad=False):
            leaves = [t.requires_grad_(grad) for t in (x, dt, B, C)]
            y = chunk_scan(*leaves[:2], A, *leaves[2:], q, D=D, dt_bias=dt_bias, dt_softplus=True, impl=impl)
            if grad:
                y.backward(torch.ones_like(y))
            return y
        return fwd

    def conv(impl):
        def fwd(grad=False):
            xi = xc.requires_grad_(grad)
            y = causal_conv1d(xi, w, wb, activation="silu", impl=impl)
            if grad:
                y.backward(torch.ones_like(y))
            return y
        return fwd

    cases = [("ssd", "triton", ssd("triton"), ssd_fwd_bytes), ("ssd", "torch", ssd("torch"), ssd_fwd_bytes),
             ("conv1d", "triton", conv("triton"), conv_fwd_bytes), ("conv1d", "torch", conv("torch"), conv_fwd_bytes)]
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        def mamba(grad=False):
            leaves = [t.requires_grad_(grad) for t in (x, dt, B, C)]
            y = mamba_chunk_scan_combined(leaves[0], leaves[1], A, leaves[2], leaves[3], q, D=D, dt_bias=dt_bias,
                                          dt_softplus=True)
            if grad:
                y.backward(torch.ones_like(y))
            return y
        cases.append(("ssd", "mamba_ssm", mamba, ssd_fwd_bytes))
    except ImportError as e:
        result["mamba_ssm"] = f"not importable ({e})"
    for op, impl, fn, fwd_bytes in cases:
        if time.perf_counter() > deadline:
            result["rows"].append({"op": op, "impl": impl, "skipped": "kernel budget spent"})
            continue
        try:
            t_f = time_it(lambda: fn(False), iters, warmup)
            t_fb = time_it(lambda: fn(True), iters, warmup)
        except Exception as e:  # one failing implementation must not hide the others
            result["rows"].append({"op": op, "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        fb_bytes = 3 * fwd_bytes  # backward reads the inputs and dy, writes the input gradients
        row = {"op": op, "impl": impl, "fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
               "fwd_bytes_per_s": fwd_bytes / t_f, "fwd_bwd_bytes_per_s": (fwd_bytes + fb_bytes) / t_fb}
        for key in ("fwd", "fwd_bwd"):
            bw = row[f"{key}_bytes_per_s"]
            row[f"{key}_frac_hbm"] = bw / peak_bw if peak_bw else None
            row[f"{key}_frac_copy"] = bw / copy_bw if copy_bw else None
        result["rows"].append(row)
    return result


# ---------------------------------------------------------------------------------------------------
def model_config(dry_run: bool):
    """~1B parameters (about 0.35B active): 20 layers, hidden 1536, vocab 32768, 64 experts top-6."""
    from tandem.model import HybridConfig

    if dry_run:
        return HybridConfig.preset("tiny", hybrid_override_pattern="ME*E")
    return HybridConfig.preset(
        "tiny", hybrid_override_pattern="MEMEM*EMEMEMEM*EMEME", vocab_size=32768, hidden_size=1536,
        num_attention_heads=12, num_key_value_heads=2, head_dim=128, intermediate_size=4096,
        mamba_num_heads=48, mamba_head_dim=64, ssm_state_size=128, n_groups=8, chunk_size=128,
        n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=512, moe_shared_expert_intermediate_size=1024,
        max_position_embeddings=1 << 16,
    )


def section_train(args, budget: float, device, info: dict) -> dict:
    import torch

    from tandem.model import HybridLM
    from tandem.trainer.metrics import model_flops_per_token

    time_it = timer(torch, device)
    cfg = model_config(args.dry_run)
    batch, seq = (4, 4096) if not args.dry_run else (2, 32)
    torch.manual_seed(0)
    model = HybridLM(cfg, init_seed=0, device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32).train()
    count = model.parameter_count()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    first = step().item()
    iters = 1
    while not args.dry_run and time.perf_counter() - t0 < budget * 0.15 and iters < 3:  # warm-up: autotune
        step()
        iters += 1
    n = 5 if not args.dry_run else 1
    t = time_it(step, n, warmup=0)
    tokens = batch * seq
    flops = model_flops_per_token(cfg, seq) * tokens
    peak = info.get("bf16_flop_per_s")
    out = {"params_total": count.total, "params_active": count.active, "batch": batch, "seq": seq,
           "step_ms": t * 1e3, "tokens_per_s": tokens / t, "model_tflop_per_step": flops / 1e12,
           "mfu": flops / t / peak if peak and device.type == "cuda" else None, "first_loss": first}
    if device.type == "cuda":
        out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    model.to("cpu") if device.type == "cuda" else None
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def section_decode(args, budget: float, device, info: dict) -> dict:
    import torch

    from tandem.model import HybridLM

    cfg = model_config(args.dry_run)
    batch, prompt, new = (8, 512, 128) if not args.dry_run else (2, 8, 4)
    model = HybridLM(cfg, init_seed=0, device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def generate(steps: int):
        cache = model.allocate_cache(batch, prompt + steps + 1)
        tok = model(ids, cache=cache)[:, -1:].argmax(-1)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)  # greedy, on the device: no host sync per token
        sync()
        return time.perf_counter() - t0

    generate(min(8, new) if not args.dry_run else 1)  # warm-up
    t = generate(new)
    return {"batch": batch, "prompt": prompt, "new_tokens": new, "decode_ms_per_step": t / new * 1e3,
            "decode_tokens_per_s": batch * new / t}


# ---------------------------------------------------------------------------------------------------
def table(report: dict) -> str:
    lines = [f"GPU check: {report['device']} ({report['torch']}), {report['seconds']:.0f} s", ""]
    t = report["sections"].get("tests", {})
    if t:
        lines.append(f"tests (pytest -m gpu): {t.get('status')} — {t.get('summary', '')}")
    k = report["sections"].get("kernels", {})
    if k.get("rows"):
        lines += ["", "| op | impl | fwd ms | fwd+bwd ms | fwd+bwd GB/s | of HBM | of copy |", "|---|---|---|---|---|---|---|"]
        for r in k["rows"]:
            if "fwd_ms" not in r:
                lines.append(f"| {r['op']} | {r['impl']} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            pct = lambda v: f"{100 * v:.0f}%" if v else "—"  # noqa: E731
            lines.append(f"| {r['op']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                         f"{r['fwd_bwd_bytes_per_s'] / 1e9:.0f} | {pct(r['fwd_bwd_frac_hbm'])} | {pct(r['fwd_bwd_frac_copy'])} |")
    tr = report["sections"].get("train", {})
    if "tokens_per_s" in tr:
        mfu = f"{100 * tr['mfu']:.1f}%" if tr.get("mfu") else "—"
        lines += ["", f"train step: {tr['params_total'] / 1e9:.2f}B params ({tr['params_active'] / 1e9:.2f}B active), "
                      f"{tr['batch']}×{tr['seq']} tokens, {tr['step_ms']:.0f} ms, {tr['tokens_per_s']:.0f} tok/s, MFU {mfu}"]
    de = report["sections"].get("decode", {})
    if "decode_tokens_per_s" in de:
        lines.append(f"decode: batch {de['batch']}, {de['decode_ms_per_step']:.1f} ms/step, {de['decode_tokens_per_s']:.0f} tok/s")
    for name, sec in report["sections"].items():
        if "error" in sec or isinstance(sec.get("skipped"), str):
            lines.append(f"{name}: {sec.get('error') or sec.get('skipped')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (the test of this script)")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--budget", type=float, default=480.0, help="total seconds; section budgets scale with it")
    p.add_argument("--sections", default="tests,kernels,train,decode")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.path.insert(0, REPO)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    hbm, bf16 = card_specs(name)
    info = {"hbm_bytes_per_s": hbm, "bf16_flop_per_s": bf16}
    scale = args.budget / sum(BUDGETS.values()) * (460 / 480)
    start = time.perf_counter()
    deadline = start + args.budget
    report = {"device": name, "torch": torch.__version__, "dry_run": args.dry_run, "nominal": info,
              "budget_s": args.budget, "sections": {}}
    fns = {"tests": lambda b: section_tests(args, b), "kernels": lambda b: section_kernels(args, b, device, info),
           "train": lambda b: section_train(args, b, device, info), "decode": lambda b: section_decode(args, b, device, info)}
    for sec in args.sections.split(","):
        budget = BUDGETS[sec] * scale
        left = deadline - time.perf_counter()
        if left < budget * 0.3:
            report["sections"][sec] = {"skipped": f"only {left:.0f} s of the overall budget left"}
            continue
        t0 = time.perf_counter()
        try:
            report["sections"][sec] = fns[sec](min(budget, left))
        except Exception as e:
            report["sections"][sec] = {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-3000:]}
        report["sections"][sec]["section_seconds"] = time.perf_counter() - t0
        with open(args.out, "w") as f:  # after every section: a later hang still leaves the earlier results
            json.dump({**report, "seconds": time.perf_counter() - start}, f, indent=1, default=str)
    report["seconds"] = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(table(report))
    failed = [s for s, r in report["sections"].items() if "error" in r or r.get("status") in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
