"""``tandem report``: panels from the metrics runs write, several runs overlaid, one self-contained page;
bad input is one line; the run directories are only read. The page is rendered in headless Chromium
when it is installed (Debian package ``chromium``)."""

import base64
import hashlib
import json
import re
import shutil
import subprocess

import pytest

from tandem.trainer.report import load_run, report_main, write_report


def _write(run_dir, records, tail=""):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    (run_dir / "config.yaml").write_text("stage:\n  name: x\n")


def _pretrain(step, **kw):
    return {"stage": "pretrain", "step": step, "total_steps": 4, "loss": 6.0 - step, "lr": 1e-3 * step,
            "grad_norm": 1.0 / step, "tokens_per_s": 100.0 + step, "tokens": 64 * step, "moe/max_load": 1.5,
            "moe/min_load": 0.5, **kw}


def _grpo(step, **kw):
    return {"stage": "grpo", "step": step, "total_steps": 3, "loss": 0.1, "lr": 5e-4, "grad_norm": 0.2,
            "tokens_per_s": 50.0, "tokens": 10 * step, "grpo/reward_mean/math": 0.1 * step,
            "grpo/reward_mean/structured": 0.2, "grpo/response_length_mean": 30.0 + step,
            "grpo/response_length_max": 60.0, "grpo/kl": 0.01 * step, **kw}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "runs"
    # resumed from step 2: steps 3-4 were logged twice, the second time is the run's history
    _write(root / "pretrain", [_pretrain(1), _pretrain(2, val_loss=5.5), _pretrain(3, loss=9.0), _pretrain(4, loss=9.0),
                               _pretrain(3), _pretrain(4, val_loss=2.5)])
    _write(root / "grpo", [_grpo(1), _grpo(2), _grpo(3, **{"grpo/val_reward/math": 0.5})], tail='{"step": 4, "lo')
    return root


def _hashes(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    before = _hashes(runs)
    index = write_report([runs], tmp_path_factory.mktemp("out"))
    assert _hashes(runs) == before  # only read
    return index


def test_report_panels_overlay_and_page(runs, report):
    index = report
    out = index.parent
    pngs = {p.stem for p in out.glob("*.png")}
    assert pngs == {"loss", "lr", "grad_norm", "tokens_per_s", "moe_load", "reward", "lengths", "kl"}  # no retrieval
    page = index.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(pngs)
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing fetched
    assert "1 line(s) of metrics.jsonl did not parse" in page  # the grpo run's cut last line
    # a folder of runs expands in pipeline order; the resumed run keeps the latest record of each step
    assert page.index("<td>pretrain</td>") < page.index("<td>grpo</td>")
    pre = load_run(runs / "pretrain")
    assert [r["step"] for r in pre.records] == [1, 2, 3, 4] and pre.records[-1]["loss"] == 2.0


def test_report_default_folder_and_bad_input(runs, tmp_path, capsys):
    single = tmp_path / "single"
    shutil.copytree(runs / "pretrain", single)
    assert report_main([str(single)]) == 0
    assert (single / "report" / "index.html").exists()
    assert str(single / "report" / "index.html") in capsys.readouterr().out
    assert report_main([str(single)]) == 0  # its own earlier report folder is written again
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "loss.png").write_bytes(b"the user's")
    for args, needle in (([str(tmp_path / "nowhere")], "no such run directory"),
                         ([str(tmp_path / "single" / "report")], "no metrics.jsonl in it"),
                         ([str(single), "--out", str(tmp_path / "mine")], "is not a tandem report folder")):
        assert report_main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tandem report: error: ") and needle in err, err
    assert (tmp_path / "mine" / "loss.png").read_bytes() == b"the user's"


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the page is not rendered")
    index = report
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1300,2400", index.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    px = matplotlib.image.imread(shot)[..., :3]
    blue = ((px[..., 2] - px[..., 0]) > 0.35).mean()  # matplotlib's first colour: the plotted lines, not text
    orange = ((px[..., 0] - px[..., 2]) > 0.5).mean()  # the second run's colour
    assert blue > 1e-4 and orange > 1e-4, (blue, orange)
