"""Slurm's task environment → torch.distributed's ``env://`` variables (standard library only).

One task per rank, started by ``srun``. The mapping:

=================  ==============================================================================
``MASTER_ADDR``    first host of the step's node list (``SLURM_STEP_NODELIST``, else the job's
                   ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``); rank 0 runs there
``MASTER_PORT``    ``20000 + SLURM_JOB_ID % 10000``: stable across requeues of one job, different for
                   jobs sharing a node, below Linux's ephemeral range (32768+)
``RANK``           ``SLURM_PROCID``
``LOCAL_RANK``     ``SLURM_LOCALID``
``WORLD_SIZE``     ``SLURM_NTASKS`` (``SLURM_STEP_NUM_TASKS`` inside a step)
``LOCAL_WORLD_SIZE`` tasks on this node, from ``SLURM_STEP_TASKS_PER_NODE`` (e.g. ``8(x2),4``)
``NODE_RANK``      ``SLURM_NODEID``
=================  ==============================================================================

GPU binding: the trainer puts local rank *i* on ``cuda:i``. When Slurm manages GPUs it sets
``CUDA_VISIBLE_DEVICES`` to the node's allocated GPUs; :func:`gpu_binding` checks there is one per local
task and keeps exactly ``LOCAL_WORLD_SIZE`` of them, so task *i* gets the *i*-th allocated GPU and no two
tasks share one. Without a GPU allocation nothing is set (CPU runs, gloo). The GPU case is unit-tested as a
mapping only: it has not run on a GPU cluster yet (the test machines have none).

Node lists use Slurm's hostlist syntax: ``gpu[01-04,07],cpu5``, ``rack[1-2]-n[1-3]``. The launcher asks
``scontrol show hostnames`` when it exists and falls back to :func:`expand_hostlist`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Callable, Mapping

__all__ = [
    "SlurmEnvError", "expand_hostlist", "scontrol_hostnames", "master_port", "tasks_per_node",
    "gpu_binding", "torch_env",
]

MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 10000


class SlurmEnvError(ValueError):
    """The task's environment cannot be mapped; the message says what to fix."""


# --------------------------------------------------------------------------------------------------
# hostlists


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets: ``a[1,2],b`` → ``['a[1,2]', 'b']``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmEnvError(f"nested '[' in node list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"unmatched ']' in node list {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise SlurmEnvError(f"unmatched '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand_ranges(spec: str, whole: str) -> list[str]:
    """``01-03,07`` → ``['01', '02', '03', '07']`` (zero padding follows the lower bound's width)."""
    out = []
    for piece in spec.split(","):
        m = _RANGE.match(piece.strip())
        if not m:
            raise SlurmEnvError(f"bad range {piece!r} in node list {whole!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise SlurmEnvError(f"descending range {piece!r} in node list {whole!r}")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_one(item: str, whole: str) -> list[str]:
    """One comma-free host expression; several bracket groups give their cartesian product."""
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        if "[" in item or "]" in item:
            raise SlurmEnvError(f"unmatched bracket in node list {whole!r}")
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    return [head + n + rest for n in _expand_ranges(m.group(1), whole) for rest in _expand_one(tail, whole)]


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist expression in order: ``gpu[01-02],cpu5`` → ``['gpu01', 'gpu02', 'cpu5']``."""
    text = nodelist.strip()
    if not text:
        raise SlurmEnvError("empty node list")
    hosts = []
    for item in _split_top_level(text):
        item = item.strip()
        if not item:
            raise SlurmEnvError(f"empty entry in node list {nodelist!r}")
        hosts.extend(_expand_one(item, nodelist))
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames`` when scontrol is installed, else :func:`expand_hostlist`."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts
    return expand_hostlist(nodelist)


# --------------------------------------------------------------------------------------------------
# ranks, ports, GPUs


def master_port(job_id: int | str) -> int:
    """A rendezvous port from the job id: the same after a requeue, distinct for neighbouring jobs."""
    if not str(job_id).strip().isdigit():
        raise SlurmEnvError(f"SLURM_JOB_ID={job_id!r} is not a job number")
    jid = int(job_id)
    return MASTER_PORT_BASE + jid % MASTER_PORT_SPAN


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed per-node task counts: ``2(x3),1`` → ``[2, 2, 2, 1]``."""
    counts = []
    for piece in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", piece)
        if not m:
            raise SlurmEnvError(f"bad tasks-per-node value {spec!r} (expected e.g. '8(x2),4')")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _int_var(env: Mapping[str, str], *names: str) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise SlurmEnvError(f"{name}={value!r} is not an integer") from None
    raise SlurmEnvError(
        f"{' / '.join(names)} not set: run the launcher as a task of an srun step inside an allocation "
        f"(sbatch slurm/<recipe>.sbatch, or srun inside salloc)"
    )


def gpu_binding(env: Mapping[str, str], local_rank: int, local_world: int) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` for a task: the node's allocated GPUs, one per local task.

    Returns ``{}`` when Slurm allocated no GPU (the variable is unset, empty or ``NoDevFiles``).
    """
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible in ("", "NoDevFiles"):
        return {}
    gpus = [g.strip() for g in visible.split(",") if g.strip()]
    if len(gpus) < local_world:
        if len(gpus) == 1 and local_world > 1:
            hint = ("each task sees a single GPU (--gpus-per-task=1 / --gpu-bind=single); the trainer puts local "
                    "rank i on cuda:i, so allocate with --gpus-per-node=G --ntasks-per-node=G instead")
        else:
            hint = "ask for as many GPUs per node as tasks per node (--gpus-per-node=G --ntasks-per-node=G)"
        raise SlurmEnvError(
            f"{local_world} tasks on this node but CUDA_VISIBLE_DEVICES={visible!r} has {len(gpus)} GPU(s): {hint}"
        )
    if local_rank >= local_world:
        raise SlurmEnvError(f"SLURM_LOCALID={local_rank} but only {local_world} tasks on this node")
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus[:local_world])}


def torch_env(env: Mapping[str, str], hostnames: Callable[[str], list[str]] = expand_hostlist) -> dict[str, str]:
    """The torch.distributed variables (and GPU binding) for the task whose environment is ``env``."""
    rank = _int_var(env, "SLURM_PROCID")
    local_rank = _int_var(env, "SLURM_LOCALID")
    world = _int_var(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    node_rank = _int_var(env, "SLURM_NODEID")
    if not 0 <= rank < world:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is outside 0..{world - 1} (SLURM_NTASKS={world})")
    nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), None)
    if nodelist is None:
        raise SlurmEnvError("SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / SLURM_NODELIST not set: run under srun in an allocation")
    hosts = hostnames(nodelist)
    if not hosts:
        raise SlurmEnvError(f"node list {nodelist!r} names no host")
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise SlurmEnvError("SLURM_JOB_ID not set: run under srun in an allocation")
    port = env.get("TANDEM_MASTER_PORT") or str(master_port(job_id))

    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node_spec:
        counts = tasks_per_node(per_node_spec)
        if node_rank >= len(counts):
            raise SlurmEnvError(f"SLURM_NODEID={node_rank} but tasks-per-node {per_node_spec!r} lists {len(counts)} nodes")
        local_world = counts[node_rank]
    else:
        local_world = local_rank + 1  # at least this many; only used for the GPU check
    if not 0 <= local_rank < local_world:
        raise SlurmEnvError(f"SLURM_LOCALID={local_rank} but {local_world} tasks on node {node_rank} ({per_node_spec!r})")

    out = {
        "MASTER_ADDR": hosts[0], "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(local_world), "NODE_RANK": str(node_rank),
    }
    out.update(gpu_binding(env, local_rank, local_world))
    return out
