"""Quiet by default: rank 0's log lines only, no third-party warnings, errors always; log lines never inside the
progress bar's line; one error line per launch, not per rank."""

import io
import logging
import warnings

import pytest

from tandem.trainer.cli import first_to_say
from tandem.trainer.metrics import ConsoleSink, configure_logging


@pytest.fixture
def clean_logging():
    root, names = logging.getLogger(), ("tandem", "megatron", "deepspeed", "DeepSpeed", "torchao", "_distutils_hack")
    saved = (root.level, {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names})
    for n in names:  # as a fresh process has them (an in-process run of another test may have set them)
        logging.getLogger(n).setLevel(logging.NOTSET)
        logging.getLogger(n).filters[:] = []
    with warnings.catch_warnings():
        warnings.resetwarnings()
        yield
    root.setLevel(saved[0])
    for n, (level, filters) in saved[1].items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).filters[:] = filters


def _warned(module: str) -> bool:
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("noise", UserWarning, "x.py", 1, module=module)
    return bool(seen)


def test_rank0_lines_only_libraries_quiet(clean_logging):
    logging.getLogger().setLevel(logging.INFO)
    configure_logging(rank=0)
    assert logging.getLogger("tandem.trainer.loop").isEnabledFor(logging.INFO)
    assert not logging.getLogger("megatron.core.datasets").isEnabledFor(logging.WARNING)
    assert logging.getLogger("megatron.core.datasets").isEnabledFor(logging.ERROR)
    # DeepSpeed sets its own logger's level when imported: the filter still drops its warnings
    ds = logging.getLogger("DeepSpeed")
    ds.setLevel(logging.INFO)
    assert not ds.filter(logging.LogRecord("DeepSpeed", logging.WARNING, "f", 1, "Setting accelerator", None, None))
    assert ds.filter(logging.LogRecord("DeepSpeed", logging.ERROR, "f", 1, "broken", None, None))
    assert not _warned("deepspeed.runtime.zero") and not _warned("torchao.quantization") and _warned("tandem.model")

    configure_logging(rank=1)
    assert not logging.getLogger("tandem.trainer.loop").isEnabledFor(logging.WARNING)
    assert logging.getLogger("tandem.trainer.loop").isEnabledFor(logging.ERROR)


def test_verbose_changes_nothing(clean_logging):
    logging.getLogger().setLevel(logging.INFO)
    configure_logging(rank=3, verbose=True)
    assert logging.getLogger("tandem.trainer.loop").isEnabledFor(logging.INFO)
    assert logging.getLogger("megatron.core").isEnabledFor(logging.INFO) and _warned("deepspeed.x")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_are_not_written_into_the_progress_bar(monkeypatch, clean_logging):
    """On a terminal the bar and the log share one screen: each log line must start a line of its own."""
    screen = _Tty()
    monkeypatch.setattr("sys.stderr", screen)
    root = logging.getLogger()
    handler = logging.StreamHandler(screen)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        sink = ConsoleSink(total_steps=10, start_step=0, progress_bar=True)
        sink.log({"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 5.0})
        logging.getLogger("tandem.test").info("hello-log")
        warnings.warn("a-warning")
        sink.close()
    finally:
        root.removeHandler(handler)
    text = screen.getvalue()
    for needle in ("hello-log", "a-warning"):
        line = next(l for l in text.split("\n") if needle in l)
        assert "step" not in line.rsplit("\r", 1)[-1], repr(line)  # what the terminal shows on that line
    assert not logging.getLogger("py.warnings").handlers or all(
        "Tqdm" not in type(h).__name__ for h in logging.getLogger().handlers)  # restored after close


def test_an_error_line_is_printed_once_per_launch(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    env = {"TORCHELASTIC_RUN_ID": "abc", "WORLD_SIZE": "2"}
    assert first_to_say("tandem: error: x", env) and not first_to_say("tandem: error: x", env)
    assert first_to_say("tandem: error: only rank 1 sees this", env)
    assert first_to_say("tandem: error: x", {**env, "TORCHELASTIC_RUN_ID": "next launch"})
    assert first_to_say("tandem: error: x", {}) and first_to_say("tandem: error: x", {})  # no launcher: always
