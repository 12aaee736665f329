"""``python -m slurm.status OUTPUT_DIR``: every task of an output folder with its state.

States: ``pending`` (queued, requeued, or waiting for a dependency), ``running``, ``done``
(``metrics.json`` exists), ``failed`` (with the first line of its error and the path of its log),
``cancelled``. Sources, in order: ``metrics.json``; the task's ``task_state.json`` (written by the
running task); for Slurm jobs ``sacct`` (one call for all jobs), which also catches jobs killed
without a Python error (time limit, out of memory, node failure, ``scancel``), and ``squeue`` (the
live controller: fresher than sacct, and how an array element cancelled before it started is told
apart from one still waiting, see :func:`_slurm_state`); for local jobs whether the recorded
process still lives.

Example::

    python -m slurm.status runs/smoke            # table
    python -m slurm.status runs/smoke --json     # machine-readable
    python -m slurm.status runs/smoke --state failed
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from crossmae.utils import UserError, cli_entry

from crossmae.safeio import is_regular, read_regular

from .tasks import METRICS_JSON, STATE_JSON, TASK_JSON, own_process, read_json

STATES = ("pending", "running", "done", "failed", "cancelled")
_SLURM_FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
_SLURM_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED"}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"}


@dataclass
class TaskStatus:
    """One task's state. ``active`` is True while a scheduler / process may still run it."""

    id: str
    dir: str
    state: str
    job_id: str | None = None
    executor: str | None = None
    error: str | None = None
    log: str | None = None
    attempts: int = 0
    active: bool = False
    scheduler_state: str | None = None


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """Job id → Slurm state (first word) for ``job_ids``, from the accounting database; ``{}`` when
    sacct is unavailable. A pending array keeps one record ``<id>_[1-2,4%1]`` for its unstarted
    elements."""
    if not job_ids:
        return {}
    try:
        p = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j",
                            ",".join(sorted({j.split("_")[0] for j in job_ids}))],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for ln in p.stdout.splitlines():
        parts = ln.split("|")
        if len(parts) >= 2 and parts[1]:
            out[parts[0]] = parts[1].split()[0]
    return out


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """Job id → state of every job (array elements one by one, ``-r``) the controller still holds,
    finished ones included (``-t all``: kept ``MinJobAge`` seconds); fresher than sacct, which lags
    by a second or more. None when the controller does not answer."""
    if not job_ids:
        return {}
    try:
        p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j",
                            ",".join(sorted({j.split("_")[0] for j in job_ids}))],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:  # "Invalid job id specified": the controller answered and holds none of them
        return {} if "invalid job id" in p.stderr.lower() else None
    out = {}
    for ln in p.stdout.splitlines():
        parts = ln.strip().split("|")
        if len(parts) == 2 and parts[1]:
            out[parts[0]] = parts[1]
    return out


@dataclass
class SlurmView:
    """What the scheduler says about a set of jobs: ``sacct`` (:func:`sacct_states`) and ``squeue``
    (:func:`squeue_states`, None when the controller did not answer)."""

    sacct: dict
    squeue: dict | None = None

    @classmethod
    def query(cls, job_ids: list[str]) -> "SlurmView":
        """Both sources for ``job_ids`` (one call each)."""
        return cls(sacct_states(job_ids), squeue_states(job_ids))

    def known(self, base: str) -> bool:
        """Whether either source holds any record of array / job ``base``."""
        return any(k == base or k.startswith(base + "_") for src in (self.sacct, self.squeue or {}) for k in src)


#: what :func:`_slurm_state` says of an array element that left the array without ever starting
#: (not a Slurm state; :func:`task_status` reports the task as cancelled)
REMOVED = "REMOVED"


def _slurm_state(job_id: str, states: "SlurmView | dict[str, str]") -> str | None:
    """The job's Slurm state, or None when neither source knows it (yet).

    An array element cancelled while pending (``scancel <id>_3``) leaves no record at all: Slurm
    removes it from the array's pending record (sacct shows ``<id>_[1-2,4%1]``) and never starts
    it. So an element that the live controller does not hold, that sacct has neither as its own
    record nor inside a pending range, while the array itself is known, was cancelled before it
    started (:data:`REMOVED`). Without a live controller that is not concluded (None).
    """
    view = states if isinstance(states, SlurmView) else SlurmView(states)
    for src in (view.squeue or {}, view.sacct):
        if job_id in src:
            return src[job_id]
    if "_" in job_id:  # array element not started yet: sacct shows "<id>_[0-5%2]"
        base, idx = job_id.split("_", 1)
        for k, v in view.sacct.items():
            if k.startswith(base + "_[") and _in_range(idx, k[len(base) + 2:-1]):
                return v
        if view.squeue is not None and view.known(base):
            return REMOVED
    return None


def _in_range(idx: str, spec: str) -> bool:
    spec = spec.split("%")[0]
    try:
        i = int(idx)
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            if int(lo) <= i <= int(hi or lo):
                return True
    except ValueError:
        return False
    return False


def _pid_alive(pid) -> bool:
    """Whether a process with this (positive integer) id exists; never probes ``-1`` / ``0``."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except PermissionError:
        return True
    except OSError:
        return False


def _task_alive(st: dict, key: str) -> bool:
    """Whether the task's recorded ``pid`` / ``ppid`` still runs: the identity recorded with it
    (:func:`slurm.tasks.own_process`) when there is one, else a live process with that id."""
    if isinstance(st.get("proc"), dict) and isinstance(st["proc"].get(key), dict):
        return own_process(st, key)[0] is not None
    return _pid_alive(st.get(key))


def _last_error_line(log: str | None, root: str | os.PathLike | None = None) -> str | None:
    if not isinstance(log, str) or not log or not Path(log).is_file():
        return None
    try:  # a regular file (inside root when given) only: never a FIFO, never a file linked from elsewhere
        text = read_regular(log, root).decode(errors="replace")
    except (OSError, UserError):
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "CANCELLED" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else None


def task_status(d: str | os.PathLike, sacct: "SlurmView | dict[str, str] | None" = None,
                tid: str | None = None, root: str | os.PathLike | None = None) -> TaskStatus:
    """The state of the task in folder ``d`` (see the module doc). ``sacct``: a prefetched
    :class:`SlurmView` (or a bare :func:`sacct_states` map); queried here when None and the task
    ran on Slurm. ``root``: the output folder; the task's log is read only when it lies inside it."""
    d = Path(d)
    task = read_json(d / TASK_JSON)
    st = read_json(d / STATE_JSON)
    tid = tid or task.get("spec", {}).get("id") or d.name
    tid = tid if isinstance(tid, str) else d.name
    job_id = st.get("job_id") or task.get("job_id")
    log = st.get("log") or task.get("stderr")
    ts = TaskStatus(id=tid, dir=str(d), state="pending", job_id=job_id, executor=task.get("executor"), log=log,
                    attempts=int(st.get("attempts", 0)))
    if is_regular(d / METRICS_JSON):  # a symlink or FIFO named metrics.json is no result
        ts.state = "done"
        return ts
    state = st.get("state")
    if state == "failed":
        ts.state, ts.error = "failed", st.get("error")
        return ts
    if state == "cancelled":
        ts.state = "cancelled"
        return ts
    if ts.executor == "slurm" and job_id:
        states = sacct if sacct is not None else SlurmView.query([job_id])
        sl = _slurm_state(job_id, states)
        if sl == REMOVED:  # it did start when the task says so: a record will show up; trust the task
            sl = None if state in ("running", "requeued") else "CANCELLED"
        ts.scheduler_state = sl
        if sl in _SLURM_PENDING:  # sacct lags the start by up to a second: trust a running task
            ts.state, ts.active = ("running" if state == "running" else "pending"), True
        elif sl in _SLURM_RUNNING:
            ts.state, ts.active = "running", True
        elif sl == "CANCELLED":
            ts.state = "cancelled"
        elif sl in _SLURM_FAILED:
            ts.state, ts.error = "failed", f"slurm state {sl}: {_last_error_line(log, root) or 'no log line'}"
        elif sl == "COMPLETED":
            ts.state, ts.error = "failed", "job completed without writing metrics.json"
        else:  # not in sacct (yet): trust the task's own state
            ts.state = "running" if state == "running" else "pending"
            ts.active = True
        return ts
    if ts.executor in ("local", "debug"):
        if state == "running":
            here = st.get("host") == socket.gethostname()
            if not here or _task_alive(st, "pid"):
                ts.state, ts.active = "running", True
            else:
                ts.state, ts.error = "failed", f"process {st.get('pid')} ended without metrics.json (killed?)"
        elif state == "requeued":
            ts.state, ts.active = "pending", True
        else:
            ppid = st.get("ppid")
            ts.active = bool(ppid and _task_alive(st, "ppid"))
    return ts


def find_tasks(root: str | os.PathLike) -> list[Path]:
    """Folders under ``root`` that hold a ``task.json`` or a ``task_state.json`` (sorted)."""
    root = Path(root)
    dirs = {p.parent for name in (TASK_JSON, STATE_JSON) for p in root.rglob(name)}
    return sorted(d for d in dirs if "jobs" not in d.relative_to(root).parts[:1])


def collect(root: str | os.PathLike) -> list[TaskStatus]:
    """Every task of an output folder with its state (one ``sacct`` call for the Slurm ones).

    Raises:
        UserError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: output folder does not exist")
    jobs, dirs = [], []
    for d in find_tasks(root):
        try:  # a task whose files are not the suite's own shape (or not regular files) is skipped
            t, st = read_json(d / TASK_JSON), read_json(d / STATE_JSON)
        except UserError as exc:
            print(f"warning: {' '.join(str(exc).split())}; task skipped", file=sys.stderr)
            continue
        dirs.append(d)
        if t.get("executor") == "slurm":
            jobs.append(st.get("job_id") or t.get("job_id"))
    states = SlurmView.query([j for j in jobs if j])
    return [task_status(d, states, tid=str(d.relative_to(root)), root=root) for d in dirs]


def format_table(rows: list[TaskStatus]) -> str:
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    w = max([len(r.id) for r in rows] + [4])
    lines = [f"{'task':{w}s}  {'state':9s}  {'job':12s}  detail"]
    for r in rows:
        detail = ""
        if r.state == "failed":
            detail = f"{r.error or 'failed'} | log: {r.log or '-'}"
        elif r.state in ("running", "pending") and r.log:
            detail = f"log: {r.log}" + (f" (attempt {r.attempts})" if r.attempts > 1 else "")
        lines.append(f"{r.id:{w}s}  {r.state:9s}  {(r.job_id or '-'):12s}  {detail}")
    lines.append("total: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) if rows else "no tasks")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.status", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--state", choices=STATES, default=None, help="only tasks in this state")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> list[TaskStatus]:
    args = build_parser().parse_args(argv)
    rows = collect(args.output_dir)
    if args.state:
        rows = [r for r in rows if r.state == args.state]
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else format_table(rows))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
