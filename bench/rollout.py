"""Rollout throughput and the generation share of a GRPO step.

    python bench/rollout.py                              # both parts, CPU
    python bench/rollout.py --prompts 4 --group 8 --new 64 --iters 3 --grpo-steps 4
    python bench/rollout.py --engines eager,static,compiled   # each stage.grpo.rollout_engine, interleaved

1. **Rollouts, tandem vs transformers.** The same random weights (``bench/generate.py``'s model, saved with
   ``save_pretrained`` and loaded by ``NemotronHForCausalLM``), ``--prompts`` prompts × ``--group`` sampled
   completions each (temperature 1, top-p 1 — GRPO's defaults), exactly ``--new`` new tokens (no stop token),
   the way the GRPO stage calls the engine (one call per group, ``max_batch = G``) against transformers'
   ``generate(do_sample=True)`` on the group's rows. Rollout tokens/s = P·G·new / wall time (prefill included:
   it is part of a rollout); median over ``--iters``, the sides interleaved — one tandem side per
   ``--engines`` mode (``stage.grpo.rollout_engine``: eager, static, compiled).
2. **Where a GRPO step goes.** ``--grpo-steps`` steps of the real stage (``tandem -cn grpo``, tiny model,
   generated "Which is larger" prompts, 8 × 8 rollouts of up to 16 tokens): the medians of
   ``grpo/time_{generate,score,logprob,train}_frac`` and ``grpo/rollout_tokens_per_s`` from its metrics,
   one run per ``--engines`` mode.
   The anchor stacks spend 60–90% of a step generating; the target here is at most 50%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from generate import build  # bench/generate.py (this script's folder is on sys.path)

from tandem.trainer.inference.backends import engine_for
from tandem.trainer.inference.engine import SamplingParams


def rollouts(args) -> None:
    import transformers
    from transformers import NemotronHForCausalLM

    transformers.logging.set_verbosity_error()
    model = build(args)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = NemotronHForCausalLM.from_pretrained(d).eval()
    hf.generation_config.eos_token_id = None  # exactly --new tokens on both sides
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.prompts, args.prompt), generator=g)
    engines = {mode: engine_for(model, args.group, mode) for mode in args.engines}

    def ours(engine):
        def run():
            for i, p in enumerate(prompts.tolist()):
                engine.generate([p] * args.group, SamplingParams(max_new_tokens=args.new, temperature=1.0, top_p=1.0,
                                                                 seed=i))
        return run

    def theirs():
        with torch.inference_mode():
            for p in prompts:
                rows = p.unsqueeze(0).repeat(args.group, 1)
                hf.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True, temperature=1.0, top_p=1.0,
                            top_k=0, max_new_tokens=args.new, pad_token_id=0)

    sides = {**{mode: ours(e) for mode, e in engines.items()}, "hf": theirs}
    for fn in sides.values():
        fn()  # warm-up (the compiled engine compiles here)
    times = {k: [] for k in sides}
    for _ in range(args.iters):
        for k, fn in sides.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    n = args.prompts * args.group * args.new
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"rollouts: {args.prompts} prompts x {args.group} samples x {args.new} new tokens, prompt {args.prompt}, "
          f"pattern={args.pattern} hidden={args.hidden} vocab={args.vocab}, threads={torch.get_num_threads()}")
    print(f"  transformers {rate['hf']:.0f} tok/s   (medians of {args.iters})")
    for mode in engines:
        print(f"  tandem {mode:<9} {rate[mode]:.0f} tok/s   tandem/transformers {rate[mode] / rate['hf']:.2f}x")


def grpo_share(args) -> None:
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        from tandem.data_pipelines import rl_synthetic

        rl_synthetic.write_prompts(d / "train.jsonl", 500, seed=2, kinds=("max",))
        for mode in args.engines:
            cmd = [sys.executable, "-m", "tandem.trainer.cli", "-cn", "grpo", "model.preset=tiny", "model.init_from=null",
                   f"data.rl.train=[{d / 'train.jsonl'}]", "data.seq_len=64", f"stage.steps={args.grpo_steps}",
                   "stage.micro_batch=16", "stage.eval_batches=0", "stage.save_every=0", "stage.grpo.prompts_per_step=8",
                   "stage.grpo.generations_per_prompt=8", "stage.grpo.max_new_tokens=16", "logger.log_every=1",
                   f"stage.grpo.rollout_engine={mode}", "logger.progress_bar=false", f"run.dir={d / mode}"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            records = [json.loads(line) for line in (d / mode / "metrics.jsonl").read_text().splitlines()]
            records = records[1:] or records  # the first step also pays for start-up (allocations, first calls, compiling)
            med = lambda k: statistics.median(r[k] for r in records)  # noqa: E731
            print(f"GRPO step, rollout_engine={mode} (tiny model, 8 prompts x 8 rollouts, <= 16 new tokens; median of "
                  f"{len(records)} steps): generate {med('grpo/time_generate_frac'):.0%}  score {med('grpo/time_score_frac'):.0%}  "
                  f"logprob {med('grpo/time_logprob_frac'):.0%}  train {med('grpo/time_train_frac'):.0%}  "
                  f"step {med('grpo/step_seconds'):.2f} s  rollout {med('grpo/rollout_tokens_per_s'):.0f} tok/s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pattern", default="MEM*M-ME")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="prompt length")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--grpo-steps", type=int, default=4, help="0 = skip the GRPO step part")
    p.add_argument("--skip-rollouts", action="store_true")
    p.add_argument("--engines", default="eager", help="comma-separated stage.grpo.rollout_engine modes to measure")
    args = p.parse_args()
    args.engines = [m for m in args.engines.split(",") if m]
    if not args.skip_rollouts:
        rollouts(args)
    if args.grpo_steps:
        grpo_share(args)


if __name__ == "__main__":
    main()
