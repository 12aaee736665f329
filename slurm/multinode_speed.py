"""Wall time of the same small job on 1 node and on 2 nodes of a real Slurm cluster.

::

    python -m slurm.multinode_speed --output-dir /tmp/mns [--partition multi] [--repeats 2]

Runs a tiny CrossMAE pretraining (``smoke_crossmae``, one epoch of ``--images`` images, global batch
8, gloo on CPU) through ``slurm.submit``'s dispatch in three layouts: 1 node × 1 process, 1 node ×
2 processes and 2 nodes × 1 process, ``--repeats`` times each, and prints / writes to
``<output-dir>/multinode_speed.json`` per layout: the job's wall time from submission to the end
(scheduling, process start-up, process-group creation included) and the run's own ``wall_time_s``
(from metrics.json). The 2-process layouts train to identical weights (``tests/test_slurm_multinode.py``);
on the local test cluster both "nodes" share one host, so the figures measure the cost of the
multi-node code path (rendezvous through the first node's address, one process per node), not
network bandwidth.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.suites import get_suite
from crossmae.safeio import load_json
from crossmae.utils import atomic_write_json, cli_entry, resolve_data_root

from .executor import ClusterOptions, resolve_executor
from .submit import dispatch, plan

LAYOUTS = {"1 node x 1 process": ("1", "1"), "1 node x 2 processes": ("1", "2"), "2 nodes x 1 process": ("2", "1")}


def run_layout(out: Path, data_root: str, nodes: str, tasks: str, images: int, partition: str) -> dict:
    """One pretraining job in the layout; returns its submission-to-end time and ``wall_time_s``."""
    per_proc = 8 // int(nodes) // int(tasks)
    specs = [s for s in plan(get_suite("smoke"), out, pretrains={"p": "smoke_crossmae"}, data_root=data_root,
                             pretrain_cfg_options=["epochs=1", f"data_subset={images}", f"batch_size={per_proc}",
                                                   "total_batch_size=8", "num_workers=0", "tensorboard=False",
                                                   "verify_images=False"],
                             pretrain_resources={"nodes": nodes, "tasks_per_node": tasks, "cpus_per_task": "1"})
             if s.kind == "pretrain"]
    t0 = time.time()
    sub = dispatch(specs, out, "slurm", ClusterOptions(partition=partition), leaderboard=False, progress=None)
    job = sub.jobs[specs[0].id]
    while not job.done(force_check=True):
        time.sleep(0.2)
    job.results()
    total = time.time() - t0
    m = load_json(specs[0].dir / "metrics.json", "metrics", specs[0].dir)
    return {"job_s": total, "run_wall_time_s": float(m["wall_time_s"]), "world_size": m["world_size"],
            "num_nodes": m["num_nodes"], "loss": m["metrics"].get("loss")}


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m slurm.multinode_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--partition", default="multi")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    resolve_executor("slurm")
    out = Path(args.output_dir).resolve()
    data_root = str(resolve_data_root(args.data_root).resolve())
    res: dict = {}
    for r in range(args.repeats):
        for name, (nodes, tasks) in LAYOUTS.items():
            m = run_layout(out / f"r{r}-{nodes}x{tasks}", data_root, nodes, tasks, args.images, args.partition)
            res.setdefault(name, []).append(m)
            print(f"{name:22s} repeat {r}: job {m['job_s']:.1f} s (submit to end), run {m['run_wall_time_s']:.1f} s, "
                  f"loss {m['loss']:.6f}", flush=True)
    summary = {k: {"job_s_min": min(x["job_s"] for x in v), "run_wall_time_s_min": min(x["run_wall_time_s"] for x in v),
                   "runs": v} for k, v in res.items()}
    for k, v in summary.items():
        print(f"{k:22s} best: job {v['job_s_min']:.1f} s, run {v['run_wall_time_s_min']:.1f} s")
    atomic_write_json({"images": args.images, "global_batch": 8, "partition": args.partition, "layouts": summary},
                      out / "multinode_speed.json")
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
