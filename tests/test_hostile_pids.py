"""``slurm.cancel`` signals only a process that is provably the task's own.

A ``task_state.json`` is a file anyone with write access to the runs folder can edit; its ``ppid``
is what ``slurm.cancel`` interrupts for a local task. Real processes here: a sleeper is spawned, its
identity (start time from ``/proc/<pid>/stat`` field 22, command line) recorded as a running task
records it, and cancel must refuse every mismatch (pid -1 / 0 / a string, another host, no recorded
identity, a recorded identity of another process) without signalling anything, and must interrupt
the real one.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm.cancel import cancel


def _sleeper() -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    time.sleep(0.2)
    return p


def _identity(pid: int) -> dict:
    """What slurm.tasks records: start ticks (field 22 of /proc/<pid>/stat) and the cmdline's sha256."""
    import hashlib
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2:].split()
    return {"pid": pid, "start_ticks": int(fields[19]),
            "cmdline_sha256": hashlib.sha256(Path(f"/proc/{pid}/cmdline").read_bytes()).hexdigest()}


def _task(root: Path, state: dict) -> Path:
    d = root / "bb" / "task-smoke" / "seed0"
    d.mkdir(parents=True)
    (d / "task.json").write_text(json.dumps({"spec": {"id": "bb/task-smoke/seed0"}, "executor": "local"}))
    (d / "task_state.json").write_text(json.dumps({"state": "running", "host": socket.gethostname(), **state}))
    return d


@pytest.fixture()
def sleeper():
    p = _sleeper()
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def _bad_states(pid: int) -> dict[str, dict]:
    ident = _identity(pid)
    other = dict(ident, start_ticks=ident["start_ticks"] - 1)       # pid reused by another process
    other_cmd = dict(ident, cmdline_sha256="0" * 64)               # same start, other command line
    return {
        "ppid -1": {"pid": pid, "ppid": -1, "proc": {"ppid": dict(ident, pid=-1)}},
        "ppid 0": {"pid": pid, "ppid": 0, "proc": {"ppid": dict(ident, pid=0)}},
        "ppid string": {"pid": pid, "ppid": str(pid), "proc": {"ppid": ident}},
        "other host": {"pid": pid, "ppid": pid, "proc": {"ppid": ident}, "host": "not-" + socket.gethostname()},
        "no identity": {"pid": pid, "ppid": pid},
        "start time differs": {"pid": pid, "ppid": pid, "proc": {"ppid": other}},
        "cmdline differs": {"pid": pid, "ppid": pid, "proc": {"ppid": other_cmd}},
    }


@pytest.mark.parametrize("case", list(_bad_states(1)))
def test_cancel_refuses_an_unproved_process_and_signals_nothing(tmp_path, sleeper, case, capsys):
    state = _bad_states(sleeper.pid)[case]
    d = _task(tmp_path, state)
    before = json.loads((d / "task_state.json").read_text())
    res = cancel(tmp_path, timeout_s=2)
    time.sleep(0.3)
    assert sleeper.poll() is None, "an unverified process was signalled"
    if case in ("ppid string",):  # not even a state file of the suite's shape: the task is skipped
        assert res == {} and "'ppid' is a string" in capsys.readouterr().err
        return
    assert list(res.values())[0].startswith("not signalled: ")
    after = json.loads((d / "task_state.json").read_text())
    assert after["state"] == before["state"] == "running"  # left as it was


def test_cancel_interrupts_the_task_s_own_process(tmp_path, sleeper):
    ident = _identity(sleeper.pid)
    d = _task(tmp_path, {"pid": sleeper.pid, "ppid": sleeper.pid, "proc": {"pid": ident, "ppid": ident}})
    res = cancel(tmp_path, timeout_s=20)
    assert res == {"bb/task-smoke/seed0": "cancelled"}
    assert sleeper.wait(timeout=10) != 0  # KeyboardInterrupt from the SIGINT
    assert json.loads((d / "task_state.json").read_text())["state"] == "cancelled"


def test_the_dispatcher_records_the_identity_it_is_checked_against(tmp_path):
    from slurm.tasks import own_process, process_identity
    import os
    ident = process_identity(os.getpid())
    assert ident == _identity(os.getpid())
    st = {"host": socket.gethostname(), "ppid": os.getpid(), "proc": {"ppid": ident}}
    assert own_process(st, "ppid") == (os.getpid(), "")
    assert process_identity(-1) is None and process_identity(True) is None
