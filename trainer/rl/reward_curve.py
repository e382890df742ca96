"""Held-out reward curve of a GRPO run, and a gate on its gain (the check `make smoke` ends its GRPO stage with).

    python -m tandem.trainer.rl.reward_curve runs/smoke/grpo --min-gain 0.15 --min-prompts 64

Reads the run's ``metrics.jsonl``: the held-out reward of the starting weights (``grpo/initial_val_reward``,
in the first record) and of every evaluation after it (``grpo/val_reward``), with the number of held-out
prompts each was measured on (``grpo/val_prompts``). Prints the curve, per environment where there are
several, and the gain of the last evaluation over the start. With ``--min-gain G`` the exit status is 1 when
the gain is below ``G`` (or when fewer than ``--min-prompts`` held-out prompts were scored); 2 when the run
directory has no such records (not a GRPO run with evaluation, or not started).

``--metric`` picks another held-out series the stage records: ``val/<task>/<component>`` is an environment's
component averaged over the held-out rollouts, e.g. the GenRM judge's agreement with the labels::

    python -m tandem.trainer.rl.reward_curve runs/smoke/genrm --metric val/genrm/agree --min-gain 0.1
    python -m tandem.trainer.rl.reward_curve runs/smoke/rlhf --metric val_response_length --max-gain -4

The figures are the run's own measurements, not recomputed: each evaluation scores every held-out prompt once
with the same seeds (docs/RL.md, "Metrics"), so the curve compares weights, not sampling luck.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RewardCurve", "read_curve", "main"]


@dataclass
class RewardCurve:
    steps: list[int] = field(default_factory=list)  # 0 = the starting weights
    rewards: list[float] = field(default_factory=list)
    prompts: list[int] = field(default_factory=list)
    per_task: dict[str, list[float]] = field(default_factory=dict)  # aligned with ``steps`` where measured

    @property
    def gain(self) -> float:
        return self.rewards[-1] - self.rewards[0]


def read_curve(run_dir: str | Path, metric: str = "val_reward") -> RewardCurve:
    """The held-out ``grpo/<metric>`` curve of ``run_dir`` (its ``metrics.jsonl``; the start is
    ``grpo/initial_<metric>``). Raises ``FileNotFoundError`` / ``ValueError`` naming the file when there is no
    curve to read."""
    key, initial = f"grpo/{metric}", f"grpo/initial_{metric}"
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a run directory?)")
    curve = RewardCurve()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON record ({e.msg})") from None
        if initial in r and not curve.steps:
            _add(curve, 0, r, initial, "grpo/initial_val_prompts")
        if key in r:
            _add(curve, int(r["step"]), r, key, "grpo/val_prompts")
    if len(curve.steps) < 2 or curve.steps[0] != 0:
        raise ValueError(f"{path}: no held-out curve of {metric} (needs {initial} and at least one {key}: a GRPO "
                         f"run with held-out prompts and stage.eval_batches > 0, whose environment records it)")
    return curve


def _add(curve: RewardCurve, step: int, record: dict, key: str, prompts_key: str) -> None:
    i = len(curve.steps)
    curve.steps.append(step)
    curve.rewards.append(float(record[key]))
    curve.prompts.append(int(record.get(prompts_key, record.get("grpo/val_prompts", 0))))
    for k, v in record.items():
        if k.startswith(key + "/"):
            task = k[len(key) + 1:]
            curve.per_task.setdefault(task, [float("nan")] * i).append(float(v))
    for series in curve.per_task.values():
        series.extend([float("nan")] * (i + 1 - len(series)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--min-gain", type=float, default=None, help="exit 1 when last − start is below this")
    ap.add_argument("--max-gain", type=float, default=None,
                    help="exit 1 when last − start is above this (a series that must fall: --max-gain -5)")
    ap.add_argument("--min-prompts", type=int, default=1, help="exit 1 when an evaluation scored fewer prompts")
    ap.add_argument("--metric", default="val_reward",
                    help="the held-out series: val_reward (default) or val/<task>/<component>, e.g. val/genrm/agree")
    args = ap.parse_args(argv)
    try:
        curve = read_curve(args.run_dir, args.metric)
    except (FileNotFoundError, ValueError) as e:
        print(f"reward_curve: {e}", file=sys.stderr)
        return 2
    fmt = lambda xs: " → ".join(f"{x:.3f}" for x in xs)
    name = "reward" if args.metric == "val_reward" else args.metric
    print(f"held-out {name} (steps {', '.join(map(str, curve.steps))}; {min(curve.prompts)} prompts): "
          f"{fmt(curve.rewards)}  gain {curve.gain:+.3f}")
    if len(curve.per_task) > 1:
        for task, series in sorted(curve.per_task.items()):
            print(f"  {task}: {fmt(series)}")
    if min(curve.prompts) < args.min_prompts:
        print(f"reward_curve: an evaluation scored {min(curve.prompts)} held-out prompts, fewer than "
              f"--min-prompts {args.min_prompts}", file=sys.stderr)
        return 1
    if args.min_gain is not None and curve.gain < args.min_gain:
        print(f"reward_curve: held-out {name} gain {curve.gain:+.3f} is below --min-gain {args.min_gain}",
              file=sys.stderr)
        return 1
    if args.max_gain is not None and curve.gain > args.max_gain:
        print(f"reward_curve: held-out {name} change {curve.gain:+.3f} is above --max-gain {args.max_gain}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
