"""A process killed (SIGKILL) at random moments while saving leaves ``latest`` at a complete checkpoint."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tandem.model import HybridConfig, HybridLM
from tandem.trainer.checkpoint.manager import CheckpointManager
from tandem.trainer.config import OptimConfig
from tandem.trainer.parallel.data_parallel import DataParallelEngine
from tandem.trainer.parallel.distributed import DistInfo
from tandem.trainer.optim import build_optimizer

from .conftest import REPO

SAVER = textwrap.dedent("""
    import sys, torch
    from tandem.model import HybridConfig, HybridLM
    from tandem.trainer.checkpoint.manager import CheckpointManager
    from tandem.trainer.config import OptimConfig
    from tandem.trainer.optim import build_optimizer
    from tandem.trainer.parallel.data_parallel import DataParallelEngine
    from tandem.trainer.parallel.distributed import DistInfo
    run_dir = sys.argv[1]
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    opt = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 512, (1, 8))).sum().backward(); opt.step()
    mgr = CheckpointManager(run_dir, keep_last=2)
    engine = DataParallelEngine(model, opt, DistInfo(0, 1, 0, torch.device("cpu")))
    latest = mgr.latest()
    step = int(latest.name.split("_")[1]) if latest else 0
    while True:
        step += 1
        with torch.no_grad():
            model.lm_head.weight.fill_(float(step))  # the step is readable from the weights
        mgr.save(step, engine, model.config, {"step": step})
        print(step, flush=True)
""")


@pytest.mark.slow
def test_sigkill_during_save_never_breaks_latest(tmp_path):
    rng = random.Random(0)
    run_dir = tmp_path / "run"
    last_good = 0
    for trial in range(10):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
        proc.stdout.readline()  # at least one checkpoint of this process completed
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        mgr = CheckpointManager(run_dir, keep_last=2)
        latest = mgr.latest()
        assert latest is not None
        step = int(latest.name.split("_")[1])
        assert step > last_good
        last_good = step
        model = HybridLM(HybridConfig.preset("tiny"), init_seed=1)
        opt = build_optimizer(model, OptimConfig())
        state, opt_state = mgr.load(latest, model)  # complete and loadable
        assert state["step"] == step and bool((model.lm_head.weight == step).all())
        DataParallelEngine(model, opt, DistInfo(0, 1, 0, torch.device("cpu"))).load_optimizer_state(opt_state, latest)
        assert len(opt.state_dict()["state"]) > 0
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert len(leftovers) <= 1  # at most the one save in progress at the last kill (pruned by the next save)


RESAVER = textwrap.dedent("""
    import os, shutil, sys, torch
    import tandem.trainer.checkpoint.manager as manager
    from tandem.model import HybridConfig, HybridLM
    from tandem.trainer.config import OptimConfig
    from tandem.trainer.optim import build_optimizer
    from tandem.trainer.parallel.data_parallel import DataParallelEngine
    from tandem.trainer.parallel.distributed import DistInfo
    run_dir, mode = sys.argv[1], sys.argv[2]
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    opt = build_optimizer(model, OptimConfig())
    engine = DataParallelEngine(model, opt, DistInfo(0, 1, 0, torch.device("cpu")))
    mgr = manager.CheckpointManager(run_dir, keep_last=3)
    with torch.no_grad():
        model.lm_head.weight.fill_(7.0 if mode == "replace" else 2.0)
    if mode == "resave":
        mgr.save(2, engine, model.config, {"step": 2})
    if mode == "replace":
        manager.exchange_paths = lambda a, b: False  # a file system without atomic exchange: two renames
    real_replace, real_rmtree = os.replace, shutil.rmtree
    def replace(src, dst):  # SIGKILL right after the old copy of step_00000002 is moved away
        real_replace(src, dst)
        if ".old-" in str(dst):
            os._exit(137)
    def rmtree(path, *a, **kw):  # SIGKILL right after step_00000002 is deleted
        if str(path).endswith("step_00000002"):
            real_rmtree(path, ignore_errors=True)
            os._exit(137)
        return real_rmtree(path, *a, **kw)
    os.replace = replace  # the module objects manager uses
    shutil.rmtree = rmtree
    mgr.save(2, engine, model.config, {"step": 2, "second": True})  # a re-save of the same step
    print("survived", flush=True)
""")


@pytest.mark.parametrize("mode", ["resave", "replace"])
def test_kill_while_a_step_is_saved_again_keeps_latest_loadable(tmp_path, mode):
    """Deterministic, not random timing: the process is killed at the one moment a re-save (same step,
    same process: preempted right after a periodic save) or a replacement (a step reached again after
    resuming from an earlier one) used to leave ``latest`` naming a deleted checkpoint."""
    run_dir = tmp_path / "run"
    if mode == "replace":  # history A wrote step 2 (weights 2.0), a later process writes step 2 again (7.0)
        res = subprocess.run([sys.executable, "-c", RESAVER, str(run_dir), "resave"], cwd=REPO, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert res.returncode == 0 and "survived" in res.stdout, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-c", RESAVER, str(run_dir), mode], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if mode == "resave":
        assert res.returncode == 0 and "survived" in res.stdout, res.stderr[-2000:]  # nothing was deleted
    else:
        assert res.returncode == 137, res.stderr[-2000:]  # killed between the two renames
    mgr = CheckpointManager(run_dir, keep_last=3)
    latest = mgr.latest()
    assert latest is not None and latest.name == "step_00000002"
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=1)
    state, _ = mgr.load(latest, model)
    # resave: the state is the re-saved one; replace: the kill came before the new copy landed, so the old
    # complete copy is back in place
    assert state.get("second") is True if mode == "resave" else state["step"] == 2
    assert bool((model.lm_head.weight == 2.0).all())


def test_replacing_a_step_swaps_in_the_new_copy(tmp_path):
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    opt = build_optimizer(model, OptimConfig())
    engine = DataParallelEngine(model, opt, DistInfo(0, 1, 0, torch.device("cpu")))
    CheckpointManager(tmp_path, keep_last=3).save(4, engine, model.config, {"step": 4, "history": "a"})
    with torch.no_grad():
        model.lm_head.weight.fill_(3.0)
    CheckpointManager(tmp_path, keep_last=3).save(4, engine, model.config, {"step": 4, "history": "b"})
    mgr = CheckpointManager(tmp_path, keep_last=3)
    fresh = HybridLM(HybridConfig.preset("tiny"), init_seed=1)
    state, _ = mgr.load(mgr.latest(), fresh)
    assert state["history"] == "b" and bool((fresh.lm_head.weight == 3.0).all())
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
