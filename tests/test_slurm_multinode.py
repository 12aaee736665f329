"""Real multi-node runs on the local Slurm (partition ``multi``: ``node1``, ``node2``; see
``slurm/local_cluster.py``), gloo on CPU, through ``slurm.submit``'s dispatch and submitit.

Every rank reports the (rank, local rank, node) Slurm gave it; a job on 2 nodes trains to exactly the
weights of the same job on 1 node with the same number of processes (same ranks, same seeds, same
all-reduce of two gloo processes: bit-equal), and writes the same metrics and prediction files. The
task modules draw their random streams per rank (``seed + rank``, as the MAE reference), so a
1-process run sees other masks / augmentations than a 2-process run at the same global batch; the
1-process equality is asserted for the rank-invariant ``slurm.selftest`` task (also on 2 nodes × 2
tasks and across an interruption). Marked ``slurm``: skipped with the reason when no cluster starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.suites import get_suite
from crossmae.utils import REPO_ROOT, safe_torch_load
from slurm import local_cluster, selftest
from slurm.cancel import cancel
from slurm.executor import ClusterOptions
from slurm.submit import dispatch, plan

pytestmark = pytest.mark.slurm
PART = local_cluster.MULTI_PARTITION
#: fields of metrics.json that legitimately differ between two layouts of the same job: the layout
#: itself, speed, and the checkpoint's hash (its ``args`` record the output folder)
VOLATILE = {"num_nodes", "devices_per_node", "host", "code_version", "images_per_s", "checkpoint_sha256"}


@pytest.fixture(scope="module")
def cluster():
    if not local_cluster.cluster_up(2):
        try:  # installs (apt-get) only where missing; (re)starts with the 2-node partition
            local_cluster.ensure(verbose=False, nodes=max(2, local_cluster.configured_nodes()))
        except (local_cluster.ClusterError, OSError, LookupError) as exc:
            pytest.skip(f"no local multi-node Slurm: {exc}")
    return True


@pytest.fixture
def out(cluster, tmp_path):
    d = tmp_path / "run"
    yield d
    if d.is_dir():
        cancel(d)


def _wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"gave up after {timeout} s waiting for {what}")


def _run(specs, out, timeout=300):
    """Submit to the ``multi`` partition, wait, return {spec id: [per-process results]}."""
    sub = dispatch(specs, out, "slurm", ClusterOptions(partition=PART), leaderboard=False, progress=None)
    res = {}
    for s in specs:
        job = sub.jobs[s.id]
        _wait(lambda: job.done(force_check=True), timeout, f"job {job.job_id}")
        try:
            res[s.id] = job.results()
        except Exception as exc:  # the task's own log says why
            log = Path(job.paths.stderr).read_text()[-3000:] if Path(job.paths.stderr).is_file() else ""
            raise AssertionError(f"{s.id} failed: {exc}\n{log}")
    return res


def _placement(results) -> list[tuple[int, int, str]]:
    return sorted((r["process"]["rank"], r["process"]["local_rank"], r["process"]["node"]) for r in results)


def _stable(m, root: Path):
    """``m`` without :data:`VOLATILE` / timing fields, paths under ``root`` made relative."""
    if isinstance(m, dict):
        return {k: _stable(v, root) for k, v in m.items()
                if k not in VOLATILE and "time" not in k and not k.endswith("_per_s")}
    if isinstance(m, list):
        return [_stable(v, root) for v in m]
    return m.replace(str(root), "<run>") if isinstance(m, str) else m


def _same_weights(a: Path, b: Path, key: str = "model") -> None:
    sa, sb = safe_torch_load(a)[key], safe_torch_load(b)[key]
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def _layouts(out, make):
    """The same task planned twice: 2 nodes x 1 process and 1 node x 2 processes."""
    two = make(out / "nodes2", {"nodes": "2", "tasks_per_node": "1", "cpus_per_task": "1"})
    one = make(out / "nodes1", {"nodes": "1", "tasks_per_node": "2", "cpus_per_task": "1"})
    return two, one


def test_pretraining_on_two_nodes_equals_one_node(out, data_root):
    def make(d, res):
        specs = plan(get_suite("smoke"), d, pretrains={"p": "smoke_crossmae"}, data_root=str(data_root),
                     pretrain_cfg_options=["epochs=1", "data_subset=16", "batch_size=4", "total_batch_size=8",
                                           "num_workers=0", "tensorboard=False", "verify_images=False"],
                     pretrain_resources=res)
        return [s for s in specs if s.kind == "pretrain"]
    two, one = _layouts(out, make)
    r2, r1 = _run(two, out / "nodes2")[two[0].id], _run(one, out / "nodes1")[one[0].id]
    assert _placement(r2) == [(0, 0, "node1"), (1, 0, "node2")]
    assert _placement(r1) in ([(0, 0, "node1"), (1, 1, "node1")], [(0, 0, "node2"), (1, 1, "node2")])
    m2, m1 = (json.loads((s[0].dir / "metrics.json").read_text()) for s in (two, one))
    assert (m2["world_size"], m2["num_nodes"], m2["devices_per_node"], m2["device_type"]) == (2, 2, 1, "cpu")
    assert (m1["world_size"], m1["num_nodes"], m1["devices_per_node"]) == (2, 1, 2)
    assert _stable(m2, two[0].dir) == _stable(m1, one[0].dir)
    _same_weights(Path(m2["checkpoint"]), Path(m1["checkpoint"]))
    losses = [[json.loads(x).get("loss") for x in (s[0].dir / "log.jsonl").read_text().splitlines()] for s in (two, one)]
    assert losses[0] == losses[1] and any(v is not None for v in losses[0])
