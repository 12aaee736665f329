"""``slurm.watch``: probes of each complete pretraining snapshot while it trains, at most once per
snapshot and probe, retried, resumable after SIGKILL; the curves (``benchmarks.curves``) with the
snapshots' compute. Real pretraining, real kNN probes in submitit local processes (and, marked
``slurm``, on the local Slurm cluster)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import curves
from crossmae import pretrain
from crossmae.checkpoint import read_snapshots
from crossmae.utils import REPO_ROOT
from slurm import watch
from slurm.status import collect as status_collect

PRE = ["data_subset=16", "batch_size=4", "total_batch_size=8", "num_workers=0", "verify_images=False",
       "warmup_epochs=1", "snapshot_period=1", "tensorboard=True"]


def _pretrain_argv(out: Path, data_root: Path, epochs: int, *opts: str) -> list[str]:
    return ["--config", "smoke_crossmae", "--data-root", str(data_root), "--output-dir", str(out),
            "--cfg-options", *PRE, f"epochs={epochs}", *opts]


def _watch_argv(pre: Path, tmp: Path, *extra: str) -> list[str]:
    return [str(pre), "--probe", "knn", "--executor", "local", "--poll", "0.3",
            "--cfg-options", f"fast.cache_dir={tmp / 'featcache'}", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _state(pre: Path) -> dict:
    return json.loads((pre / "watch" / "watch_state.json").read_text())


def _job_folders(pre: Path) -> list[Path]:
    jobs = pre / "watch" / "jobs"
    return sorted(p for p in jobs.iterdir() if p.is_dir() and p.name != "%j") if jobs.is_dir() else []


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root) -> Path:
    """A finished 2-epoch tiny CrossMAE pretraining with a snapshot per epoch (copied by each test)."""
    out = tmp_path_factory.mktemp("pre") / "crossmae"
    pretrain.main(_pretrain_argv(out, data_root, 2))
    assert [e["step"] for e in read_snapshots(out)] == [0, 1]
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "crossmae"
    shutil.copytree(finished, dst)
    return dst


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, user_error, finished):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "not a pretraining run" in user_error(watch.main, [str(plain), "--probe", "knn"])
    assert "not a folder" in user_error(watch.main, [str(tmp_path / "missing"), "--probe", "knn"])
    pre = _copy(finished, tmp_path)
    assert "--probe nope: unknown probe" in user_error(watch.main, [str(pre), "--probe", "nope"])
    assert "--every 0: must be an integer >= 1" in user_error(watch.main, [str(pre), "--probe", "knn", "--every", "0"])
    assert "--retries -1" in user_error(watch.main, [str(pre), "--probe", "knn", "--retries", "-1"])
    assert not (pre / "watch").exists() and list(plain.iterdir()) == []
    # the same checks through slurm.submit --watch, before anything is written
    from slurm.submit import main as submit_main
    for extra, msg in ((["--watch", "nope"], "--probe nope: unknown probe"),
                       (["--watch", "knn", "--every", "0"], "--every 0: must be an integer >= 1")):
        line = user_error(submit_main, ["--suite", "smoke", "--pretrain", "crossmae=smoke_crossmae", "--output-dir",
                                        str(tmp_path / "suite"), "--executor", "local", *extra])
        assert msg in line
    assert not (tmp_path / "suite").exists()


def test_watches_a_running_pretraining_once_per_snapshot_and_draws_the_curve(tmp_path, data_root):
    """A real pretraining writes its snapshots while the watcher runs: each complete snapshot gets
    exactly one kNN probe; a temporary file and an unlisted checkpoint are never probed; the curve
    file holds the probes' own metrics.json values and each snapshot's compute; TensorBoard gets
    the values at the snapshot's epoch."""
    pre = tmp_path / "runs" / "pretrain" / "crossmae"
    argv = _pretrain_argv(pre, data_root, 3, "data_subset=32")
    err = tmp_path / "pretrain.err"
    with err.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "crossmae.pretrain", *argv], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=fh)
    try:
        t0 = time.time()
        while not (pre / "run.json").is_file():
            assert proc.poll() is None and time.time() - t0 < 120, err.read_text()[-2000:]
            time.sleep(0.1)
        # what a reader must never take for a snapshot: a temp file being written, a file not listed
        (pre / ".checkpoint-7.pth.abcd.tmp").write_bytes(b"partial")
        (pre / "checkpoint-9.pth").write_bytes(b"not listed by the pretraining")
        started_before_end = not (pre / "metrics.json").exists()
        res = watch.main(_watch_argv(pre, tmp_path))
    finally:
        assert proc.wait(timeout=300) == 0, err.read_text()[-2000:]
    assert started_before_end
    assert res == {"done": 3, "failed": 0, "attempts": 3}
    st = _state(pre)
    # the first probe was submitted while the pretraining was still training
    assert min(a["at"] for e in st["entries"].values() for a in e["attempts"]) < (pre / "metrics.json").stat().st_mtime
    assert sorted(st["entries"]) == ["knn/ep0", "knn/ep1", "knn/ep2"]
    assert all(len(e["attempts"]) == 1 and e["state"] == "done" for e in st["entries"].values())
    assert sorted(p.name for p in (pre / "watch" / "knn").iterdir()) == ["ep0", "ep1", "ep2"]
    assert len(_job_folders(pre)) == 3  # one job per snapshot and probe, nothing else submitted
    snaps = {e["step"]: e for e in read_snapshots(pre)}
    for e in st["entries"].values():
        m = json.loads((Path(e["attempts"][0]["dir"]) / "metrics.json").read_text())
        assert m["backbone"] == str(pre / f"checkpoint-{e['epoch']}.pth") and m["protocol"] == "linprobe_knn"
    assert {r.state for r in status_collect(pre)} == {"done"}

    # the curves, through the leaderboard of the suite-like folder
    from benchmarks.leaderboard import build
    root = tmp_path / "runs"
    paths = build(root, resamples=200)
    assert (root / "leaderboard.csv").read_text().count("\n") == 1  # probe results are curves, not rows
    rows = list(csv.DictReader(paths["curves_csv"].open()))
    assert {r["epoch"] for r in rows} == {"0", "1", "2"} and {r["status"] for r in rows} == {"done"}
    prev = None
    for epoch in (0, 1, 2):
        e = st["entries"][f"knn/ep{epoch}"]
        own = json.loads((Path(e["attempts"][0]["dir"]) / "metrics.json").read_text())["metrics"]
        got = {r["metric"]: float(r["value"]) for r in rows if r["epoch"] == str(epoch)}
        assert got == pytest.approx(own, abs=0) and set(got) == set(own)
        r = next(r for r in rows if r["epoch"] == str(epoch) and r["metric"] == "top1")
        assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"])
        c = snaps[epoch]
        assert int(r["images_seen"]) == c["images_seen"] == 8 * 4 * (epoch + 1)
        assert float(r["flops"]) == c["images_seen"] * c["flops_per_image"]
        assert r["method"] == "crossmae" and r["device_type"] == "cpu"
        if prev:
            assert all(float(r[k]) > float(prev[k]) for k in ("images_seen", "flops", "wall_time_s", "device_hours"))
        prev = r
    assert paths["curves_png"].stat().st_size > 5000
    page = (root / "leaderboard.html").read_text()
    assert '<section id="probe-curves">' in page and "knn · top1 vs FLOPs" in page

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(pre / "tensorboard"))
    acc.Reload()
    top1 = {ev.step: ev.value for ev in acc.Scalars("probe/knn/top1")}
    assert top1 == pytest.approx({ep: float(next(r["value"] for r in rows if r["epoch"] == str(ep)
                                                 and r["metric"] == "top1")) for ep in (0, 1, 2)})


def test_failed_probe_is_retried_then_recorded_failed(tmp_path, finished):
    pre = _copy(finished, tmp_path)
    # a data root without the probe's dataset: every attempt fails with the task's own one-line error
    res = watch.main([*_watch_argv(pre, tmp_path, "--every", "2", "--retries", "2"), "--data-root", str(tmp_path)])
    assert res == {"done": 0, "failed": 1, "attempts": 3}
    e = _state(pre)["entries"]["knn/ep1"]  # --every 2: the 2nd epoch's snapshot (also the final one) only
    assert list(_state(pre)["entries"]) == ["knn/ep1"]
    assert e["state"] == "failed" and [a["try"] for a in e["attempts"]] == [0, 1, 2]
    rows = {r.id: r for r in status_collect(pre)}
    assert [rows[f"watch/knn/ep1/try{k}"].state for k in range(3)] == ["failed"] * 3
    assert "inat2019" in rows["watch/knn/ep1/try2"].error
    lines = list(csv.DictReader(curves.to_csv(curves.collect(pre.parent)).splitlines()))
    assert len(lines) == 1 and lines[0]["status"] == "failed" and lines[0]["attempts"] == "3"
    assert lines[0]["value"] == "" and "inat2019" in lines[0]["error"]


def test_sigkilled_watcher_resumes_without_submitting_twice(tmp_path, finished):
    pre = _copy(finished, tmp_path)
    cmd = [sys.executable, "-m", "slurm.watch", *_watch_argv(pre, tmp_path)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while True:  # killed once the first probe is submitted and recorded, while it runs
        st = (pre / "watch" / "watch_state.json")
        if st.is_file() and any(a["state"] == "submitted" for e in _state(pre)["entries"].values()
                                for a in e["attempts"]):
            break
        assert time.time() - t0 < 120 and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (pre / "watch" / "metrics.json").exists()
    # also as if it died between submitting and recording the submission: the attempt says "intent"
    state = _state(pre)
    first = next(a for e in state["entries"].values() for a in e["attempts"] if a["state"] == "submitted")
    job_id = first["job_id"]
    first["state"] = "intent"
    first.pop("job_id")
    (pre / "watch" / "watch_state.json").write_text(json.dumps(state))

    res = watch.main(_watch_argv(pre, tmp_path))
    assert res == {"done": 2, "failed": 0, "attempts": 2}
    st = _state(pre)
    assert all(len(e["attempts"]) == 1 for e in st["entries"].values())
    adopted = next(a for e in st["entries"].values() for a in e["attempts"] if a["dir"] == first["dir"])
    assert adopted["job_id"] == job_id  # the killed watcher's job, not a new one
    assert len(_job_folders(pre)) == 2
    rows = list(csv.DictReader(curves.to_csv(curves.collect(pre.parent)).splitlines()))
    assert {(r["epoch"], r["status"]) for r in rows} == {("0", "done"), ("1", "done")}
    # finished: a second run returns the result and writes nothing
    before = (pre / "watch" / "watch_state.json").read_text()
    assert watch.main(_watch_argv(pre, tmp_path)) == res
    assert (pre / "watch" / "watch_state.json").read_text() == before
    # snapshots of an older run (no compute record) are placed by epoch only
    listed = json.loads((pre / "snapshots.json").read_text())
    (pre / "snapshots.json").write_text(json.dumps({"snapshots": [{"step": e["step"], "file": e["file"]}
                                                                  for e in listed["snapshots"]]}))
    old = list(csv.DictReader(curves.to_csv(curves.collect(pre.parent)).splitlines()))
    assert [(r["epoch"], r["value"]) for r in old] == [(r["epoch"], r["value"]) for r in rows]
    assert all(r["flops"] == r["images_seen"] == r["device_hours"] == "" for r in old)


def test_second_watcher_is_refused_by_the_lock(tmp_path, finished, user_error):
    from crossmae.runs import RunDir
    pre = _copy(finished, tmp_path)
    holder = RunDir(pre / "watch", "watch", {"x": 1}, "x\n").start()  # the lock a running watcher holds
    try:
        assert "in use by another run" in user_error(watch.main, _watch_argv(pre, tmp_path))
    finally:
        holder.close()


def test_a_finished_watcher_with_other_options_names_the_way_out(tmp_path, finished, user_error):
    """The watcher's folder is fixed (``PRETRAIN_DIR/watch``): a finished one with other options is
    refused naming that folder to move away, not an ``--output-dir`` the command does not take."""
    from crossmae.runs import RunDir
    pre = _copy(finished, tmp_path)
    old = RunDir(pre / "watch", "watch", {"every": 99}, "x\n").start()
    try:
        old.finish({"task": "watch", "protocol": "watch", "metrics": {"done": 0}})
    finally:
        old.close()
    before = (pre / "watch" / "metrics.json").read_bytes()
    msg = user_error(watch.main, _watch_argv(pre, tmp_path))
    assert f"move {pre / 'watch'} away" in msg and "--output-dir" not in msg, msg
    assert (pre / "watch" / "metrics.json").read_bytes() == before


def test_submit_plans_a_watcher_per_pretraining(tmp_path):
    from benchmarks.suites import get_suite
    from slurm.submit import plan
    specs = plan(get_suite("smoke"), tmp_path / "o", pretrains={"mae": "smoke_mae", "crossmae": "smoke_crossmae"},
                 tasks=["linprobe"], watch=["knn,linprobe_fast"], every=2)
    w = [s for s in specs if s.kind == "watch"]
    assert [s.id for s in w] == ["pretrain/mae/watch", "pretrain/crossmae/watch"]
    assert all(not s.depends_on and s.module == "slurm.watch" for s in w)
    assert w[0].argv()[-9:] == [str(tmp_path / "o" / "pretrain" / "mae"), "--probe", "knn,linprobe_fast",
                                "--every", "2", "--poll", "5.0", "--executor", "auto"]
    assert w[0].output_dir == str(tmp_path / "o" / "pretrain" / "mae" / "watch")


@pytest.mark.slurm
def test_watcher_submits_probes_to_slurm_once_per_snapshot(tmp_path, finished):
    from slurm.executor import slurm_available
    if not slurm_available():
        pytest.skip("no Slurm controller answers (start one: bash slurm/cluster.sh ensure)")
    pre = _copy(finished, tmp_path)
    argv = _watch_argv(pre, tmp_path)
    argv[argv.index("--executor") + 1] = "slurm"
    res = watch.main(argv)
    assert res == {"done": 2, "failed": 0, "attempts": 2}
    st = _state(pre)
    ids = [a["job_id"] for e in st["entries"].values() for a in e["attempts"]]
    assert len(ids) == len(set(ids)) == 2 and all(a["executor"] == "slurm" for e in st["entries"].values()
                                                 for a in e["attempts"])
    assert {r.state for r in status_collect(pre)} == {"done"}


def test_a_run_starting_leaves_nested_runs_temp_files_alone(tmp_path):
    """A pretraining (re)starting removes its own stale temp files, never those of the probes that
    run inside its folder (their own run.lock marks them): a requeued pretraining cannot break a
    probe in the middle of an atomic write."""
    from crossmae.runs import RunDir
    own = tmp_path / ".checkpoint-latest.pth.x1.tmp"
    nested = tmp_path / "watch" / "knn" / "ep0" / "try0"
    nested.mkdir(parents=True)
    (nested / "run.lock").write_text("")
    theirs = nested / ".checkpoint-latest.pth.x2.tmp"
    for p in (own, theirs):
        p.write_text("partial")
    RunDir(tmp_path, "pretrain", {"x": 1}, "x\n").start().close()
    assert not own.exists() and theirs.exists()


@pytest.mark.slurm
def test_submit_runs_pretraining_watcher_and_probes_as_slurm_jobs(tmp_path):
    """``slurm.submit --pretrain ... --watch knn``: the pretraining, its watcher (itself a Slurm job)
    and the watcher's probes all run on the cluster; one probe per snapshot; the final leaderboard
    job (after the watcher) draws the curve."""
    from benchmarks.suites import get_suite
    from slurm.executor import slurm_available
    from slurm.submit import dispatch, plan
    if not slurm_available():
        pytest.skip("no Slurm controller answers (start one: bash slurm/cluster.sh ensure)")
    out = tmp_path / "runs"
    specs = plan(get_suite("smoke"), out, pretrains={"crossmae": "smoke_crossmae"}, tasks=["linprobe"],
                 pretrain_cfg_options=[*PRE, "epochs=2"],
                 cfg_options=[f"fast.cache_dir={tmp_path / 'fc'}", "protocol=knn"],
                 watch=["knn"], every=1)
    sub = dispatch(specs, out, "slurm", wait=True, progress=None)
    assert set(sub.results.values()) == {"done"} and "pretrain/crossmae/watch" in sub.results
    pre = out / "pretrain" / "crossmae"
    st = _state(pre)
    assert sorted(st["entries"]) == ["knn/ep0", "knn/ep1"]
    assert all(len(e["attempts"]) == 1 and e["attempts"][0]["executor"] == "slurm" and e["state"] == "done"
               for e in st["entries"].values())
    assert {r.state for r in status_collect(out)} == {"done"}
    rows = list(csv.DictReader((out / "probe_curves.csv").open()))
    top1 = {(r["backbone"], r["epoch"]) for r in rows if r["metric"] == "top1"}
    assert top1 == {("crossmae", "0"), ("crossmae", "1")}


@pytest.mark.slurm
def test_probe_refused_by_the_scheduler_is_retried_then_failed(tmp_path, finished):
    from slurm.executor import slurm_available
    if not slurm_available():
        pytest.skip("no Slurm controller answers (start one: bash slurm/cluster.sh ensure)")
    pre = _copy(finished, tmp_path)
    argv = _watch_argv(pre, tmp_path, "--every", "2", "--retries", "1", "--partition", "no_such_partition")
    argv[argv.index("--executor") + 1] = "slurm"
    assert watch.main(argv) == {"done": 0, "failed": 1, "attempts": 2}
    e = _state(pre)["entries"]["knn/ep1"]
    assert e["state"] == "failed" and "submission refused" in e["error"] and "partition" in e["error"].lower()
    rows = list(csv.DictReader(curves.to_csv(curves.collect(pre.parent)).splitlines()))
    assert [(r["status"], r["attempts"]) for r in rows] == [("failed", "2")]
