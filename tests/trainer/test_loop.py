"""The shared loop: exact resume, global-token normalisation, NaN guard, phases, preemption, bad input."""

import json
import signal
from pathlib import Path

import pytest
import torch

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.config import DataConfig, BlendEntry, StageConfig
from tandem.trainer.data import DataError
from tandem.trainer.loop import PREEMPTED_EXIT_CODE, Preempted, TrainingDiverged
from tandem.trainer.run import run
from tandem.trainer.stages import PretrainStage
from tandem.trainer.stages.base import token_cross_entropy

from .conftest import run_cli


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_exact_resume_is_bitwise(tiny_cfg, tmp_path):
    run(tiny_cfg("stage.steps=8", run_dir=tmp_path / "straight"))
    run(tiny_cfg("stage.steps=8", "stage.save_every=4", run_dir=tmp_path / "split"))
    # Drop the end of the split run and resume it from its step-4 checkpoint.
    ckpts = tmp_path / "split" / "checkpoints"
    import shutil

    shutil.rmtree(ckpts / "step_00000008")
    (ckpts / "latest").write_text("step_00000004\n")
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()[:4]
    (tmp_path / "split" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run(tiny_cfg("stage.steps=8", "stage.save_every=4", run_dir=tmp_path / "split"))
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(straight) == len(split) == 8
    assert straight == split  # bitwise: float equality of every logged loss
    a = HybridLM.from_pretrained(tmp_path / "straight" / "checkpoints" / "step_00000008" / "model")
    b = HybridLM.from_pretrained(tmp_path / "split" / "checkpoints" / "step_00000008" / "model")
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n


def test_loss_normalised_by_global_tokens_not_micro_batch():
    """Gradients are identical whatever the micro-batch split, with uneven target counts per sample."""
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    ids = torch.randint(3, 512, (4, 17))
    mask = torch.ones(4, 16)
    mask[0, :12] = 0  # sample 0 has 4 targets, the others 16
    mask[2, 5:] = 0
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask, "seq_idx": torch.zeros(4, 16, dtype=torch.long)}
    grads = []
    for split in ([4], [2, 2], [1, 1, 1, 1], [1, 3]):
        model.zero_grad()
        total = mask.sum()
        start = 0
        for n in split:
            mb = {k: v[start:start + n] for k, v in batch.items()}
            (token_cross_entropy(model, mb).loss_sum / total).backward()
            start += n
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-7, rtol=1e-5)
    # A per-micro-batch mean would differ:
    model.zero_grad()
    for i in range(4):
        mb = {k: v[i:i + 1] for k, v in batch.items()}
        out = token_cross_entropy(model, mb)
        (out.loss_sum / out.num_tokens / 4).backward()
    per_mb = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (per_mb - grads[0]).abs().max() > 1e-4


class _PoisonedStage(PretrainStage):
    """Returns a NaN loss at the given steps."""

    poison: set = set()

    def batches_for_step(self, step):
        self._step = step
        return super().batches_for_step(step)

    def loss(self, model, batch):
        out = super().loss(model, batch)
        if self._step in self.poison:
            out.loss_sum = out.loss_sum * float("nan")
        return out


def test_nan_guard_skips_and_aborts(tiny_cfg, tmp_path, monkeypatch):
    import tandem.trainer.run as run_module

    monkeypatch.setitem(run_module.STAGES, "pretrain", _PoisonedStage)
    _PoisonedStage.poison = {2, 3}
    record = run(tiny_cfg("stage.steps=6", "stage.nan_tolerance=3", run_dir=tmp_path / "a"))
    metrics = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["nan_skipped"] for m in metrics] == [0, 0, 1, 2, 2, 2]
    assert record["nan_skipped"] == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics[4:])
    model = HybridLM.from_pretrained(tmp_path / "a" / "checkpoints" / "step_00000006" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    _PoisonedStage.poison = {1, 2, 3, 4}
    with pytest.raises(TrainingDiverged, match="3 consecutive steps with non-finite loss"):
        run(tiny_cfg("stage.steps=6", "stage.nan_tolerance=3", run_dir=tmp_path / "b"))


def test_phase_switch_and_no_replay():
    data = DataConfig(
        phase1=[BlendEntry("synthetic:copy", 0.75), BlendEntry("synthetic:prose", 0.25)],
        phase2=[BlendEntry("synthetic:prose", 1.0)], phase2_start=0.5, seq_len=8, num_workers=0,
    )
    stage = PretrainStage(data, StageConfig(steps=10, global_batch=8, micro_batch=4))
    assert [stage.step_info(s)["phase"] for s in range(10)] == [1] * 5 + [2] * 5
    for s in range(10):
        sources = torch.cat([b["source"] for b in stage.batches_for_step(s)])
        assert sources.tolist() == stage.datasets.train.source_index[s * 8:(s + 1) * 8].tolist()
    train = stage.datasets.train
    # phase 1: 40 samples at 3:1; phase 2: 40 more prose samples continuing at offset 10, no replay
    copy, prose = (train.source_sample_index[train.source_index == k].tolist() for k in (0, 1))
    assert train.source_shares(0, 40) == {"synthetic:copy": 0.75, "synthetic:prose": 0.25}
    assert copy == list(range(30)) and prose == list(range(50))


def test_stage_input_errors():
    st = StageConfig(steps=4, global_batch=6, micro_batch=4)
    with pytest.raises(DataError, match=r"global_batch \(6\) must be a multiple"):
        PretrainStage(DataConfig(phase1=[BlendEntry("synthetic:copy", 1.0)]), st)
    st = StageConfig(steps=4, global_batch=8, micro_batch=4)
    with pytest.raises(DataError, match=r"data.phase1: all blend weights are zero"):
        PretrainStage(DataConfig(phase1=[BlendEntry("synthetic:copy", 0.0)]), st)
    with pytest.raises(DataError, match=r"data.phase1\[0\].path: data file '/nonexistent/x.txt' does not exist"):
        PretrainStage(DataConfig(phase1=[BlendEntry("text:/nonexistent/x.txt", 1.0)]), st)
    with pytest.raises(DataError, match="unknown synthetic source 'poetry'"):
        PretrainStage(DataConfig(phase1=[BlendEntry("synthetic:poetry", 1.0)]), st)
    with pytest.raises(DataError, match="phase2 .*is empty"):
        PretrainStage(DataConfig(phase1=[BlendEntry("synthetic:copy", 1.0)], phase2_start=0.5), st)


def test_text_file_source_and_document_boundaries(tmp_path, tiny_cfg):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first document.\n\nsecond one here\n\n" * 20)
    stage = PretrainStage(DataConfig(phase1=[BlendEntry(f"text:{corpus}", 1.0)], seq_len=40),
                          StageConfig(steps=2, global_batch=2, micro_batch=2))
    batch = stage.batches_for_step(0)[0]
    ids, seq_idx = batch["input_ids"], batch["seq_idx"]
    eod = ids == 2
    # seq_idx increments right after each EOD and an EOD belongs to the document it ends
    for row in range(2):
        for t in range(1, 40):
            assert seq_idx[row, t] - seq_idx[row, t - 1] == int(eod[row, t - 1])
    torch.testing.assert_close(batch["labels"][:, :-1], ids[:, 1:])
    run(tiny_cfg(f"data.phase1=[{{path: 'text:{corpus}', weight: 1.0}}]", "data.phase2=[]", "data.phase2_start=1.0",
                 run_dir=tmp_path / "r"))


def test_preemption_checkpoints_and_exits(tiny_cfg, tmp_path, monkeypatch):
    import tandem.trainer.run as run_module

    class SignalAtStep3(PretrainStage):
        def batches_for_step(self, step):
            if step == 3:
                signal.raise_signal(signal.SIGUSR1)
            return super().batches_for_step(step)

    monkeypatch.setitem(run_module.STAGES, "pretrain", SignalAtStep3)
    with pytest.raises(Preempted) as info:
        run(tiny_cfg("stage.steps=8", run_dir=tmp_path / "p"))
    assert info.value.code == PREEMPTED_EXIT_CODE
    assert (tmp_path / "p" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    monkeypatch.setitem(run_module.STAGES, "pretrain", PretrainStage)
    run(tiny_cfg("stage.steps=8", run_dir=tmp_path / "p"))
    run(tiny_cfg("stage.steps=8", run_dir=tmp_path / "q"))
    assert _losses(tmp_path / "p") == _losses(tmp_path / "q")


def test_new_stage_from_checkpoint_weights_and_released_layout(tiny_cfg, tmp_path):
    run(tiny_cfg("stage.steps=2", run_dir=tmp_path / "first"))
    run(tiny_cfg("stage.steps=2", f"model.init_from={tmp_path / 'first'}", run_dir=tmp_path / "second"))
    HybridLM(HybridConfig.preset("tiny"), init_seed=5).save_pretrained(tmp_path / "release")
    run(tiny_cfg("stage.steps=1", f"model.init_from={tmp_path / 'release'}", "optim.lr=0", "optim.min_lr=0", "optim.warmup_steps=0",
                 "optim.weight_decay=0", run_dir=tmp_path / "third"))
    # with lr 0 the weights written are the released ones
    a = HybridLM.from_pretrained(tmp_path / "release")
    b = HybridLM.from_pretrained(tmp_path / "third" / "checkpoints" / "step_00000001" / "model")
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_model_shape_from_the_checkpoint(tiny_cfg, tmp_path):
    """model.preset=init_from takes the architecture from the checkpoint's config.json."""
    odd = HybridConfig.preset("tiny", hidden_size=48, num_attention_heads=4, mamba_num_heads=6)
    HybridLM(odd, init_seed=3).save_pretrained(tmp_path / "release")
    run(tiny_cfg("stage.steps=1", "model.preset=init_from", f"model.init_from={tmp_path / 'release'}",
                 run_dir=tmp_path / "ft"))
    written = HybridLM.from_pretrained(tmp_path / "ft" / "checkpoints" / "step_00000001" / "model")
    assert written.config.hidden_size == 48 and written.config.mamba_num_heads == 6
    # from a tandem run directory too (its latest step's model/), with a field override on top
    run(tiny_cfg("stage.steps=1", "model.preset=init_from", f"model.init_from={tmp_path / 'ft'}",
                 "model.ssd_impl=torch", run_dir=tmp_path / "ft2"))
    with pytest.raises(Exception, match="needs model.init_from"):
        run(tiny_cfg("stage.steps=1", "model.preset=init_from", run_dir=tmp_path / "ft3"))


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_bad_input_exits_nonzero_without_touching_runs(tmp_path):
    run_dir = tmp_path / "existing"
    common = ["stage.steps=2", "stage.global_batch=4", "stage.micro_batch=2", "data.seq_len=16",
              "logger.progress_bar=false", f"run.dir={run_dir}"]
    ok = run_cli("-cn", "smoke", *common)
    assert ok.returncode == 0, ok.stderr
    before = _snapshot(run_dir)
    cases = [
        (["-cn", "no_such_recipe"], "no_such_recipe"),
        (["-cn", "smoke", *common, "optim.lrr=1"], "lrr"),
        (["-cn", "smoke", *common, "stage.steps=many"], "stage.steps"),
        (["-cn", "smoke", *common, "data.phase1=[{path: 'text:/no/such/file.txt', weight: 1.0}]"], "/no/such/file.txt"),
        (["-cn", "smoke", *common, "model.hidden_size=48"], "shape mismatch for 'backbone.embeddings.weight'"),
        (["-cn", "smoke", *common, "parallel.ep=2"], "parallel.ep=2"),
    ]
    for args, needle in cases:
        res = run_cli(*args)
        assert res.returncode != 0, args
        assert needle in res.stdout + res.stderr, (args, res.stdout[-500:], res.stderr[-2000:])
        assert "Traceback" not in res.stderr, (args, res.stderr[-2000:])
    assert _snapshot(run_dir) == before


def test_wandb_logger_offline(tiny_cfg, tmp_path, monkeypatch):
    """logger=wandb runs offline by default (no network) and keeps its run id across a resume."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run(tiny_cfg("logger=wandb", "logger.progress_bar=false", "stage.steps=2", run_dir=tmp_path / "w"))
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    state = json.loads((tmp_path / "w" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["extra"]["wandb_id"]


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_prints_the_command_that_resumes(tmp_path):
    """SIGINT (Ctrl-C) is a preemption: finish the step, checkpoint, exit 75, and say how to resume; that
    command continues the run to the same losses as an uninterrupted one."""
    import shlex
    import subprocess
    import sys
    import time

    from .conftest import REPO, TINY_RUN, run_cli

    steps = 16  # SIGINT lands after the third step is logged
    args = ["-cn", "smoke", *TINY_RUN, f"stage.steps={steps}", "stage.save_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "tandem.trainer.cli", *args, f"run.dir={tmp_path / 'p'}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "p" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err
    (line,) = [l for l in err.splitlines() if "resume with:" in l]
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:3] == [Path(sys.executable).name, "-m", "tandem.trainer.cli"] and command[-1] == "run.resume=auto"
    stopped = int((tmp_path / "p" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped < steps
    assert run_cli(*command[3:]).returncode == 0  # the printed command, as printed
    assert run_cli(*args, f"run.dir={tmp_path / 'q'}").returncode == 0
    assert len(_losses(tmp_path / "p")) == steps and _losses(tmp_path / "p") == _losses(tmp_path / "q")


def test_no_held_out_tokens_logs_no_val_loss(tiny_cfg, tmp_path, monkeypatch):
    """A stage without held-out data logs no val_loss (it used to log 0.0)."""
    import tandem.trainer.run as run_module

    class NoValidation(PretrainStage):
        def eval_batches(self):
            return iter(())

    monkeypatch.setitem(run_module.STAGES, "pretrain", NoValidation)
    record = run(tiny_cfg("stage.steps=4", "stage.eval_every=2", run_dir=tmp_path / "a"))
    metrics = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and not any("val_loss" in m for m in metrics) and "val_loss" not in record
    monkeypatch.setitem(run_module.STAGES, "pretrain", PretrainStage)
    run(tiny_cfg("stage.steps=4", "stage.eval_every=2", run_dir=tmp_path / "b"))
    assert "val_loss" in json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[1])
