"""The distributed layout derived from launcher environments (crossmae.distributed), without a cluster:
node-list expansion, partly-set environments, the device choice and the port derivation."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from crossmae.distributed import (DEFAULT_TIMEOUT_S, PORT_BASE, PORT_RANGE, Layout, layout_from_env, parse_nodelist,
                                  pick_device, port_from_job_id, resolve_master, timeout_from_env)
from crossmae.utils import REPO_ROOT, UserError


@pytest.mark.parametrize("expr, hosts", [
    ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
    ("gpu-[01-04]", ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]),      # leading zeros kept (submitit#4)
    ("a01,b02", ["a01", "b02"]),
    ("login", ["login"]),                                            # a name without digits
    ("linux[1,2]", ["linux1", "linux2"]),                            # never "linux[1" (Lightning#14896)
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[008-011]", ["gpu008", "gpu009", "gpu010", "gpu011"]),      # width kept across a carry
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x[9-10]-ib", ["x9-ib", "x10-ib"]),
    ("c1, c2", ["c1", "c2"]),
])
def test_parse_nodelist(expr, hosts):
    assert parse_nodelist(expr) == hosts


@pytest.mark.parametrize("expr, msg", [("node[1-2", "unbalanced"), ("node1-2]", "unbalanced"),
                                       ("n[3-1]", "backwards"), ("n[a-b]", "bad range"), ("", "empty"),
                                       ("n[]", "empty brackets")])
def test_parse_nodelist_refuses_malformed(expr, msg):
    with pytest.raises(UserError, match=msg):
        parse_nodelist(expr)


def test_nothing_set_is_one_process():
    lay = layout_from_env({})
    assert lay == Layout() and lay.launcher == "single" and lay.is_main and not lay.distributed
    assert (lay.master_addr, lay.master_port) == (None, None)


def test_torchrun_variables_only():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "host-a", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    lay = layout_from_env(env)
    assert (lay.rank, lay.world_size, lay.local_rank, lay.local_world_size, lay.node_rank, lay.num_nodes) == \
        (5, 8, 1, 4, 1, 2)
    assert (lay.master_addr, lay.master_port, lay.launcher) == ("host-a", 29500, "torchrun")
    assert not lay.is_main


def test_plain_env_variables_without_local_world_size():
    lay = layout_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (lay.rank, lay.world_size, lay.local_world_size, lay.num_nodes, lay.node_rank) == (1, 2, 2, 1, 0)
    assert (lay.master_addr, lay.master_port) == (None, None)


SLURM_2x2 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
             "SLURM_JOB_NODELIST": "gpu-[07-08]"}


def test_slurm_variables_only():
    lay = layout_from_env(SLURM_2x2)
    assert (lay.rank, lay.world_size, lay.local_rank, lay.local_world_size, lay.node_rank, lay.num_nodes) == \
        (3, 4, 1, 2, 1, 2)
    assert lay.launcher == "slurm"
    assert lay.master_addr == "gpu-07"                     # first node, zeros kept
    assert lay.master_port == port_from_job_id("4242") == PORT_BASE + 4242
    assert lay.as_metrics() == {"world_size": 4, "num_nodes": 2, "devices_per_node": 2,
                                "device_type": lay.device.type, "launcher": "slurm"}


def test_slurm_with_submitit_exported_variables():
    """``TorchDistributedEnvironment().export()`` adds RANK … MASTER_PORT: they agree, MASTER_* win."""
    env = dict(SLURM_2x2, RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="gpu-07", MASTER_PORT="31337")
    lay = layout_from_env(env)
    assert (lay.rank, lay.world_size, lay.local_rank, lay.node_rank, lay.launcher) == (3, 4, 1, 1, "slurm")
    assert (lay.master_addr, lay.master_port) == ("gpu-07", 31337)


def test_slurm_partly_set_and_uneven_tasks_per_node():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_NODEID": "1",
           "SLURM_TASKS_PER_NODE": "2,1", "SLURM_NODELIST": "linux[1,2]"}  # no job id, LOCALID, JOB_NUM_NODES
    lay = layout_from_env(env)
    assert (lay.rank, lay.local_rank, lay.local_world_size, lay.num_nodes, lay.master_addr, lay.master_port) == \
        (2, 0, 1, 2, "linux1", None)


def test_the_batch_script_itself_is_one_process_not_rank_0_of_the_job():
    """sbatch -N2 --ntasks-per-node=1: the batch script sees SLURM_PROCID=0 and SLURM_NTASKS=2 but no
    step; a command it runs directly must not wait for a second rank."""
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0", "SLURM_LOCALID": "0",
           "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2"}
    assert layout_from_env(env) == Layout()
    assert layout_from_env(dict(env, SLURM_STEP_ID="4294967291")) == Layout()  # the "batch" pseudo-step id
    lay = layout_from_env(dict(env, SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="node[1-2]"))
    assert (lay.launcher, lay.world_size, lay.num_nodes, lay.master_addr) == ("slurm", 2, 2, "node1")


def test_a_one_task_step_in_a_bigger_allocation_is_one_process():
    env = {"SLURM_STEP_ID": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1",
           "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_STEP_NODELIST": "gpu-03",
           "SLURM_JOB_NODELIST": "gpu-[01-02,03]", "SLURM_JOB_NUM_NODES": "3"}
    lay = layout_from_env(env)
    assert (lay.world_size, lay.num_nodes, lay.local_world_size, lay.master_addr, lay.distributed) == \
        (1, 1, 1, "gpu-03", False)


def test_torchrun_inside_an_srun_step_is_torchrun():
    env = dict(SLURM_2x2, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", GROUP_RANK="0",
               TORCHELASTIC_RUN_ID="r", MASTER_ADDR="h", MASTER_PORT="1234")
    lay = layout_from_env(env)
    assert (lay.launcher, lay.world_size, lay.rank) == ("torchrun", 2, 0)


@pytest.mark.parametrize("env, msg", [({"SLURM_STEP_ID": "0", "SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID"),
                                      ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_NTASKS": "2"},
                                       "outside world size"),
                                      ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"},
                                       "out of range")])
def test_bad_environment_is_one_line(env, msg):
    with pytest.raises(UserError, match=msg):
        layout_from_env(env)


def test_device_is_the_local_rank_never_the_global_rank():
    # rank 9 of 16 on node 1 of 8-GPU nodes: local rank 1
    lay = layout_from_env({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"})
    assert pick_device(lay.local_rank, True, 8) == torch.device("cuda", 1)
    assert pick_device(1, True, 1) == torch.device("cuda", 0)      # one GPU visible per task
    assert pick_device(5, False, 0) == torch.device("cpu")
    with pytest.raises(UserError, match="local rank 3: only 2 GPU"):
        pick_device(3, True, 2)
    if not torch.cuda.is_available():
        assert lay.device == torch.device("cpu")


def test_port_derivation_is_stable_and_unprivileged():
    ports = {port_from_job_id(j) for j in range(100, 5000, 7)}
    assert all(PORT_BASE <= p < PORT_BASE + PORT_RANGE for p in ports) and min(ports) >= 1024
    assert port_from_job_id("123") == port_from_job_id(123) != port_from_job_id(124)
    assert PORT_BASE <= port_from_job_id("123_4") < PORT_BASE + PORT_RANGE


def test_timeout_from_env():
    assert timeout_from_env(None, {}) == DEFAULT_TIMEOUT_S
    assert timeout_from_env(None, {"CROSSMAE_DIST_TIMEOUT": "7.5"}) == 7.5
    assert timeout_from_env(3, {"CROSSMAE_DIST_TIMEOUT": "7.5"}) == 3
    with pytest.raises(UserError, match="CROSSMAE_DIST_TIMEOUT"):
        timeout_from_env(None, {"CROSSMAE_DIST_TIMEOUT": "-1"})


def test_resolve_master_keeps_a_resolvable_name():
    assert resolve_master("localhost") == "localhost"
    assert resolve_master(socket.gethostname()) == socket.gethostname()


def test_unreachable_master_is_one_line_and_exit_2_within_the_timeout(tmp_path):
    """Rank 1 of 2 whose master never comes up: the one line names address and port, exit status 2."""
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), CROSSMAE_DIST_TIMEOUT="3", PYTHONPATH=str(REPO_ROOT))
    code = "from crossmae.utils import cli_entry, init_distributed; cli_entry(lambda: init_distributed())()"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith(f"error: cannot reach the distributed master 127.0.0.1:{port} "
                                               f"within 3 s (rank 1 of 2"), err


def test_barrier_with_a_missing_rank_is_one_line_and_exit_2(tmp_path):
    """Rank 1 joins the group but never reaches the barrier: rank 0 gives up after the barrier's
    timeout with one line (monitored_barrier on gloo), instead of waiting forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               CROSSMAE_DIST_TIMEOUT="60", PYTHONPATH=str(REPO_ROOT))
    code = ("import time, sys; from crossmae.utils import cli_entry, init_distributed; "
            "from crossmae.distributed import barrier\n"
            "def main():\n    r, w, _ = init_distributed()\n"
            "    if r == 1: time.sleep(40); sys.exit(0)\n    barrier(timeout_s=2)\n"
            "cli_entry(main)()")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].communicate()
    lines = err.strip().splitlines()
    assert procs[0].returncode == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: barrier timed out after 2 s (rank 0 of 2, master "
                                                   f"127.0.0.1:{port})"), lines
