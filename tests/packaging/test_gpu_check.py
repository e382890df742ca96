"""``bench/gpu_check.py --dry-run`` runs every measuring section to the end on CPU at toy sizes and writes
its JSON (the GPU figures themselves can only come from a GPU machine). The pytest section is left out
here (it only starts ``pytest -m gpu`` in a subprocess; its summary parser is tested directly)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_dry_run_completes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--sections", "kernels,train,decode",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert report["dry_run"] is True and set(sections) == {"kernels", "train", "decode"}
    rows = {(r["op"], r["impl"]): r for r in sections["kernels"]["rows"]}
    assert set(rows) >= {("ssd", "triton"), ("ssd", "torch"), ("conv1d", "triton"), ("conv1d", "torch")}
    assert all(r["fwd_bwd_ms"] > 0 for r in rows.values()), rows
    assert sections["train"]["tokens_per_s"] > 0 and sections["train"]["first_loss"] > 0
    assert sections["decode"]["decode_tokens_per_s"] > 0
    assert "| ssd | triton |" in proc.stdout and "train step:" in proc.stdout and "decode:" in proc.stdout


def test_card_table_and_budgets():
    assert gpu_check.card_specs("NVIDIA H200") == (4.8e12, 989e12)
    assert gpu_check.card_specs("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)
    assert gpu_check.card_specs("Tesla T4") == (None, None)
    assert sum(gpu_check.BUDGETS.values()) <= 8 * 60


def test_pytest_summary_parser():
    counts = gpu_check.parse_pytest_summary("===== 2 failed, 5 passed, 1 skipped, 3 errors, 40 deselected in 3.2s =====")
    assert counts == {"passed": 5, "failed": 2, "skipped": 1, "error": 3, "deselected": 40}
