"""Non-regular files (FIFOs) where the suite expects its own files: never opened for a read that can
block, never written into; one line (commands) or a warning and skip (scanners), at once.

A hang would stall the test forever on a broken build, so a watchdog opens the other end of each FIFO
after a few seconds (the blocked call then returns) and the test asserts it never had to.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from crossmae.runs import RunDir, close_logger, get_logger
from crossmae.utils import UserError

PATIENCE_S = 6.0


@contextlib.contextmanager
def watchdog(fifo: Path):
    """Yield a dict whose ``"fired"`` says whether the FIFO had to be unblocked from the other end."""
    state, stop = {"fired": False}, threading.Event()

    def run():
        if stop.wait(PATIENCE_S):
            return
        state["fired"] = True
        while not stop.is_set():
            for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
                try:
                    os.close(os.open(fifo, flags))
                except OSError:
                    pass
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield state
    finally:
        stop.set()
        t.join()


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def test_fifo_metrics_in_the_output_dir_is_one_line_not_a_hang(tmp_path):
    out = tmp_path / "run"
    fifo = _fifo(out / "metrics.json")
    with watchdog(fifo) as w, pytest.raises(UserError, match=r"metrics\.json: output dir holds an unreadable "
                                                               r"metrics\.json \(is not a regular file"):
        RunDir(out, "unit", {"config": {}}, "", main_process=True)
    assert not w["fired"]


def test_fifo_run_lock_is_one_line(tmp_path):
    out = tmp_path / "run"
    fifo = _fifo(out / "run.lock")
    with watchdog(fifo) as w, pytest.raises(UserError, match=r"run\.lock: is not a regular file; refused"):
        RunDir(out, "unit", {"config": {}}, "", main_process=True).start()
    assert not w["fired"] and not (out / "run.json").exists()


def test_fifo_log_is_one_line_not_a_hang(tmp_path):
    fifo = _fifo(tmp_path / "log.txt")
    with watchdog(fifo) as w, pytest.raises(UserError, match=r"log\.txt: cannot open: is not a regular file"):
        close_logger(get_logger(tmp_path, "fifo"))
    assert not w["fired"]


def test_leaderboard_skips_a_fifo_metrics_file(tmp_path, capsys):
    from benchmarks.leaderboard import main
    good = tmp_path / "runs" / "b" / "linprobe-smoke" / "seed0"
    good.mkdir(parents=True)
    (good / "metrics.json").write_text(json.dumps({"task": "linprobe", "protocol": "linprobe_mae",
                                                   "metrics": {"top1": 70.0}, "backbone_sha256": "ab" * 32,
                                                   "seed": 0}))
    fifo = _fifo(tmp_path / "runs" / "b" / "linprobe-smoke" / "seed1" / "metrics.json")
    with watchdog(fifo) as w:
        main([str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert not w["fired"]
    assert f"warning: {fifo}: is not a regular file" in err
    assert (tmp_path / "runs" / "leaderboard.csv").read_text().count("\n") == 2


@pytest.mark.parametrize("name", ["task.json", "task_state.json"])
def test_status_skips_a_task_with_a_fifo_state_file(tmp_path, capsys, name):
    from slurm.status import main
    d = tmp_path / "t"
    d.mkdir()
    other = "task_state.json" if name == "task.json" else "task.json"
    (d / other).write_text(json.dumps({"spec": {"id": "t"}, "executor": "local"} if other == "task.json"
                                      else {"state": "failed"}))
    fifo = _fifo(d / name)
    with watchdog(fifo) as w:
        rows = main([str(tmp_path)])
    assert not w["fired"] and rows == []
    assert f"warning: {fifo}: is not a regular file" in capsys.readouterr().err


def test_sha256_of_a_fifo_is_refused_not_waited_on(tmp_path):
    from crossmae.utils import sha256_file
    fifo = _fifo(tmp_path / "ckpt.pth")
    with watchdog(fifo) as w, pytest.raises(UserError, match="not a regular file"):
        sha256_file(fifo)
    assert not w["fired"]
