"""``python -m slurm.cancel OUTPUT_DIR [--tasks GLOB ...]``: cancel the unfinished tasks of a run.

Slurm tasks are cancelled with ``scancel <job id>`` (array elements one by one); local tasks by
interrupting their submitit controller process (SIGINT, which stops the task). Each cancelled task
is marked ``cancelled`` in its ``task_state.json``; finished tasks and their metrics are never
touched. The command then waits (``--timeout``, default 60 s) until the jobs have stopped and
reports what happened: a task that finished during the kill grace period (its metrics.json
written) is reported and kept as done, not as cancelled. A cancelled task resumes from its
checkpoint when submitted again.

Example::

    python -m slurm.cancel runs/paper                       # everything still pending / running
    python -m slurm.cancel runs/paper --tasks 'mae/coco-*'  # only these task ids
"""
from __future__ import annotations

import argparse
import fnmatch
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from crossmae.utils import UserError, cli_entry

from crossmae.safeio import is_regular

from .status import _SLURM_PENDING, _SLURM_RUNNING, SlurmView, _slurm_state, _task_alive, collect
from .tasks import METRICS_JSON, STATE_JSON, own_process, read_json, write_state

#: what :func:`cancel` reports for a task that finished (metrics.json written) before the kill took effect
FINISHED = "done (finished before the cancel took effect)"
#: what :func:`cancel` reports (prefix) for a local task whose recorded process cannot be proved to be
#: the task's own (bad pid, other host, start time / command line differ): nothing is signalled
NOT_SIGNALLED = "not signalled"


def _ended(r) -> bool:
    """Whether the job / process of task row ``r`` has stopped (a Slurm job no longer pending,
    running or completing; a local task process no longer alive)."""
    if r.executor == "slurm" and r.job_id:
        return _slurm_state(r.job_id, SlurmView.query([r.job_id])) not in _SLURM_PENDING | _SLURM_RUNNING
    st = read_json(Path(r.dir) / STATE_JSON)
    if r.executor == "local" and st.get("host") == socket.gethostname():
        return not any(_task_alive(st, k) for k in ("pid", "ppid") if st.get(k))
    return True


def cancel(root: str | os.PathLike, patterns: list[str] | None = None, dry_run: bool = False,
           timeout_s: float = 60.0) -> dict[str, str]:
    """Cancel pending / running tasks of ``root`` whose id matches one of ``patterns`` (all when
    None), wait (at most ``timeout_s`` seconds) until their jobs have stopped, and report what
    really happened to each: a task can finish during Slurm's kill grace period (``KillWait``:
    submitit ignores the SIGTERM of ``scancel``), and then its metrics.json stands.

    Returns:
        task id → ``"cancelled"``; :data:`FINISHED` when metrics.json was written before the job
        stopped (``task_state.json`` says ``done`` again); ``"cancelling"`` when the job had not
        stopped after ``timeout_s``; ``"not signalled: <why>"`` (:data:`NOT_SIGNALLED`) for a local task
        whose recorded controller process is not provably its own (:func:`slurm.tasks.own_process`:
        positive pid, this host, recorded start time and command line match the live process): its
        state is left as it was and nothing is signalled; with ``dry_run`` the task's current state
        (nothing is done).

    Raises:
        UserError: ``root`` missing, ``timeout_s`` not a positive number, or ``scancel`` refused a
            job that is still alive.
    """
    if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise UserError(f"--timeout {timeout_s}: must be a positive number of seconds")
    rows = [r for r in collect(root) if r.state in ("pending", "running")
            and (not patterns or any(fnmatch.fnmatch(r.id, p) for p in patterns))]
    if dry_run:
        return {r.id: r.state for r in rows}
    refused: dict[str, str] = {}
    for r in rows:
        d = Path(r.dir)
        before = read_json(d / STATE_JSON).get("state")
        # mark first, so the task sees "cancelled" when the signal reaches it and keeps that state
        write_state(d, state="cancelled", cancelled_at=time.time())
        if r.executor == "slurm" and r.job_id:
            p = subprocess.run(["scancel", r.job_id], capture_output=True, text=True, timeout=30)
            if p.returncode != 0 and not _ended(r):
                write_state(d, state=before)
                raise UserError(f"scancel {r.job_id} ({r.id}) failed: {p.stderr.strip()[:200]}")
        elif r.executor in ("local", "debug"):
            st = read_json(d / STATE_JSON)
            # local: the submitit controller (the task's parent); debug: the task runs inside the
            # submitting process itself, whose parent is the user's shell: never signal that
            key = "ppid" if r.executor == "local" else "pid"
            pid, why = own_process(st, key)  # only a process provably the task's own is signalled
            if pid is None:
                if st.get(key) is not None or st.get("state") == "running":
                    write_state(d, state=before, cancelled_at=None)
                    refused[r.id] = f"{NOT_SIGNALLED}: {why}"
                continue
            try:
                os.kill(pid, signal.SIGINT)  # the submitit local controller
            except ProcessLookupError:
                pass
    rows = [r for r in rows if r.id not in refused]
    waiting, end = list(rows), time.monotonic() + timeout_s
    while waiting:
        waiting = [r for r in waiting if not _ended(r)]
        if not waiting or time.monotonic() > end:
            break
        time.sleep(0.5)
    out = dict(refused)
    for r in rows:
        d = Path(r.dir)
        if is_regular(d / METRICS_JSON):  # the task won the race: its result is complete (written atomically)
            write_state(d, state="done", cancelled_at=None)
            out[r.id] = FINISHED
        else:
            out[r.id] = "cancelling" if r in waiting else "cancelled"
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.cancel", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--tasks", nargs="+", default=None, metavar="GLOB", help="task ids to cancel (fnmatch)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the jobs to stop before reporting (default 60)")
    p.add_argument("--dry-run", action="store_true", help="list what would be cancelled")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, str]:
    """Cancel and print one line per outcome group; returns :func:`cancel`'s task id → outcome."""
    args = build_parser().parse_args(argv)
    res = cancel(args.output_dir, args.tasks, args.dry_run, timeout_s=args.timeout)
    if args.dry_run:
        print(f"would cancel {len(res)} task(s)" + "".join(f"\n  {i} ({s})" for i, s in res.items()))
        return res
    groups = {"cancelled": "cancelled", FINISHED: "finished before the cancel took effect (kept as done)",
              "cancelling": f"still stopping after {args.timeout:g} s (see python -m slurm.status)"}
    for i, v in res.items():
        if v.startswith(NOT_SIGNALLED):
            print(f"warning: {i}: {v}; nothing done", file=sys.stderr)
    ids = {k: [i for i, v in res.items() if v == k] for k in groups}
    print(f"cancelled {len(ids['cancelled'])} task(s)" + "".join(f"\n  {i}" for i in ids["cancelled"]))
    for k in (FINISHED, "cancelling"):
        if ids[k]:
            print(f"{len(ids[k])} task(s) {groups[k]}" + "".join(f"\n  {i}" for i in ids[k]))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
