"""``tandem report RUN_DIR [RUN_DIR ...]``: plots of runs, as PNG files and one self-contained HTML page.

    tandem report runs/smoke/pretrain                      # → runs/smoke/pretrain/report/index.html
    tandem report runs/smoke                               # every run under it (pretrain, sft, grpo, ...)
    tandem report runs/a runs/b --out cmp/                 # several runs overlaid

It reads what the runs wrote (``metrics.jsonl``, one record per logged step, and ``config.yaml``; see
:mod:`tandem.trainer.metrics` and docs/RECIPES.md) and draws one panel per quantity that at least one run
logged: loss and val loss, learning rate, gradient norm, tokens/s, MoE load balance, and where present
(GRPO) reward per environment, response lengths and KL, and retrieval accuracy by length. Runs are
overlaid, one colour each; a quantity's variants (train/val, max/min) are line styles. The page inlines
the images (base64), so it can be mailed or opened anywhere.

A run resumed from an earlier checkpoint appends the steps it trains again; the report keeps the latest
record of each step (what the run's history now is). A line that does not parse (a run killed while it
wrote its last record) is skipped and counted on the page; nothing in the run directories is written to but
the report folder, and an existing folder is written into only if it holds an earlier tandem report.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import fnmatch
import html
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PANELS", "Run", "load_run", "find_runs", "write_report", "report_main"]

#: (file stem, title, y label, series): a series is (key or fnmatch pattern, label); '*' in a label is the
#: matched part of the key (the environment, the length)
PANELS = (
    ("loss", "Loss", "loss", (("loss", "train"), ("val_loss", "val"))),
    ("lr", "Learning rate", "lr", (("lr", "lr"),)),
    ("grad_norm", "Gradient norm (before clipping)", "grad norm", (("grad_norm", "grad norm"),)),
    ("tokens_per_s", "Throughput", "tokens/s", (("tokens_per_s", "tokens/s"),)),
    ("moe_load", "MoE load balance (tokens per expert / mean, worst layer)", "load / mean",
     (("moe/max_load", "max"), ("moe/min_load", "min"))),
    ("reward", "Reward per environment", "mean reward",
     (("grpo/reward_mean/*", "train *"), ("grpo/val_reward/*", "val *"))),
    ("lengths", "Response length", "tokens",
     (("grpo/response_length_mean", "mean"), ("grpo/response_length_max", "max"))),
    ("kl", "KL to the reference policy", "KL", (("grpo/kl", "KL"),)),
    ("retrieval", "Retrieval accuracy by length", "accuracy", (("retrieval/accuracy/*", "length *"),)),
)

#: pipeline order of the stages when a folder of runs is expanded
_STAGE_ORDER = {"pretrain": 0, "sft": 1, "grpo": 2}
_STYLES = ("-", "--", ":", "-.")


class ReportError(ValueError):
    """A run directory that cannot be reported on (exit status 2, one line)."""


@dataclass
class Run:
    path: Path
    label: str
    records: list[dict]  # one per step, in step order (the latest record of a step that was trained twice)
    skipped_lines: int = 0
    config: dict = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return str(self.records[-1].get("stage", "?")) if self.records else "?"


def load_run(path: str | Path, label: str | None = None) -> Run:
    """The records of ``path/metrics.jsonl`` (and the stage from ``config.yaml`` if there is one)."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory")
    if not metrics.is_file():
        raise ReportError(f"{metrics}: not found (a run directory holds the metrics.jsonl its run wrote)")
    by_step: dict[int, dict] = {}
    skipped = 0
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            by_step[step] = record
    config = {}
    if (path / "config.yaml").is_file():
        try:
            import yaml

            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except Exception:  # the report never fails on a damaged config copy; the metrics are what it plots
            config = {}
    records = [by_step[s] for s in sorted(by_step)]
    start = {k.replace("grpo/initial_", "grpo/", 1): v for k, v in (records[0].items() if records else ())
             if k.startswith("grpo/initial_")}
    if start and 0 not in by_step:  # GRPO's held-out reward of the starting weights: the curve's step 0
        records.insert(0, {"step": 0, "stage": records[0].get("stage"), **start})
    return Run(path, label or path.name, records, skipped, config)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories of ``paths``: a folder with ``metrics.jsonl`` is a run; a folder without one stands
    for the runs directly under it (pretrain, sft, grpo first, then by name)."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such run directory")
        if (p / "metrics.jsonl").is_file() or not p.is_dir():
            runs.append(p)
            continue
        inside = [d for d in sorted(p.iterdir()) if (d / "metrics.jsonl").is_file()]
        if not inside:
            raise ReportError(f"{p}: no metrics.jsonl in it or in the folders directly under it")

        def order(d: Path):
            stage = load_run(d).stage
            return (_STAGE_ORDER.get(stage, len(_STAGE_ORDER)), d.name)

        runs += sorted(inside, key=order)
    unique: dict[Path, Path] = {}
    for r in runs:  # a run named twice (itself and through its folder) is reported once
        unique.setdefault(r.resolve(), r)
    return list(unique.values())


def _labels(paths: list[Path]) -> list[str]:
    """Short names that tell the runs apart: the paths below their common folder."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath(resolved))
    labels = [str(p.relative_to(common)) or p.name for p in resolved]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in paths]


def _series(run: Run, pattern: str, label: str) -> list[tuple[str, list[int], list[float]]]:
    """(label, steps, values) of every key of ``run`` matching ``pattern`` (records lacking it are gaps)."""
    keys = sorted({k for r in run.records for k in r if fnmatch.fnmatchcase(k, pattern)})
    out = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in run.records if isinstance(r.get(key), (int, float))]
        if pts:
            part = key[len(pattern) - 1:] if pattern.endswith("*") else ""
            out.append((label.replace("*", part).strip(), [p[0] for p in pts], [float(p[1]) for p in pts]))
    return out


def _plot(runs: list[Run], title: str, ylabel: str, series: tuple, dest: Path) -> bool:
    """One panel as a PNG; False (nothing written) when no run logged any of its series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_run = [[s for pattern, label in series for s in _series(run, pattern, label)] for run in runs]
    names = sorted({label for variants in per_run for label, _, _ in variants})
    if not names:
        return False
    lines = []  # one colour per run, one line style per variant (the same variant: the same style in every run)
    for i, (run, variants) in enumerate(zip(runs, per_run)):
        for label, xs, ys in variants:
            name = run.label if len(names) == 1 else f"{run.label} · {label}"
            lines.append((f"C{i % 10}", _STYLES[names.index(label) % len(_STYLES)], name, xs, ys))
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    for color, style, name, xs, ys in lines:
        ax.plot(xs, ys, style, color=color, label=name, linewidth=1.6, marker="o" if len(xs) == 1 else None)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(dest, format="png")
    plt.close(fig)
    return True


def _summary_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        last = run.records[-1] if run.records else {}
        first = run.records[0] if run.records else {}
        vals = [r["val_loss"] for r in run.records if isinstance(r.get("val_loss"), (int, float))]

        def num(v, fmt="{:.4f}"):
            return fmt.format(v) if isinstance(v, (int, float)) else "–"

        rows.append([run.label, run.stage, f"{last.get('step', '–')}/{last.get('total_steps', '–')}",
                     num(first.get("loss")), num(last.get("loss")), num(vals[-1]) if vals else "–",
                     num(last.get("tokens"), "{:,.0f}"), str(run.path)])
    return rows


#: marks a page (and so its folder) as written by tandem report: only such a folder is written into again
GENERATOR = '<meta name="generator" content="tandem report">'


def _is_report(folder: Path) -> bool:
    index = folder / "index.html"
    return index.is_file() and GENERATOR in index.read_text(encoding="utf-8", errors="replace")[:2000]


def write_report(paths: list[str | Path], out: str | Path | None = None, title: str = "tandem report") -> Path:
    """PNG per panel and ``index.html`` (images inlined) in ``out`` (default: ``report/`` in the runs' common
    folder, or in the run itself when there is one); returns the page's path."""
    run_dirs = find_runs(paths)
    runs = [load_run(p, label) for p, label in zip(run_dirs, _labels(run_dirs))]
    empty = [str(r.path) for r in runs if not r.records]
    if len(empty) == len(runs):
        raise ReportError(f"{', '.join(empty)}: metrics.jsonl holds no records yet")
    if out is None:
        out = Path(os.path.commonpath([p.resolve() for p in run_dirs])) / "report"
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_report(out))):
        raise ReportError(f"{out}: exists and is not a tandem report folder (no index.html written by tandem "
                          f"report); give --out a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for stem, panel_title, ylabel, series in PANELS:
        dest = out / f"{stem}.png"
        if _plot(runs, panel_title, ylabel, series, dest):
            images.append((panel_title, dest))
        elif dest.exists():
            dest.unlink()  # a panel of an earlier report of other runs
    head = ["run", "stage", "steps", "first loss", "last loss", "last val loss", "tokens", "directory"]
    table = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    for row in _summary_rows(runs):
        table += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
    notes = [f"{r.label}: {r.skipped_lines} line(s) of metrics.jsonl did not parse and were skipped"
             for r in runs if r.skipped_lines]
    notes += [f"{r.label}: no records yet" for r in runs if not r.records]
    figures = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(t)}</figcaption></figure>'
        for t, p in images)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; font-size: 0.9em; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 0 1em 1.5em 0; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.85em; color: #555; }}
.note {{ color: #a33; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(runs)} run(s), written {when} by <code>tandem report</code>.</p>
<table><tr>{table}</table>
{''.join(f'<p class="note">{html.escape(n)}</p>' for n in notes)}
{figures}
</body></html>
"""
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    return index


def report_main(argv: list[str] | None = None) -> int:
    """``tandem report``: 0, or 2 on bad input (one line naming the directory)."""
    from .inference.cli import HelpFormatter

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            print(f"tandem report: error: {message} (see --help)", file=sys.stderr)
            raise SystemExit(2)

    p = Parser(prog="tandem report", formatter_class=HelpFormatter,
               description="Plots of runs (loss, val loss, lr, grad norm, tokens/s, MoE load; reward, lengths, KL\n"
                           "where logged) as PNG files and one self-contained HTML page; several runs overlaid.",
               epilog="examples:\n  tandem report runs/smoke/pretrain\n  tandem report runs/smoke            "
                      "# every run under it\n  tandem report runs/a runs/b --out cmp/")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory (holding metrics.jsonl), or a folder of them")
    p.add_argument("--out", default=None, help="output folder (default: report/ in the runs' common folder)")
    p.add_argument("--title", default="tandem report", help="the page's title")
    args = p.parse_args(argv)
    try:
        index = write_report(args.runs, args.out, args.title)
    except ReportError as e:
        print(f"tandem report: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(report_main())
