"""One training task under ``srun``: map Slurm's environment to torch.distributed's, then become ``tandem``.

    srun python slurm/launch.py -cn <recipe> key=value ...

Sets ``MASTER_ADDR/PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (see ``slurm_env.py``), binds one GPU
per task when Slurm allocated GPUs, logs one line per rank to stderr, and ``exec``s
``<this python> -m tandem.trainer.cli <args>`` in place, so signals from Slurm (USR1/TERM for preemption) reach
the trainer directly and its exit status (0 done, 2 bad input, 75 preempted after a checkpoint) is the
task's exit status. Standard library only: no training logic here.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_env import SlurmEnvError, scontrol_hostnames, torch_env  # noqa: E402

BAD_LAUNCH_EXIT_CODE = 2  # same meaning as the trainer's: bad input, do not requeue


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("launch.py: usage: srun python slurm/launch.py -cn <recipe> [key=value ...]")
    try:
        mapped = torch_env(os.environ, scontrol_hostnames)
    except SlurmEnvError as e:
        print(f"launch.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(BAD_LAUNCH_EXIT_CODE)
    os.environ.update(mapped)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    gpu = ""
    if "CUDA_VISIBLE_DEVICES" in mapped:
        gpu = f" gpu {mapped['CUDA_VISIBLE_DEVICES'].split(',')[int(mapped['LOCAL_RANK'])]}"
    print(
        f"[launch] rank {mapped['RANK']}/{mapped['WORLD_SIZE']} local {mapped['LOCAL_RANK']}/{mapped['LOCAL_WORLD_SIZE']} "
        f"node {mapped['NODE_RANK']} on {socket.gethostname()}{gpu}; master {mapped['MASTER_ADDR']}:{mapped['MASTER_PORT']}",
        file=sys.stderr, flush=True,
    )
    cmd = [sys.executable, "-m", "tandem.trainer.cli", *argv]
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
