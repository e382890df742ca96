"""Pretraining data loading hidden behind compute: time a step waits for its batches, with loader workers
vs in the training process (the peer), on a megatron indexed source.

    python bench/data_loader.py                                   # 4096-token rows, 8 per step, 50 ms "compute"
    python bench/data_loader.py --seq-len 8192 --micro-batches 16 --compute-ms 200 --workers 0 2 4

Builds a ``tandem-preprocess`` output of generated documents in a temporary folder, then runs the
pretraining stage's ``batches_for_step`` for ``--steps`` steps with a sleep standing in for the forward and
backward. Prints, per worker count, the mean wait per step (``data/wait_s`` of the trainer's records) and
its share of the step, and the ratio in-process wait / worker wait (> 1: workers hide loading).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tandem.data_pipelines.preprocess import preprocess
from tandem.data_pipelines.smoke_data import write_smoke_corpus
from tandem.trainer.config import BlendEntry, DataConfig, StageConfig
from tandem.trainer.stages import PretrainStage


def wait_per_step(prefix: str, cache: str, workers: int, args) -> tuple[float, float]:
    data = DataConfig(path=prefix, seq_len=args.seq_len, valid_fraction=0.0, cache_dir=cache, num_workers=workers)
    stage = PretrainStage(data, StageConfig(steps=args.steps + 2, global_batch=args.micro_batches, micro_batch=1))
    stage.build()
    stage.batches_for_step(0)  # workers start; not counted
    waits, steps = [], []
    for s in range(1, args.steps + 1):
        t = time.perf_counter()
        stage.batches_for_step(s)
        waits.append(stage.after_step(s, True)["data/wait_s"])
        time.sleep(args.compute_ms / 1000)  # the forward/backward the loader should hide behind
        steps.append(time.perf_counter() - t)
    return sum(waits) / len(waits), sum(waits) / sum(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches (of 1 row) per step")
    p.add_argument("--compute-ms", type=float, default=50.0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_smoke_corpus(Path(tmp) / "c.jsonl", args.docs, seed=0)
        prefix = str(Path(tmp) / "c")
        preprocess([corpus], prefix)
        results = {w: wait_per_step(prefix, str(Path(tmp) / "cache"), w, args) for w in args.workers}
    base = results.get(0)
    print(f"seq_len {args.seq_len}, {args.micro_batches} rows/step, {args.compute_ms:g} ms compute/step")
    for w, (wait, share) in results.items():
        ratio = f", in-process/this {base[0] / max(wait, 1e-9):.1f}x" if base and w else ""
        print(f"  workers {w}: wait {1e3 * wait:.2f} ms/step ({100 * share:.1f}% of the step){ratio}")


if __name__ == "__main__":
    main()
