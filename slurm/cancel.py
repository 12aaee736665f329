"""``python -m slurm.cancel OUTPUT_DIR [--tasks GLOB ...]``: cancel the unfinished tasks of a run.

Slurm tasks are cancelled with ``scancel <job id>`` (array elements one by one); local tasks by
interrupting their submitit controller process (SIGINT, which stops the task). Each cancelled task
is marked ``cancelled`` in its ``task_state.json``; finished tasks and their metrics are never
touched. A cancelled task resumes from its checkpoint when submitted again.

Example::

    python -m slurm.cancel runs/paper                       # everything still pending / running
    python -m slurm.cancel runs/paper --tasks 'mae/coco-*'  # only these task ids
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from crossmae.utils import UserError, cli_entry

from .status import collect
from .tasks import STATE_JSON, read_json, write_state


def cancel(root: str | os.PathLike, patterns: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """Cancel pending / running tasks of ``root`` whose id matches one of ``patterns`` (all when
    None). Returns the ids cancelled.

    Raises:
        UserError: ``root`` missing, or ``scancel`` refused.
    """
    rows = [r for r in collect(root) if r.state in ("pending", "running")
            and (not patterns or any(fnmatch.fnmatch(r.id, p) for p in patterns))]
    done = []
    for r in rows:
        if dry_run:
            done.append(r.id)
            continue
        d = Path(r.dir)
        before = read_json(d / STATE_JSON).get("state")
        # mark first, so the task sees "cancelled" when the signal reaches it and keeps that state
        write_state(d, state="cancelled", cancelled_at=time.time())
        if r.executor == "slurm" and r.job_id:
            p = subprocess.run(["scancel", r.job_id], capture_output=True, text=True, timeout=30)
            if p.returncode != 0:
                write_state(d, state=before)
                raise UserError(f"scancel {r.job_id} ({r.id}) failed: {p.stderr.strip()[:200]}")
        elif r.executor in ("local", "debug"):
            st = read_json(d / STATE_JSON)
            if st.get("host") == socket.gethostname() and st.get("ppid"):
                try:
                    os.kill(int(st["ppid"]), signal.SIGINT)  # the submitit local controller
                except ProcessLookupError:
                    pass
        done.append(r.id)
    return done


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.cancel", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--tasks", nargs="+", default=None, metavar="GLOB", help="task ids to cancel (fnmatch)")
    p.add_argument("--dry-run", action="store_true", help="list what would be cancelled")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    ids = cancel(args.output_dir, args.tasks, args.dry_run)
    verb = "would cancel" if args.dry_run else "cancelled"
    print(f"{verb} {len(ids)} task(s)" + "".join(f"\n  {i}" for i in ids))
    return ids


if __name__ == "__main__":
    main()
    sys.exit(0)
