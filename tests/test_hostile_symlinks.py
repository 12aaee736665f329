"""Planted symlinks in run, suite and cache folders: never followed for a write, never read through.

A careless or hostile neighbour on a shared file system plants a link where the suite writes
(``run.lock``, ``log.txt``, ``metrics.json``, ``tensorboard/``, the run folder itself) or where it reads back
results (``metrics.json``, ``task_state.json``, a task's log). Each case ends with one line naming the
link (or, for scanners, a one-line warning and the file skipped), and the link's target is untouched.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossmae.runs import RunDir, get_logger, close_logger, tb_writer
from crossmae.utils import UserError, atomic_write_json, atomic_write_text


def _victim(tmp_path: Path) -> Path:
    v = tmp_path / "elsewhere" / "precious.txt"
    v.parent.mkdir(parents=True, exist_ok=True)
    v.write_text("precious\n")
    return v


def _run(out: Path) -> RunDir:
    return RunDir(out, "unit", {"config": {"seed": 0}}, "seed = 0\n", main_process=True)


def test_run_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    victim, out = _victim(tmp_path), tmp_path / "run"
    out.mkdir()
    (out / "run.lock").symlink_to(victim)
    run = _run(out)
    with pytest.raises(UserError, match=r"run\.lock: is a symlink; refused"):
        run.start()
    assert victim.read_text() == "precious\n"
    assert not (out / "run.json").exists() and not (out / "config.py").exists()


def test_run_lock_that_is_a_folder_is_one_line(tmp_path):
    out = tmp_path / "run"
    (out / "run.lock").mkdir(parents=True)
    with pytest.raises(UserError, match=r"run\.lock: cannot open: is a folder"):
        _run(out).start()


def test_log_symlink_is_refused_and_nothing_appended(tmp_path):
    victim, out = _victim(tmp_path), tmp_path / "run"
    out.mkdir()
    (out / "log.txt").symlink_to(victim)
    with pytest.raises(UserError, match=r"log\.txt: is a symlink; refused"):
        log = get_logger(out, "unit")
        log.info("this line must not reach the victim")
        close_logger(log)
    assert victim.read_text() == "precious\n"


def test_log_in_a_real_folder_is_written(tmp_path):
    log = get_logger(tmp_path, "unit-ok")
    log.info("hello log")
    close_logger(log)
    assert "hello log" in (tmp_path / "log.txt").read_text()


def test_result_symlink_is_never_written_through(tmp_path):
    victim, out = _victim(tmp_path), tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").symlink_to(victim)
    with pytest.raises(UserError, match=r"metrics\.json: is a symlink; refused"):
        atomic_write_json({"task": "x"}, out / "metrics.json")
    assert victim.read_text() == "precious\n" and (out / "metrics.json").is_symlink()


def test_write_into_a_folder_that_is_a_symlink_is_refused(tmp_path):
    victim = _victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(UserError, match=r"tensorboard: folder is a symlink"):
        atomic_write_text("x", out / "tensorboard" / "events.txt")
    with pytest.raises(UserError, match=r"tensorboard: TensorBoard folder is a symlink"):
        tb_writer(out)
    assert sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


def test_output_dir_that_is_a_symlink_or_a_symlink_loop_is_one_line(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(UserError, match=r"link: --output-dir is a symlink; refused"):
        _run(tmp_path / "link")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(UserError, match=r"loop: --output-dir is a symlink; refused"):
        _run(tmp_path / "loop")
    with pytest.raises(UserError, match=r"loop/run: --output-dir: is a symlink \(or a symlink loop\)"):
        _run(tmp_path / "loop" / "run")


def test_output_dir_name_too_long_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"--output-dir: name too long"):
        _run(tmp_path / ("x" * 300))


def test_finished_metrics_linked_from_elsewhere_is_not_trusted(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "metrics.json").write_text(json.dumps({"task": "unit", "metrics": {}, "run_hash": "x"}))
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").symlink_to(elsewhere / "metrics.json")
    with pytest.raises(UserError, match=r"metrics\.json: output dir holds an unreadable metrics\.json \(is a symlink"):
        _run(out)


# --------------------------------------------------------------------------------------------------
# scanners: the leaderboard and slurm.status read only regular files inside the folder given
# --------------------------------------------------------------------------------------------------
def _metrics(task="linprobe", top1=70.0, seed=0) -> dict:
    return {"task": task, "protocol": "linprobe_mae", "metrics": {"top1": top1}, "backbone": "b.pth",
            "backbone_sha256": "ab" * 32, "seed": seed, "wall_time_s": 1.0, "num_gpus": 0}


def test_leaderboard_skips_a_metrics_link_leading_outside(tmp_path, capsys):
    from benchmarks.leaderboard import collect
    root, outside = tmp_path / "runs", tmp_path / "outside"
    (root / "b" / "t" / "seed0").mkdir(parents=True)
    (root / "b" / "t" / "seed0" / "metrics.json").write_text(json.dumps(_metrics(seed=0)))
    outside.mkdir()
    (outside / "metrics.json").write_text(json.dumps(_metrics(top1=99.0, seed=1)))
    (root / "b" / "t" / "seed1").mkdir()
    (root / "b" / "t" / "seed1" / "metrics.json").symlink_to(outside / "metrics.json")
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret:19000:0:99999:7:::\n")
    (root / "b" / "t" / "seed2").mkdir()
    (root / "b" / "t" / "seed2" / "metrics.json").symlink_to(secret)
    recs = collect(root)
    err = capsys.readouterr().err
    assert [r["seed"] for r in recs] == [0]
    assert "seed1/metrics.json: is a symlink; refused" in err and "seed2/metrics.json: is a symlink" in err
    assert "secret" not in err


def test_status_skips_state_linked_from_elsewhere_and_never_reads_an_outside_log(tmp_path, capsys):
    from slurm.status import collect
    root = tmp_path / "runs"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "task_state.json").write_text(json.dumps({"state": "failed", "error": "from elsewhere"}))
    a, b = root / "a", root / "b"
    a.mkdir(parents=True), b.mkdir()
    (a / "task.json").write_text(json.dumps({"spec": {"id": "a"}, "executor": "local"}))
    (a / "task_state.json").symlink_to(outside / "task_state.json")
    secret = outside / "secret.log"
    secret.write_text("Error: the secret line\n")
    (b / "task.json").write_text(json.dumps({"spec": {"id": "b"}, "executor": "slurm", "job_id": "999999"}))
    (b / "task_state.json").write_text(json.dumps({"state": "running", "log": str(secret), "job_id": "999999"}))
    rows = collect(root)
    err = capsys.readouterr().err
    assert [r.id for r in rows] == ["b"]
    assert "a/task_state.json: is a symlink; refused" in err
    from slurm.status import _last_error_line
    assert _last_error_line(str(secret), root) is None  # a log outside the output folder is not read
    assert all("secret" not in (r.error or "") for r in rows)


def test_suite_job_folder_that_is_a_symlink_is_refused(tmp_path, tiny_mae_official):
    from benchmarks.suites import get_suite
    from slurm.submit import dispatch, plan
    victim = _victim(tmp_path)
    out = tmp_path / "suite"
    out.mkdir()
    (out / "jobs").symlink_to(victim.parent, target_is_directory=True)
    specs = plan(get_suite("smoke"), out, backbones={"mae": str(tiny_mae_official)}, tasks=["linprobe"],
                 data_root=str(tmp_path))
    with pytest.raises(UserError, match=r"jobs: job folder is a symlink"):
        dispatch(specs, out, "local", leaderboard=False, progress=None)
    assert sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


def test_leaderboard_png_is_never_written_through_a_planted_temp_link(tmp_path):
    """The PNGs (leaderboard, probe curves, figures) are rendered in memory and written through
    crossmae.safeio: a link planted at the old fixed temporary name ``.leaderboard.png.tmp.png`` (or at
    the PNG itself) never gets the image written into its target."""
    from benchmarks.leaderboard import build
    root = tmp_path / "runs"
    (root / "b" / "t" / "seed0").mkdir(parents=True)
    (root / "b" / "t" / "seed0" / "metrics.json").write_text(json.dumps(_metrics(seed=0)))
    out = tmp_path / "board"
    out.mkdir()
    victim = _victim(tmp_path)
    (out / ".leaderboard.png.tmp.png").symlink_to(victim)
    paths = build(root, out / "leaderboard.csv", resamples=50)
    assert victim.read_text() == "precious\n"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not paths["png"].is_symlink()
    (out / "leaderboard.png").unlink()
    (out / "leaderboard.png").symlink_to(victim)
    with pytest.raises(UserError, match=r"leaderboard.png: .*symlink"):
        build(root, out / "leaderboard.csv", resamples=50)
    assert victim.read_text() == "precious\n"


def test_probe_curves_read_only_regular_files_inside_the_folder_given(tmp_path):
    """The probe curves (``benchmarks.curves.collect``, run by the leaderboard) read watcher states,
    snapshot lists and probe results as every scanner does (crossmae.safeio): a FIFO planted as a
    ``watch_state.json`` is skipped with a warning (never opened: nothing blocks), a ``snapshots.json``
    that is a link is not read, and a state naming a probe folder outside the folder given never gets
    that folder's metrics into the curves."""
    import os
    import signal
    from benchmarks import curves
    root = tmp_path / "runs"
    outside = tmp_path / "elsewhere" / "probe"
    outside.mkdir(parents=True)
    (outside / "metrics.json").write_text(json.dumps({"task": "linprobe", "metrics": {"top1": 99.0}}))
    (root / "a" / "watch").mkdir(parents=True)
    (root / "a" / "watch" / "watch_state.json").write_text(json.dumps({"entries": {"knn/ep0": {
        "epoch": 0, "probe": "knn", "state": "done", "attempts": [{"try": 0, "dir": str(outside)}]}}}))
    snaps = tmp_path / "elsewhere" / "snapshots.json"
    snaps.write_text(json.dumps({"snapshots": [{"step": 0, "file": "checkpoint-0.pth", "flops": 1.0}]}))
    (root / "a" / "snapshots.json").symlink_to(snaps)
    (root / "b" / "watch").mkdir(parents=True)
    os.mkfifo(root / "b" / "watch" / "watch_state.json")
    warnings: list[str] = []

    def stuck(*_):
        raise TimeoutError("collect blocked on a planted file")
    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    try:
        rows = curves.collect(root, resamples=10, warn=warnings.append)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not any(r["value"] == 99.0 for r in rows), rows
    assert any("probe/metrics.json: leads outside" in w for w in warnings), warnings
    assert any("b/watch/watch_state.json: is not a regular file" in w for w in warnings), warnings
    assert any("a/snapshots.json: is a symlink" in w for w in warnings), warnings
