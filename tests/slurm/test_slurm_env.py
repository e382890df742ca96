"""Slurm environment → torch.distributed environment (pure Python, no Slurm needed)."""

import subprocess

import pytest

from . import cluster
from .cluster import SlurmUnavailable, ensure_installed
from .conftest import slurm_env

expand = slurm_env.expand_hostlist


@pytest.mark.parametrize("nodelist, hosts", [
    ("node7", ["node7"]),
    ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"]),
    ("gpu[01-04,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu5"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),            # no padding: widths grow
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),   # padding kept, then outgrown
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("dgx-[3,1]a,login", ["dgx-3a", "dgx-1a", "login"]),  # order as written, suffix kept
    ("h100-[1-2].cluster", ["h100-1.cluster", "h100-2.cluster"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "gpu[01-04", "gpu01-04]", "gpu[a-b]", "gpu[4-1]", "a,,b", "x[[1]]", "gpu[]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(slurm_env.SlurmEnvError):
        expand(bad)


@pytest.mark.parametrize("nodelist", ["gpu[01-04,07],cpu5", "rack[1-2]-n[098-101]", "a,b[1-3]"])
def test_expand_hostlist_agrees_with_scontrol(nodelist, tmp_path):
    try:
        ensure_installed()  # as root: installs Slurm when missing
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    # `scontrol show hostnames` expands locally, without a controller, but wants a readable slurm.conf
    (tmp_path / "slurm.conf").write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "SLURM_CONF": str(tmp_path / "slurm.conf")})
    assert out.returncode == 0, out.stderr
    assert expand(nodelist) == out.stdout.split()


@pytest.mark.parametrize("spec, counts", [("8", [8]), ("8(x2),4", [8, 8, 4]), ("2(x3),1", [2, 2, 2, 1]), ("1,2,3", [1, 2, 3])])
def test_tasks_per_node(spec, counts):
    assert slurm_env.tasks_per_node(spec) == counts


def test_master_port_is_stable_per_job_and_in_range():
    assert slurm_env.master_port("4242") == slurm_env.master_port(4242) == 24242
    ports = {slurm_env.master_port(j) for j in range(1_000_000, 1_000_050)}
    assert len(ports) == 50 and all(20000 <= p < 30000 for p in ports)
    with pytest.raises(slurm_env.SlurmEnvError, match="SLURM_JOB_ID"):
        slurm_env.master_port("12_3")


def _task(procid, localid, nodeid, ntasks=32, nodelist="gpu[01-04]", per_node="8(x4)", **extra):
    return {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
            "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": per_node,
            "SLURM_JOB_ID": "987654", **extra}


def test_four_nodes_eight_gpus_each():
    gpus = "0,1,2,3,4,5,6,7"
    seen = set()
    for node in range(4):
        for local in range(8):
            rank = node * 8 + local
            env = slurm_env.torch_env(_task(rank, local, node, CUDA_VISIBLE_DEVICES=gpus))
            assert env == {
                "MASTER_ADDR": "gpu01", "MASTER_PORT": "27654", "RANK": str(rank), "LOCAL_RANK": str(local),
                "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": str(node), "CUDA_VISIBLE_DEVICES": gpus,
            }
            seen.add((node, env["CUDA_VISIBLE_DEVICES"].split(",")[local]))
    assert len(seen) == 32  # one GPU per task, none shared


def test_mixed_nodelist_uneven_tasks_and_step_vars_win():
    env = _task(9, 1, 2, ntasks=10, nodelist="gpu[01-02,07],cpu5", per_node="4(x2),2", SLURM_STEP_NUM_TASKS="10",
                SLURM_JOB_NODELIST="other[1-9]", SLURM_TASKS_PER_NODE="9")
    out = slurm_env.torch_env(env)
    assert (out["MASTER_ADDR"], out["RANK"], out["LOCAL_RANK"], out["LOCAL_WORLD_SIZE"], out["WORLD_SIZE"]) == \
        ("gpu01", "9", "1", "2", "10")
    assert "CUDA_VISIBLE_DEVICES" not in out  # no GPU allocated: CPU run, nothing bound


def test_job_nodelist_fallback_and_hostname_resolver():
    env = _task(0, 0, 0, ntasks=1, per_node="1")
    del env["SLURM_STEP_NODELIST"]
    env["SLURM_NODELIST"] = "cn[5-6]"
    calls = []

    def resolver(nodelist):
        calls.append(nodelist)
        return ["cn5.fabric", "cn6.fabric"]

    assert slurm_env.torch_env(env, resolver)["MASTER_ADDR"] == "cn5.fabric"
    assert calls == ["cn[5-6]"]


def test_more_gpus_than_tasks_keeps_one_per_task():
    out = slurm_env.torch_env(_task(1, 1, 0, ntasks=2, nodelist="n1", per_node="2", CUDA_VISIBLE_DEVICES="4,5,6,7"))
    assert out["CUDA_VISIBLE_DEVICES"] == "4,5"


@pytest.mark.parametrize("gpus, match", [("0,1,2", "has 3 GPU"), ("3", "--gpus-per-task")])
def test_too_few_gpus_says_how_to_allocate(gpus, match):
    with pytest.raises(slurm_env.SlurmEnvError, match=match) as e:
        slurm_env.torch_env(_task(0, 0, 0, CUDA_VISIBLE_DEVICES=gpus))
    assert "--gpus-per-node" in str(e.value)


@pytest.mark.parametrize("drop", ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST"])
def test_missing_variable_says_run_under_srun(drop):
    env = _task(0, 0, 0)
    del env[drop]
    with pytest.raises(slurm_env.SlurmEnvError, match="srun"):
        slurm_env.torch_env(env)


def test_inconsistent_ranks_are_rejected():
    with pytest.raises(slurm_env.SlurmEnvError, match="outside"):
        slurm_env.torch_env(_task(32, 0, 3))
    with pytest.raises(slurm_env.SlurmEnvError, match="SLURM_LOCALID=8"):
        slurm_env.torch_env(_task(8, 8, 1))
    with pytest.raises(slurm_env.SlurmEnvError, match="SLURM_NODEID=4"):
        slurm_env.torch_env(_task(0, 0, 4))


def test_harness_skips_with_the_reason_when_not_root_and_slurm_missing(monkeypatch):
    monkeypatch.setattr(cluster, "missing_binaries", lambda: ["slurmctld", "munged"])
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(SlurmUnavailable, match="not root.*apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"):
        ensure_installed()
