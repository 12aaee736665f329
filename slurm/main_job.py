"""The main job (README command 1): pretrain a small MAE and a small CrossMAE on the real ImageNet
images, transfer both to every task of the ``smoke`` suite, and write the leaderboard::

    python -m slurm.main_job                       # data root ../shared/data, output output/main
    python -m slurm.main_job --data-root /data --output-dir runs/main

It is ``python -m slurm.submit --suite smoke --pretrain mae=smoke_mae --pretrain
crossmae=smoke_crossmae --watch knn --every 1 --executor local`` (the same dispatch code as on a
cluster: pretraining → transfer arrays → leaderboard; a watcher per pretraining probes each epoch's
snapshot with kNN while it trains, drawn in ``probe_curves.png`` and the leaderboard page), plus a
per-stage timing record (``main_job_timing.json``, printed) and a list of every artefact at the end.
Designed to finish in under 20 minutes on 2 CPU cores (two tasks at a time, one core each). Rerunning skips finished tasks and resumes unfinished ones;
``--force`` reruns everything (old folders kept as ``*.old-<time>``). ``main_job_timing.json`` holds
this invocation's stage times (seconds; a stage that ran nothing is 0) and the last ten earlier
ones under ``previous_runs``. Exit status 1 when a task failed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from crossmae.utils import REPO_ROOT, atomic_write_json, cli_entry, resolve_data_root
from crossmae.utils import check_writable

from benchmarks.suites import get_suite


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.main_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="datasets root (default $CROSSMAE_DATA_ROOT or ../shared/data)")
    p.add_argument("--output-dir", default=str(REPO_ROOT / "output" / "main"))
    p.add_argument("--executor", default="local", choices=["local", "debug", "slurm", "auto"],
                   help="local (default) runs here; slurm submits the same graph to a cluster")
    p.add_argument("--array-parallelism", type=int, default=2, help="tasks at a time (default 2 = 2 cores)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--tasks", nargs="+", default=None, help="only these smoke tasks (default: all)")
    p.add_argument("--mae-config", default="smoke_mae", help="pretraining preset of the MAE backbone")
    p.add_argument("--crossmae-config", default="smoke_crossmae", help="pretraining preset of the CrossMAE backbone")
    p.add_argument("--force", action="store_true", help="rerun finished tasks")
    p.add_argument("--watch", nargs="+", default=["knn"], metavar="PROBE",
                   help="probes run on each pretraining snapshot while it trains (default knn; 'none': no watcher)")
    p.add_argument("--every", type=int, default=1, help="probe every N-th epoch's snapshot (default 1)")
    return p


def _artefacts(out: Path, sub) -> list[str]:
    from slurm.tasks import read_json
    lines = [f"output folder          {out}"]
    for s in sub.specs:
        m = s.dir / "metrics.json"
        if s.kind == "pretrain":
            ck = read_json(m).get("checkpoint") if m.is_file() else None
            lines.append(f"{'pretrained ' + s.backbone_name:23s}{ck or '(not finished) ' + str(s.dir)}")
    for s in sub.specs:
        if s.kind != "pretrain":
            m = s.dir / "metrics.json"
            lines.append(f"{s.id:46s} {m if m.is_file() else '(failed) ' + str(s.dir / 'task_state.json')}")
    for name in ("leaderboard.csv", "leaderboard_paired.csv", "leaderboard.md", "leaderboard.png", "leaderboard.html",
                 "probe_curves.csv", "probe_curves.png", "main_job_timing.json"):
        lines.append(f"{name:23s}{out / name}")
    lines.append(f"job logs               {out / 'jobs'}")
    lines.append(f"task states            python -m slurm.status {out}")
    return lines


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Run the main job; returns ``{"stages": {stage: seconds}, "results": {task id: outcome}}``.

    Raises:
        UserError: a missing data root, unknown preset or task name, ``--array-parallelism`` < 1,
            a negative seed.
    """
    from slurm.executor import ClusterOptions, resolve_executor
    from slurm.submit import dispatch, plan

    args = build_parser().parse_args(argv)
    check_writable(args.output_dir, "--output-dir", folder=True)  # before any work
    opts = ClusterOptions(array_parallelism=args.array_parallelism, job_name="main")  # UserError when < 1
    t0 = time.time()
    data_root = str(resolve_data_root(args.data_root).resolve())
    out = Path(args.output_dir).resolve()
    kind = resolve_executor(args.executor)
    specs = plan(get_suite("smoke"), out, pretrains={"mae": args.mae_config, "crossmae": args.crossmae_config},
                 seeds=args.seeds, data_root=data_root, tasks=args.tasks,
                 watch=None if args.watch == ["none"] else args.watch, every=args.every)
    n_pre = sum(s.kind in ("pretrain", "watch") for s in specs)
    print(f"main job: {n_pre} pretrainings/watchers + {len(specs) - n_pre} transfer tasks on {kind} "
          f"({args.array_parallelism} at a time); data {data_root}; output {out}", flush=True)
    sub = dispatch(specs, out, kind, opts, force=args.force, wait=True,
                   progress=lambda msg: print(msg, flush=True))
    total = time.time() - t0
    stages = {"pretrain_s": round(sub.stage_times.get("pretrain", 0.0), 1),
              "transfer_s": round(sub.stage_times.get("transfer", 0.0), 1),
              "watch_s": round(sub.stage_times.get("watch", 0.0), 1),
              "leaderboard_s": round(sub.stage_times.get("leaderboard", 0.0), 1), "total_s": round(total, 1)}
    per_task = {}
    from slurm.tasks import read_json
    for s in sub.specs:
        m = read_json(s.dir / "metrics.json") if (s.dir / "metrics.json").is_file() else {}
        per_task[s.id] = {"outcome": sub.results.get(s.id, sub.skipped.get(s.id)),
                          "process_wall_s": round(sub.task_times[s.id], 1) if s.id in sub.task_times else None,
                          "task_wall_time_s": m.get("wall_time_s")}
    record = {"stages": stages, "executor": kind, "array_parallelism": args.array_parallelism,
              "data_root": data_root, "tasks": per_task, "finished_at": time.time()}
    old = read_json(out / "main_job_timing.json")  # earlier invocations (a rerun may skip everything)
    history = old.pop("previous_runs", []) + ([old] if old else [])
    record["previous_runs"] = history[-10:]
    atomic_write_json(record, out / "main_job_timing.json")
    print("\nstage wall times: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in stages.items()))
    print("\n".join(_artefacts(out, sub)))
    failed = [t for t, r in sub.results.items() if r != "done"]
    if failed:
        print(f"\n{len(failed)} task(s) failed: " + "; ".join(f"{t}: {sub.results[t]}" for t in failed),
              file=sys.stderr)
    return {"stages": stages, "results": sub.results, "failed": failed}


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res["failed"] else 0)
