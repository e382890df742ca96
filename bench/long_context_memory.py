"""Peak memory of one training fwd+bwd at long context: tandem vs transformers' NemotronHForCausalLM.

    python bench/long_context_memory.py                      # 16k tokens: tandem vs transformers, 2 repeats (~3 min)
    python bench/long_context_memory.py --all --repeats 3    # every side below (the docs/PERFORMANCE.md figures)
    python bench/long_context_memory.py --kinds --repeats 1  # tandem with one layer kind checkpointed at a time
    python bench/long_context_memory.py --fit-gb 8           # + the largest length each side fits in 8 GB (long)

A hybrid MoE model (all four layer kinds, vocabulary 8192), batch 1, fp32, CPU; both sides load the same
weights (ours written with ``save_pretrained``). Each measurement is one fresh subprocess: build/load the
model, reset the peak-RSS counter (``/proc/self/clear_refs``), run one forward+backward of the mean
next-token loss, read ``VmHWM`` from ``/proc/self/status``. The sides run interleaved, ``--repeats`` times;
the figure is the median. The reported peak is the whole process (weights, gradients, activations,
allocator slack); "over weights" subtracts the RSS just before the step. The measurement and the model
are ``bench/_memory.py``'s, shared with ``cp_memory.py``.

Sides (default: the first and the last; ``--all``: every one):
- ``tandem``: 6 packed documents of uneven lengths (maskless varlen attention, Mamba state resets),
  activation checkpointing of every block, chunked linear + CE (``labels=``);
- ``tandem unpacked``: the same on one sequence;
- ``tandem plain``: one sequence, no checkpointing, full fp32 logits then ``F.cross_entropy`` (the
  training path before this work);
- ``tandem plain dense``: ``tandem plain`` on the packed documents through the dense [T, T] mask reference
  (what packed attention did before this work);
- ``transformers GC``: transformers with ``gradient_checkpointing_enable()`` (non-reentrant);
- ``transformers``: ``NemotronHForCausalLM(input_ids, labels=input_ids)`` (its torch Mamba path, SDPA), one
  sequence: it has no packed-document input. The ratio column divides by this side.
When they run, the unpacked sides must agree on the loss (checked: same weights, same tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from _memory import PATTERN, gb, measure_step
from _memory import model_config as _model_config


def model_config(args):
    return _model_config(args.pattern, args.hidden, args.vocab)


# ---------------------------------------------------------------------------------------------------
# child: one measurement in a fresh process
def child(side: str, length: int, weights: str, ac: str) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    ids = torch.randint(3, json.load(open(os.path.join(weights, "config.json")))["vocab_size"], (1, length + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    if side.startswith("transformers"):
        import transformers
        from transformers import NemotronHForCausalLM

        transformers.logging.set_verbosity_error()
        model = NemotronHForCausalLM.from_pretrained(weights, torch_dtype=torch.float32).train()
        if side == "transformers GC":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def step():
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        from tandem.model import HybridLM

        model = HybridLM.from_pretrained(weights).train()
        seq_idx = None
        if side in ("tandem", "tandem plain dense"):  # 6 documents of uneven lengths, one of a single token
            cuts = [0, length // 7, length // 7 + 1, length // 3, length // 2, (4 * length) // 5, length]
            seq_idx = torch.cat([torch.full((cuts[i + 1] - cuts[i],), i) for i in range(6)])[None]
        if side == "tandem plain dense":
            import tandem.model.attention as attention

            attention.packed_attention = lambda q, k, v, docs, scale, dropout_p=0.0: attention.dense_document_attention(
                q, k, v, docs.seq_idx, scale=scale, dropout_p=dropout_p)
        if side.startswith("tandem plain"):
            def step():
                logits = model(inputs, seq_idx)
                return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        else:
            model.set_activation_checkpointing(ac)

            def step():
                return model(inputs, seq_idx, labels=labels).mean()
    return {"side": side, "length": length, "ac": ac, **measure_step(step)}


def measure(side: str, length: int, weights: str, ac: str = "all") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, str(length), weights, ac]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{side} at {length} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
def fits(side: str, length: int, weights: str, limit_gb: float) -> tuple[bool, float]:
    r = measure(side, length, weights)
    return gb(r["peak_kb"]) <= limit_gb, gb(r["peak_kb"])


def largest_fitting(side: str, weights: str, limit_gb: float, start: int, step: int, most: int) -> tuple[int, bool, list]:
    """Growing by 1.25× from ``start`` until the peak passes the limit (no probe far past it: the machine
    may be shared), then bisection to ``step`` tokens. Stops at ``most`` tokens (CPU time grows with the
    length — attention quadratically): returns (largest length that fitted, whether the cap stopped it, probes)."""
    log, lo, hi = [], 0, None
    n = start
    while hi is None:
        ok, peak = fits(side, n, weights, limit_gb)
        log.append((n, peak))
        print(f"  {side:>16} {n:>8} tokens: {peak:6.2f} GB", flush=True)
        if ok and n >= most:
            return n, True, log
        if ok:
            lo, n = n, min(most, max(n + step, int(n * 1.25) // step * step))
        else:
            hi = n
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step or step
        if mid in (lo, hi):
            break
        ok, peak = fits(side, mid, weights, limit_gb)
        log.append((mid, peak))
        print(f"  {side:>16} {mid:>8} tokens: {peak:6.2f} GB", flush=True)
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo, False, log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=2, help="0: no table (with --fit-gb: only the search)")
    p.add_argument("--pattern", default=PATTERN)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--all", action="store_true", help="every side (see above), not only tandem and transformers")
    p.add_argument("--kinds", action="store_true", help="also tandem with one layer kind checkpointed at a time")
    p.add_argument("--fit-gb", type=float, default=None, help="find the largest length that fits in this many GB")
    p.add_argument("--fit-step", type=int, default=4096)
    p.add_argument("--fit-start", type=int, nargs=2, default=None, metavar=("TANDEM", "TRANSFORMERS"),
                   help="first length probed per side (default --length)")
    p.add_argument("--fit-max", type=int, default=131072, help="longest length probed (a fit there is reported as ≥)")
    p.add_argument("--child", nargs=4, metavar=("SIDE", "LENGTH", "WEIGHTS", "AC"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        side, length, weights, ac = args.child
        print(json.dumps(child(side, int(length), weights, ac)))
        return

    import torch
    import transformers

    from tandem.model import HybridLM

    model = HybridLM(model_config(args), init_seed=0)
    torch.manual_seed(0)
    with torch.no_grad():  # O(1) activations in every layer (as bench/generate.py)
        for name, t in model.named_parameters():
            if t.dim() >= 2 and "conv1d" not in name:
                t.normal_(std=t.shape[-1] ** -0.5)
    n_params = sum(t.numel() for t in model.parameters())
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"pattern={args.pattern} hidden={args.hidden} vocab={args.vocab} params={n_params / 1e6:.1f}M fp32 batch=1 "
          f"length={args.length} cores={os.cpu_count()} torch={torch.__version__} transformers={transformers.__version__} "
          f"loadavg={' '.join(load)}", flush=True)
    sides = ["tandem", "transformers"]
    if args.all:
        sides = ["tandem", "tandem unpacked", "tandem plain", "tandem plain dense", "transformers GC", "transformers"]
    runs = [(s, "all") for s in sides]
    if args.kinds:
        runs += [("tandem", k) for k in ("none", "mamba", "attention", "moe", "mlp")]
    with tempfile.TemporaryDirectory() as weights:
        model.save_pretrained(weights)
        del model
        results: dict = {r: [] for r in runs} if args.repeats > 0 else {}
        for rep in range(args.repeats):
            for side, ac in runs:
                r = measure(side, args.length, weights, ac)
                results[(side, ac)].append(r)
                print(f"  repeat {rep + 1}: {side} (checkpointed {ac}): {gb(r['peak_kb']):.2f} GB, {r['seconds']:.0f} s",
                      flush=True)
        if results:
            table(results, args)
        if args.fit_gb:
            print(f"\nlargest length within {args.fit_gb} GB (peak RSS, one run per probe, step {args.fit_step}):")
            starts = args.fit_start or (args.length, args.length)
            for side, start in zip(("tandem", "transformers"), starts):
                n, capped, _ = largest_fitting(side, weights, args.fit_gb, start, args.fit_step, args.fit_max)
                print(f"{side:>16}: {'≥ ' if capped else ''}{n} tokens", flush=True)
    with open("/proc/loadavg") as f:
        print(f"loadavg after: {' '.join(f.read().split()[:3])}")


def table(results: dict, args) -> None:
    """Print the medians; refuse sides that should agree on the loss but do not."""
    print(f"\n{'side':>18} {'checkpointed':>12} {'peak GB':>8} {'over weights GB':>15} {'vs transformers':>15} "
          f"{'s':>6} {'loss':>8}  (median of {args.repeats})")
    med = {k: statistics.median(r["peak_kb"] for r in v) for k, v in results.items()}
    hf = med[("transformers", "all")]
    for (side, ac), rs in results.items():
        over = statistics.median(r["peak_kb"] - r["before_kb"] for r in rs)
        secs = statistics.median(r["seconds"] for r in rs)
        shown_ac = {"transformers": "-", "transformers GC": "all", "tandem plain": "-", "tandem plain dense": "-"}.get(side, ac)
        print(f"{side:>18} {shown_ac:>12} {gb(med[(side, ac)]):8.2f} {gb(over):15.2f} {med[(side, ac)] / hf:14.2f}× "
              f"{secs:6.1f} {rs[0]['loss']:8.4f}")
    for group, what in ((("tandem unpacked", "tandem plain", "transformers GC", "transformers"), "the unpacked sides"),
                        (("tandem", "tandem plain dense"), "maskless and dense-mask packed attention")):
        losses = [results[(s, "all")][0]["loss"] for s in group if (s, "all") in results]
        if len(losses) > 1 and max(losses) - min(losses) > 1e-3 * abs(losses[0]):
            raise SystemExit(f"{what} disagree on the loss: {losses}")
    if not all(r["peak_reset"] for v in results.values() for r in v):
        print("note: /proc/self/clear_refs was not writable; peaks include loading the weights")


if __name__ == "__main__":
    main()
