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
from pathlib import Path

import pytest
import torch

from benchmarks.suites import get_suite
from crossmae.utils import REPO_ROOT, safe_torch_load
from slurm import local_cluster, selftest
from slurm.executor import ClusterOptions
from slurm.submit import dispatch, plan
from _slurm import out, wait_until as _wait  # noqa: F401  (fixture)

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






def _run(*groups, out, timeout=300):
    """Submit each group of specs to the ``multi`` partition (all at once), wait for every job;
    return {output folder: [per-process results]}."""
    jobs = {}
    for i, specs in enumerate(groups):
        sub = dispatch(specs, out / f"g{i}", "slurm", ClusterOptions(partition=PART), leaderboard=False, progress=None)
        jobs.update({s.dir: sub.jobs[s.id] for s in specs})
    res = {}
    for d, job in jobs.items():
        _wait(lambda: job.done(force_check=True), timeout, f"job {job.job_id}")
        try:
            res[d] = job.results()
        except Exception as exc:  # the task's own log says why
            log = Path(job.paths.stderr).read_text()[-3000:] if Path(job.paths.stderr).is_file() else ""
            raise AssertionError(f"{d} failed: {exc}\n{log}")
    return res


def _placement(results) -> list[tuple[int, int, str]]:
    return sorted((r["process"]["rank"], r["process"]["local_rank"], r["process"]["node"]) for r in results)


def _stable(m, root: Path):
    """``m`` without :data:`VOLATILE` / timing fields (wall time, device-hours), paths under ``root`` made relative."""
    if isinstance(m, dict):
        return {k: _stable(v, root) for k, v in m.items()
                if k not in VOLATILE and "time" not in k and "hours" not in k and not k.endswith("_per_s")}
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


def _two_nodes_equal_one_node(out, two, one):
    """Run both layouts; check placement, the layout in metrics.json and equal metrics. Returns them."""
    res = _run(two, one, out=out)
    r2, r1 = res[two[0].dir], res[one[0].dir]
    assert _placement(r2) == [(0, 0, "node1"), (1, 0, "node2")]
    assert _placement(r1) in ([(0, 0, "node1"), (1, 1, "node1")], [(0, 0, "node2"), (1, 1, "node2")])
    m2, m1 = (json.loads((s[0].dir / "metrics.json").read_text()) for s in (two, one))
    assert (m2["world_size"], m2["num_nodes"], m2["devices_per_node"], m2["device_type"]) == (2, 2, 1, "cpu")
    assert (m1["world_size"], m1["num_nodes"], m1["devices_per_node"]) == (2, 1, 2)
    assert m2["launcher"] == m1["launcher"] == "slurm"
    assert _stable(m2, two[0].dir) == _stable(m1, one[0].dir)
    return m2, m1


def test_pretraining_on_two_nodes_equals_one_node(out, data_root):
    def make(d, res):
        specs = plan(get_suite("smoke"), d, pretrains={"p": "smoke_crossmae"}, data_root=str(data_root),
                     pretrain_cfg_options=["epochs=1", "data_subset=16", "batch_size=4", "total_batch_size=8",
                                           "num_workers=0", "tensorboard=False", "verify_images=False"],
                     pretrain_resources=res)
        return [s for s in specs if s.kind == "pretrain"]
    m2, m1 = _two_nodes_equal_one_node(out, *_layouts(out, make))
    _same_weights(Path(m2["checkpoint"]), Path(m1["checkpoint"]))
    two, one = (out / "nodes2" / "pretrain" / "p", out / "nodes1" / "pretrain" / "p")
    losses = [[json.loads(x).get("loss") for x in (d / "log.jsonl").read_text().splitlines()] for d in (two, one)]
    assert losses[0] == losses[1] and any(v is not None for v in losses[0])


def test_finetuning_on_two_nodes_equals_one_node(out, data_root, tiny_mae_official):
    def make(d, res):
        return plan(get_suite("smoke"), d, backbones={"mae": str(tiny_mae_official)}, tasks=["finetune"],
                    data_root=str(data_root), resources=res, cfg_options=["epochs=1", "warmup_epochs=0"])
    two, one = _layouts(out, make)
    m2, m1 = _two_nodes_equal_one_node(out, two, one)
    _same_weights(two[0].dir / "checkpoint-latest.pth", one[0].dir / "checkpoint-latest.pth")
    assert m2["predictions"] and (two[0].dir / m2["predictions"]).read_bytes() == \
        (one[0].dir / m1["predictions"]).read_bytes()


COCO_OPTS = ["model.img_size=128", "data.image_size=128", "data.test_short_edge=128", "data.test_max_size=128",
             "train.checkpoint_period=1", "train.eval_period=0", "train.log_period=1",
             "model.roi_heads.score_thresh=0.0", "model.roi_heads.detections_per_img=20",
             "train.max_iter=1", "train.total_batch_size=2", "train.batch_size=1"]


def test_coco_on_two_nodes_equals_one_node(out, data_root, tiny_mae_official):
    def make(d, res):
        return plan(get_suite("smoke"), d, backbones={"mae": str(tiny_mae_official)}, tasks=["coco"],
                    data_root=str(data_root), resources=res, cfg_options=COCO_OPTS)
    two, one = _layouts(out, make)
    m2, m1 = _two_nodes_equal_one_node(out, two, one)
    _same_weights(two[0].dir / "checkpoint-latest.pth", one[0].dir / "checkpoint-latest.pth")
    assert m2["predictions"] and (two[0].dir / m2["predictions"]).read_bytes() == \
        (one[0].dir / m1["predictions"]).read_bytes()


SELFTEST = get_suite("selftest")


def _reference(tmp_path: Path, cfg: list[str]) -> tuple[dict, Path]:
    """The selftest task as ONE process, uninterrupted (in-process): metrics and its folder."""
    d = tmp_path / "ref-1proc"
    m = selftest.main(["--output-dir", str(d), "--backbone", __file__, "--seed", "0", "--cfg-options", *cfg])
    return m, d


def test_two_nodes_by_two_tasks_report_their_slurm_placement_and_equal_one_process(out, tmp_path):
    """Through the command line: ``slurm.submit --resources nodes=2 tasks_per_node=2``."""
    import submitit
    from slurm.submit import main as submit_main
    cfg = ["steps=4", "batch=8"]
    ids = submit_main(["--suite", "selftest", "--backbone", f"a={__file__}", "--output-dir", str(out),
                       "--executor", "slurm", "--partition", PART, "--no-leaderboard", "--cfg-options", *cfg,
                       "--resources", "nodes=2", "tasks_per_node=2", "cpus_per_task=1"])["jobs"]
    (tid, jid), = ids.items()
    d = out / tid
    spec = json.loads((d / "task.json").read_text())
    assert spec["spec"]["resources"]["nodes"] == 2 and spec["spec"]["resources"]["tasks_per_node"] == 2
    job = submitit.SlurmJob(folder=Path(spec["job_folder"]) / "%j", job_id=jid, tasks=range(4))
    _wait(lambda: job.done(force_check=True), 300, f"job {jid}")
    res = job.results()
    assert _placement(res) == [(0, 0, "node1"), (1, 1, "node1"), (2, 0, "node2"), (3, 1, "node2")]
    assert sorted(r["process"]["node_rank"] for r in res) == [0, 0, 1, 1]
    m = json.loads((d / "metrics.json").read_text())
    assert (m["world_size"], m["num_nodes"], m["devices_per_node"], m["launcher"]) == (4, 2, 2, "slurm")
    ref, ref_dir = _reference(tmp_path, cfg)
    # same global batch, 4 chunk gradients summed by the all-reduce instead of one sum: the float64
    # reduction order differs, so equal within 1e-12 relative (differences seen: ~4e-16)
    assert m["metrics"] == pytest.approx(ref["metrics"], rel=1e-12, abs=0)
    w, w_ref = (safe_torch_load(x / "checkpoint-latest.pth")["model"]["w"] for x in (d, ref_dir))
    assert torch.allclose(w, w_ref, rtol=1e-12, atol=0) and not torch.equal(w, torch.zeros_like(w))


def test_interrupted_two_node_job_requeues_and_resumes_to_the_same_weights(out, tmp_path):
    cfg = ["steps=14", "step_seconds=0.4"]
    specs = plan(SELFTEST, out, backbones={"a": __file__}, cfg_options=cfg,
                 resources={"nodes": "2", "tasks_per_node": "1", "cpus_per_task": "1", "timeout_min": "30"})
    sub = dispatch(specs, out, "slurm", ClusterOptions(partition=PART), leaderboard=False, progress=None)
    job, d = sub.jobs[specs[0].id], specs[0].dir

    def steps():
        try:
            return int(torch.load(d / "checkpoint-latest.pth", weights_only=False)["epoch"])
        except Exception:
            return 0
    _wait(lambda: steps() >= 3, 120, "3 checkpointed steps")
    job._interrupt()  # SIGUSR2 as on preemption: checkpoint() -> requeue -> resume on 2 nodes again
    _wait(lambda: job.done(force_check=True), 240, f"job {job.job_id}")
    res = job.results()
    assert _placement(res) == [(0, 0, "node1"), (1, 0, "node2")]
    ref, ref_dir = _reference(tmp_path, cfg)
    # 2 chunk gradients all-reduced vs one sum (float64): equal within 1e-12 relative
    assert res[0]["metrics"] == pytest.approx(ref["metrics"], rel=1e-12, abs=0)
    w, w_ref = (safe_torch_load(x / "checkpoint-latest.pth")["model"]["w"] for x in (d, ref_dir))
    assert torch.allclose(w, w_ref, rtol=1e-12, atol=0)
    starts = [ln for ln in (d / "log.txt").read_text().splitlines() if "start_step=" in ln]
    assert len(starts) == 2 and "start_step=0 " in starts[0] and "world_size=2" in starts[1]
    assert int(starts[1].split("start_step=")[1].split()[0]) >= 3
    assert json.loads((d / "task_state.json").read_text())["attempts"] == 2


def test_a_node_that_cannot_reach_the_master_exits_2_with_one_line(cluster, tmp_path):
    """Node 0 (the master) never starts its process: the process on node 1 gives up after the
    timeout with one line naming the master's address (node1's NodeAddr) and port, exit status 2."""
    script = (f"if [ \"$SLURM_NODEID\" = 0 ]; then exit 0; fi; exec {sys.executable} -m slurm.selftest "
              f"--output-dir {tmp_path}/o --cfg-options steps=1")
    env = dict(os.environ, CROSSMAE_DIST_TIMEOUT="4", PYTHONPATH=str(REPO_ROOT))
    env.pop("MASTER_ADDR", None), env.pop("MASTER_PORT", None)
    p = subprocess.run(["srun", "-p", PART, "-N2", "-n2", "-l", "--kill-on-bad-exit=0", "bash", "-c", script],
                       env=env, capture_output=True, text=True, timeout=180)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("1: ")]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, p.stdout + p.stderr
    assert errors[0].startswith("1: error: cannot reach the distributed master 127.0.0.1:2") and \
        "within 4 s (rank 1 of 2 on node 1" in errors[0], errors[0]
    assert "Traceback" not in p.stdout + p.stderr
    assert "node2: task 1: Exited with exit code 2" in p.stderr and p.returncode == 2
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_the_local_cluster_is_a_real_two_node_partition(cluster, capsys):
    """``srun -N2 -n2`` on ``multi``: two tasks on node1 / node2 with Slurm's own ids; the node names
    do not resolve as host names here, so the master address comes from Slurm's NodeAddr; a second
    ``ensure`` of the same layout starts nothing."""
    from crossmae.distributed import resolve_master
    p = subprocess.run(["srun", "-p", PART, "-N2", "-n2", "-l", "bash", "-c",
                        "echo $SLURM_PROCID $SLURM_NODEID $SLURM_LOCALID $SLURMD_NODENAME $SLURM_JOB_NODELIST"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = sorted(ln.split(": ", 1)[1] for ln in p.stdout.splitlines())
    assert rows == ["0 0 0 node1 node[1-2]", "1 1 0 node2 node[1-2]"]
    assert resolve_master("node1") == "127.0.0.1"
    capsys.readouterr()
    local_cluster.ensure(verbose=True, nodes=max(2, local_cluster.configured_nodes()))
    assert "(already running)" in capsys.readouterr().out
