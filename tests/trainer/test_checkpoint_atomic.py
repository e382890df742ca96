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
