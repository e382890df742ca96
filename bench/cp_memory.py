"""Per-rank peak memory of one training fwd+bwd under context parallelism: CP = 1 vs CP = 2 (gloo, CPU).

    python bench/cp_memory.py                    # 16k tokens, CP 1 and 2, activation checkpointing of every block
    python bench/cp_memory.py --tokens 8192 --ac none

A hybrid MoE model (``MEM*EM-ME``: Mamba-2, MoE, attention, MLP; hidden 128, vocabulary 8192), one row of
6 packed documents of uneven lengths that cross the CP chunk boundaries, chunked loss, fp32. Each CP size
is one fresh launch (``torchrun --nproc_per_node CP``; CP = 1 is one plain process): every rank builds the
same model, resets its peak-RSS counter (``/proc/self/clear_refs``), runs one forward+backward of the
summed next-token loss on its load-balanced slice, and reads ``VmHWM``. Reported per CP size: the largest
rank's peak over the RSS just before the step (activations + gradients + transients — what CP divides),
and the loss summed over ranks, which must equal CP = 1's (the same tokens; exactness at length). The
measurement and the model are ``bench/_memory.py``'s, shared with ``long_context_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _memory import gb, measure_step, model_config


def child(args) -> None:
    import torch

    from tandem.model import HybridLM

    cp = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from tandem.trainer.parallel.context import apply_context_parallel

        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = HybridLM(model_config(), init_seed=0).train()
    model.loss_chunk_tokens = 1024
    model.set_activation_checkpointing(args.ac)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cp = apply_context_parallel(model, dist.group.WORLD)
    t = args.tokens
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8192, (1, t), generator=g)
    labels = torch.roll(ids, -1, 1)
    cuts = sorted({int(t * f) for f in (0.07, 0.2, 0.38, 0.55, 0.81)})  # 6 documents, uneven
    seq = torch.zeros(1, t, dtype=torch.long)
    for c in cuts:
        seq[:, c:] += 1
    if cp is not None:
        ids, labels, seq = cp.shard(ids), cp.shard(labels), cp.shard(seq)
    m = measure_step(lambda: model(ids, seq, labels=labels).sum())
    out = {"rank": int(os.environ.get("RANK", "0")), "peak_over_step_gb": gb(m["peak_kb"] - m["before_kb"]),
           "peak_gb": gb(m["peak_kb"]), "loss_sum": m["loss"], "peak_reset": m["peak_reset"]}
    with open(os.path.join(args.out, f"rank{out['rank']}.json"), "w") as f:  # (stdout lines of ranks interleave)
        json.dump(out, f)


def launch(cp: int, args) -> list[dict]:
    import tempfile

    out = tempfile.mkdtemp(prefix=f"cp{cp}-")
    script = [os.path.abspath(__file__), "--child", "--tokens", str(args.tokens), "--ac", args.ac, "--out", out]
    if cp == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cp), *script]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode:
        raise SystemExit(f"CP={cp} failed:\n{res.stderr[-3000:]}")
    results = []
    for r in range(cp):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--ac", default="all", help="activation checkpointing: all | none | a layer kind")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    rows = {}
    for cp in args.cp:
        rows[cp] = launch(cp, args)
    base = max(r["peak_over_step_gb"] for r in rows[args.cp[0]])
    ref_loss = sum(r["loss_sum"] for r in rows[args.cp[0]])
    print(f"{args.tokens} tokens, activation checkpointing {args.ac}; peak over the RSS before the step, largest rank")
    print(f"{'CP':>3} {'tokens/rank':>12} {'peak over step':>15} {'vs CP=' + str(args.cp[0]):>9} {'process peak':>13} "
          f"{'Σ loss rel. diff':>17}")
    for cp, rs in rows.items():
        over = max(r["peak_over_step_gb"] for r in rs)
        loss = sum(r["loss_sum"] for r in rs)
        print(f"{cp:>3} {args.tokens // cp:>12} {over:>13.2f} GB {over / base:>8.2f}× {max(r['peak_gb'] for r in rs):>10.2f} GB "
              f"{abs(loss - ref_loss) / abs(ref_loss):>17.1e}  (Σ loss {loss:.6f})")
    if not all(r["peak_reset"] for rs in rows.values() for r in rs):
        print("note: /proc/self/clear_refs was not writable; peaks include building the model")


if __name__ == "__main__":
    main()
