"""What the code sandbox costs: a sandboxed run vs the same program as a plain subprocess, in one process.

    python bench/sandbox.py [--runs 20] [--concurrency 8]

1. **Start-up**: ``Sandbox.run`` of ``print(1)`` (namespaces, a tmpfs root with read-only binds, pivot_root,
   rlimits, then the interpreter) vs ``subprocess.run`` of the same interpreter and program (no sandbox) —
   the peer every sandboxed program pays on top of.
2. **Scoring throughput**: ``score_batch`` of ``--runs`` code completions (3 stdin/stdout cases each, so
   3 sandboxed runs per call) with ``--concurrency`` workers, calls/s; and the same with one worker.

Numbers are wall times on the machine it runs on (see docs/PERFORMANCE.md for recorded ones).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from tandem.data_pipelines.rl_synthetic import code_prompts
from tandem.trainer.rl.environments import score_batch
from tandem.trainer.rl.environments.code import CodeEnv
from tandem.trainer.rl.environments.sandbox import Sandbox


def _median_wall(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    box = Sandbox()
    argv = [box.interpreter, "-I", "-S", "-c", "print(1)"]
    plain = _median_wall(lambda: subprocess.run(argv, capture_output=True, check=True), args.runs)
    boxed = _median_wall(lambda: box.run(argv), args.runs)
    print(f"start-up, median of {args.runs}: plain subprocess {plain * 1e3:.1f} ms, sandboxed {boxed * 1e3:.1f} ms "
          f"(x{boxed / plain:.2f}, +{(boxed - plain) * 1e3:.1f} ms)")
    env = CodeEnv()
    rows = code_prompts(args.runs, seed=0)
    pairs = [(r, f"<think></think>```python\n{r['answer']}\n```") for r in rows]
    for workers in (1, args.concurrency):
        verdicts, stats = score_batch(pairs, envs={"code": env}, timeout_s=60, max_workers=workers)
        assert all(v.reward == 1.0 for v in verdicts), [v.info for v in verdicts if v.reward != 1.0][:1]
        print(f"score_batch, {len(pairs)} code calls x 3 cases, {workers} worker(s): {stats.seconds:.2f} s "
              f"({len(pairs) / stats.seconds:.1f} calls/s)")


if __name__ == "__main__":
    main()
